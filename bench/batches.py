"""The `batch` step of make bench (issue 18): throughput of many images through one model.

In one run, on the same IMAGES distinct pictures and the same question, N tokens each:
  - one_2:   `imp ask IMAGES -q Q --output F --threads 2`            (1 process x 2 threads)
  - two_1:   the same with `--jobs 2`                                 (2 worker processes x 1 thread)
  - ray_2x1: Ray Data, ImpPredictor, concurrency=2, 1 thread each     (ray.init(num_cpus=2))
  - naive:   `for f in IMAGES; do imp ask $f Q --json; done`          (one process per image, as a shell loop)
answers per hour from the wall time of each; peak RSS of each process and the peak of the
processes' summed PSS (shared pages counted once: the memory-mapped weights); what the batch
cache policy saves per image (the KV state copy on the critical path and the entry's bytes, from
a `--cache write` run of a few images); and `--resume`'s start-up cost on a 100,000-line output.

    python bench/batches.py TEXT MMPROJ [--images 24] [--tokens 16] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from measure import IMP, ROOT, cpu_busy_s, imp_env, log  # noqa: E402

QUESTION = "What is in the image? Describe it in detail."


def images(folder: Path, n: int) -> list[Path]:
    """n distinct 640x480 photo-like pictures (each its own gradients, tint and noise)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"batch-{i:03d}.jpg"
        if not path.exists():
            rng = np.random.default_rng(1000 + i)
            y, x = np.mgrid[0:480, 0:640]
            tint = rng.integers(0, 256, 3)
            rgb = np.stack([x / 640 * 255 + tint[0], y / 480 * 255 + tint[1], (x + y) % 256 + tint[2]], axis=-1) % 256
            rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype("uint8")
            Image.fromarray(rgb).save(path, quality=90)
        out.append(path)
    return out


# -- a process tree, measured -------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _mem(pid: int) -> tuple[int, int, str]:
    """(RSS, PSS) in bytes and the process name."""
    rss = pss = 0
    name = "?"
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/comm") as f:
            name = f.read().strip()
    except OSError:
        pass
    return rss, pss, name


def run_tree(cmd: list[str], env: dict, poll_s: float = 0.25) -> dict:
    """Run cmd; wall time, and memory of it and all its descendants, sampled: each process's peak
    RSS, the peak of the summed PSS and of the summed RSS."""
    busy0 = cpu_busy_s()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                         cwd=str(ROOT))
    out: list[bytes] = []
    err: list[bytes] = []
    readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read()), daemon=True)
               for s, b in ((p.stdout, out), (p.stderr, err))]
    for r in readers:
        r.start()
    peak: dict[int, tuple[int, str]] = {}
    peak_pss = peak_rss = 0
    while p.poll() is None:
        total_pss = total_rss = 0
        for pid in _tree(p.pid):
            rss, pss, name = _mem(pid)
            total_pss += pss
            total_rss += rss
            if rss > peak.get(pid, (0, ""))[0]:
                peak[pid] = (rss, name)
        peak_pss, peak_rss = max(peak_pss, total_pss), max(peak_rss, total_rss)
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    for r in readers:
        r.join(10)
    busy = max(0.0, cpu_busy_s() - busy0)  # all CPUs' busy time during the run, ours and others'
    imp_procs = sorted((v for v in peak.values() if v[1] not in ("sh", "bash")), reverse=True)
    return {"rc": p.returncode, "wall_s": wall, "stdout": b"".join(out).decode("utf-8", "replace"),
            "stderr": b"".join(err).decode("utf-8", "replace")[-2000:],
            "peak_rss_per_process": [{"name": n, "peak_rss": r} for r, n in imp_procs[:8]],
            "peak_pss_total": peak_pss, "peak_rss_total": peak_rss,
            "cpus_busy": round(busy / (wall * (os.cpu_count() or 1)), 3)}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _per_hour(n: int, wall: float) -> float:
    return n / wall * 3600


RAY_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import ray
from imp_cli.ray_data import ImpPredictor
text, mmproj, q, n, *paths = sys.argv[1:]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
t1 = time.perf_counter()
ds = ray.data.read_binary_files(paths, include_paths=True)
rows = ds.map_batches(ImpPredictor, concurrency=2, batch_size=1, num_cpus=0.5,  # a CPU left for Ray's read tasks
                      fn_constructor_kwargs={"model": text, "mmproj": mmproj, "questions": [q], "max_tokens": int(n),
                                             "threads": 1, "repack": "off", "flash_attn": "off"}).take_all()
t2 = time.perf_counter()
errors = sum(1 for r in rows if r["error"])
print(json.dumps({"answers": len(rows) - errors, "errors": errors, "ray_init_s": t1 - t0, "map_s": t2 - t1}))
"""


def run(text: Path, mmproj: Path, work: Path, n_images: int = 24, tokens: int = 16, threads: int = 2,
        engine_args: tuple[str, ...] = ("--repack", "off", "--flash-attn", "off")) -> dict:
    """The batch step; `work` is a scratch folder (removed at the end but for the pictures and
    partial.json, the figures so far, rewritten after each measurement: a run cut short keeps them)."""
    pics = images(work / "pictures", n_images)
    res: dict = {"images": n_images, "tokens": tokens, "threads": threads, "question": QUESTION,
                 "engine_args": list(engine_args), "runs": {}}
    base = [IMP, "ask", "-q", QUESTION, "--model", str(text), "--mmproj", str(mmproj), "-n", str(tokens),
            "--ignore-eos", *engine_args]

    def home(name: str) -> dict:
        h = work / f"home-{name}"
        shutil.rmtree(h, ignore_errors=True)
        return imp_env(h)

    def batch(name: str, extra: list[str], subset: list[Path]) -> dict:
        out = work / f"{name}.jsonl"
        out.unlink(missing_ok=True)
        log(f"batch: {name} ({len(subset)} images) ...")
        r = run_tree([*base[:2], *map(str, subset), *base[2:], "--output", str(out), *extra], home(name))
        recs = _records(out) if out.exists() else []
        r["answers"] = sum(1 for x in recs if not x.get("error"))
        r["answers_per_hour"] = _per_hour(r["answers"], r["wall_s"])
        r["timings"] = {k: statistics.median([x["timings"][k] for x in recs if x.get("timings", {}).get(k) is not None])
                        for k in ("image_encode_ms", "prompt_ms", "generation_tokens_per_s", "cache_save_ms")
                        if any(x.get("timings", {}).get(k) is not None for x in recs)}
        log(f"  {name}: {r['answers']} answers in {r['wall_s']:.1f} s = {r['answers_per_hour']:.0f}/h "
            f"(rc {r['rc']}; CPUs busy {r['cpus_busy']:.0%})")
        r.pop("stdout")
        return r

    def save() -> None:
        (work / "partial.json").write_text(json.dumps(res, indent=1))

    # the comparisons the targets name first (batch vs the naive loop, --jobs 2 vs 1 x 2)
    res["runs"]["one_2"] = batch("one_2", ["--threads", str(threads), "--jobs", "1"], pics)
    res["resume_scan"] = resume_scan(work / "one_2.jsonl", work / "big.jsonl")
    save()
    res["runs"]["naive"] = naive_loop(base, pics, threads, home("naive"))
    save()
    res["runs"]["two_1"] = batch("two_1", ["--threads", str(threads), "--jobs", "2"], pics)
    save()

    log(f"batch: ray_2x1 ({len(pics)} images) ...")
    env = {**home("ray"), "RAY_USAGE_STATS_ENABLED": "0"}
    r = run_tree([sys.executable, "-c", RAY_SCRIPT, str(text), str(mmproj), QUESTION, str(tokens), *map(str, pics)],
                 env)
    try:
        got = json.loads(r["stdout"].strip().splitlines()[-1])
        r.update(got, answers_per_hour=_per_hour(got["answers"], r["wall_s"]),
                 answers_per_hour_after_init=_per_hour(got["answers"], got["map_s"]))
        log(f"  ray_2x1: {got['answers']} answers in {r['wall_s']:.1f} s (ray.init {got['ray_init_s']:.1f} s)")
    except (ValueError, IndexError, KeyError):
        r["error"] = r["stderr"][-600:]
        log(f"  ray_2x1 failed: {r['error']}")
    r.pop("stdout")
    res["runs"]["ray_2x1"] = r

    save()

    few = pics[:4]
    res["runs"]["cache_write"] = batch("cache_write", ["--threads", str(threads), "--cache", "write"], few)
    cache_dir = work / "home-cache_write" / "cache"
    entries = [p.stat().st_size for p in cache_dir.glob("*.kv")] if cache_dir.is_dir() else []
    res["cache_entry_bytes"] = statistics.median(entries) if entries else None
    save()

    one, two = res["runs"]["one_2"], res["runs"]["two_1"]
    ray_run, naive = res["runs"]["ray_2x1"], res["runs"]["naive"]
    res["ratios"] = {
        "two_1_over_one_2": _ratio(two, one), "ray_over_one_2": _ratio(ray_run, one),
        "one_2_over_naive": _ratio(one, naive), "best_over_naive": max(
            filter(None, [_ratio(one, naive), _ratio(two, naive), _ratio(ray_run, naive)]), default=None),
    }
    for name in ("home-one_2", "home-two_1", "home-ray", "home-naive", "home-cache_write", "big.jsonl"):
        path = work / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return res


def naive_loop(base: list[str], pics: list[Path], threads: int, env: dict) -> dict:
    """`for f in IMAGES; do imp ask $f Q --json; done`: a new process (and model load) per image,
    the prompt cache at its single-image default (each image writes an entry)."""
    log(f"batch: naive loop, one `imp ask` per image ({len(pics)} images) ...")
    loop = "; ".join(" ".join(_q(c) for c in [IMP, "ask", str(p), *base[2:], "--threads", str(threads), "--json"])
                     for p in pics)
    r = run_tree(["sh", "-c", loop], env)
    recs = [json.loads(line) for line in r.pop("stdout").splitlines() if line.strip()]
    r["answers"] = len(recs)
    r["answers_per_hour"] = _per_hour(r["answers"], r["wall_s"])
    r["cache"] = [x["cache"] for x in recs][:3]
    log(f"  naive: {r['answers']} answers in {r['wall_s']:.1f} s = {r['answers_per_hour']:.0f}/h")
    return r


def _ratio(a: dict, b: dict) -> float | None:
    x, y = a.get("answers_per_hour"), b.get("answers_per_hour")
    return round(x / y, 3) if x and y else None


def _q(s: str) -> str:
    import shlex

    return shlex.quote(s)


def resume_scan(sample: Path, big: Path, lines: int = 100_000) -> dict:
    """--resume's start-up: reading a 100,000-line output file (records like the sample's, each
    its own image hash) to find what is done, timed in a fresh process, with its peak RSS."""
    recs = _records(sample) if sample.exists() else []
    if not recs:
        return {"error": "no sample records"}
    import hashlib

    with open(big, "w", encoding="utf-8") as f:
        for i in range(lines):
            r = dict(recs[i % len(recs)])
            r["image"] = {**r["image"], "sha256": hashlib.sha256(str(i).encode()).hexdigest()}
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    code = ("import json, resource, sys, time\n"
            "from imp_cli.batch import scan_output\n"
            "rec = json.loads(open(sys.argv[1]).readline())\n"
            "t0 = time.perf_counter()\n"
            "scan = scan_output(sys.argv[1], {k: rec[k] for k in ('model', 'sampling', 'settings')})\n"
            "print(json.dumps({'seconds': time.perf_counter() - t0, 'done': scan.done.count, "
            "'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))\n")
    p = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, env=imp_env())
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": p.stderr[-600:]}
    out.update(lines=lines, file_bytes=big.stat().st_size)
    log(f"  --resume scan of {lines:,} lines ({out['file_bytes'] / 1e6:.0f} MB): {out['seconds']:.2f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", type=Path)
    ap.add_argument("mmproj", type=Path)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=BENCH / "cache" / "batch")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    res = run(a.text, a.mmproj, a.work, a.images, a.tokens, a.threads)
    text = json.dumps(res, indent=1)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
