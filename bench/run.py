"""`make bench`: imp's speed on full-size synthetic Imp-3B models (real shapes, random weights).

    .venv/bin/python bench/run.py [--runs 3] [--tokens 32] [--sizes 384,196] [--families phi2,phi3,qwen2]
                                  [--skip ...]
    .venv/bin/python bench/report.py bench/results/<raw>.json      # redo latest.md

Makes (or finds in bench/cache/) each model with bench/synthetic.py, builds llama.cpp's
llama-mtmd-cli once (bench/mtmd_cli.py), then measures in one invocation, for each image size of
the 3B (phi2) and for the 384-px Imp-v1.5-4B (phi3) and Imp-v1.5-2B (qwen2) (--families):
  - cold/warm: the first question about an image in a new `imp ask` process with an empty prompt
    cache, then a second question about it in another new process (the prefix from the cache):
    launch to first answer byte, the --json timings, the cache entry's size and write/read times;
  - native: llama-mtmd-cli on the same GGUF pair and image, with its defaults (its runs alternate
    with imp's cold/warm runs);
  - session: two questions in one process through the Session API;
and on the 384-px model:
  - serve: `imp serve` (issue 10): a second question's time to first token against the first's,
    then 4 clients on 4 images at once (requests per minute);
  - tuned: `imp tune`, then a cold `imp ask` with its choice against llama-mtmd-cli (issue 14);
and on the 196-px model:
  - batch: --batch-images distinct pictures through `imp ask --output` with 1 process x 2 threads,
    --jobs 2 x 1 thread, Ray Data 2 actors x 1 thread, and one `imp ask` process per image (the
    naive shell loop); peak RSS; the batch cache policy's saving; --resume on 100,000 lines
    (issue 18, bench/batches.py);
and once: `imp --help`, `imp convert` (F16, Q4_K_M), memory bandwidth, llama-cpp-python's stock
Llava15ChatHandler and transformers (tests/oracle.py) as further baselines.
Roles: measure.py (processes, load, machine), workers.py (in-process measurements),
mtmd_cli.py (the native baseline), report.py (derived figures, latest.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import batches  # noqa: E402
import measure  # noqa: E402
import mtmd_cli  # noqa: E402
import report  # noqa: E402
import synthetic  # noqa: E402
from measure import log  # noqa: E402
from workers import run_worker  # noqa: E402

QUESTIONS = ("What is in the image? Describe it in detail.", "Which colours dominate this picture?")
STEPS = ("help", "convert", "cold_warm", "mtmd_cli", "session", "serve", "tuned", "batch", "llava", "transformers",
         "bandwidth")
SERVE_CLIENTS, SERVE_QUESTIONS = 4, 2  # issue 10: 4 clients, 4 images, a bounded few questions each
# one line of llama.cpp's OpenMP threads spinning against other processes can slow it tenfold:
# on a shared machine, --threads 1 for every side gives steadier ratios


def test_image(path: Path, seed: int = 7) -> Path:
    """A 640x480 photo-like picture (smooth gradients + noise), written once."""
    if not path.exists():
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:480, 0:640]
        rgb = np.stack([x / 640 * 255, y / 480 * 255, (x + y) % 256], axis=-1)
        rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype("uint8")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
    return path


def ensure_model(size: int, quant: str, cache: Path, family: str = "phi2", threads: int = 1) -> dict:
    r = subprocess.run([sys.executable, str(BENCH / "synthetic.py"), "--family", family, "--size", str(size),
                        "--cache", str(cache), "--quants", quant, "--threads", str(threads)], env=measure.imp_env())
    if r.returncode != 0:
        sys.exit(f"bench: could not build the synthetic {family} {size}-px model (see above)")
    return synthetic.paths(size, cache, family)


def model_key(size: int, family: str) -> str:
    """The model's key in the results: "384" / "196" for the 3B (as before the families), else
    "<family>-<size>"."""
    return str(size) if family == "phi2" else f"{family}-{size}"


def bench_size(size: int, a, threads: int, image: Path, skip: set, native: Path | None, native_error: str,
               family: str = "phi2") -> dict:
    p = ensure_model(size, a.quant, a.cache, family, threads)
    text, mmproj = p[a.quant], p["mmproj"]
    out: dict = {"family": family, "model": synthetic.FAMILIES[family][0], "image_size": size,
                 "text": str(text), "mmproj": str(mmproj), "image_tokens": (size // 14) ** 2,
                 "text_bytes": text.stat().st_size, "mmproj_bytes": mmproj.stat().st_size,
                 # the wall time and peak RSS of the conversion that made the cached GGUFs
                 "conversion": synthetic.conversion(a.quant, size, a.cache, family)}
    key = model_key(size, family)
    # imp's cold/warm runs and llama-mtmd-cli's alternate (run i of each, then run i + 1): on a
    # shared machine both sides then meet the same neighbours
    home = a.homes / f"imp-home-{key}"  # the prompt cache of these runs only (and no tuning.json)
    native_runs: list = []
    if "cold_warm" not in skip:
        shutil.rmtree(home, ignore_errors=True)
        out["cold_warm"] = []
    if "mtmd_cli" not in skip:
        out["mtmd_cli"] = {"error": native_error} if native is None else {"binary": str(native), "runs": native_runs}
    for i in range(a.runs):
        if "cold_warm" not in skip:
            log(f"{key}: cold/warm, run {i + 1}/{a.runs}")
            out["cold_warm"].append(measure.cold_warm(text, mmproj, image, QUESTIONS, a.tokens, threads, home,
                                                      tuple(shlex.split(a.imp_args))))
        if "mtmd_cli" not in skip and native is not None:
            log(f"{key}: llama-mtmd-cli, run {i + 1}/{a.runs}")
            r = mtmd_cli.run(native, text, mmproj, image, QUESTIONS[0], a.tokens, threads,
                             template=mtmd_cli.FAMILY_TEMPLATES[family])
            log(f"  {r.get('error') or 'first byte %.2f s, wall %.1f s' % (r['first_output_s'] or -1, r['wall_s'])}")
            native_runs.append(r)
    if "cold_warm" not in skip:
        entry = max((r["json"]["cache_after_cold"]["bytes"] for r in out["cold_warm"]), default=0)
        if entry:
            log(f"{key}: prompt-cache write/read of a {entry / 1e6:.0f} MB entry")
            out["cache_io"] = run_worker("cache_io", {"bytes": entry, "folder": str(home / "io"), "runs": a.runs})
        shutil.rmtree(home, ignore_errors=True)
    if "session" not in skip:
        log(f"{key}: two questions in one Session")
        out["session"] = run_worker("session", {"text": str(text), "mmproj": str(mmproj), "image": str(image),
                                                "questions": list(QUESTIONS), "tokens": a.tokens,
                                                "threads": threads})
    return out


def bench_serve(p: dict, a, threads: int, image: Path) -> dict:
    """Issue 10: `imp serve` on the 384-px model: a second question's time to first token against
    the first's, then SERVE_CLIENTS clients on as many other images at once."""
    others = [test_image(a.cache / f"bench-image-{i}.png", seed=100 + i) for i in range(SERVE_CLIENTS)]
    try:
        return measure.serve_figures(p[a.quant], p["mmproj"], [image, *others], QUESTIONS, a.tokens, threads,
                                     a.homes / "imp-home-serve", SERVE_QUESTIONS)
    except (OSError, RuntimeError) as e:
        log(f"serve failed: {e}")
        return {"error": str(e)}
    finally:
        shutil.rmtree(a.homes / "imp-home-serve", ignore_errors=True)


def bench_tuned(p: dict, a, threads: int, image: Path, native: Path | None) -> dict:
    """Issue 14: `imp tune` once in a fresh IMP_HOME (or, with --tune-rounds 0, the settings given
    in --imp-args), then a cold `imp ask` with what it chose (plain for the wall clock, --json for
    the phases) against llama-mtmd-cli's defaults on the same files."""
    text, mmproj = p[a.quant], p["mmproj"]
    home = a.homes / "imp-home-tuned"
    shutil.rmtree(home, ignore_errors=True)
    out: dict = {"imp_args": a.imp_args, "tune": None, "imp": [], "native": []}
    extra = tuple(shlex.split(a.imp_args))
    if a.tune_rounds:
        log(f"imp tune --rounds {a.tune_rounds} ...")
        out["tune"] = measure.imp_tune(text, mmproj, threads, home, a.tune_rounds)
        log(f"  tune: {out['tune'].get('error') or out['tune']['choice']}")
    for i in range(a.runs):
        log(f"tuned imp ask vs llama-mtmd-cli, run {i + 1}/{a.runs}")
        row = {}
        for mode in ("plain", "json"):
            measure.imp_cache(home, "clear")
            row[mode] = measure.imp_ask(text, mmproj, image, QUESTIONS[0], a.tokens, threads, home, mode == "json",
                                        extra)
        out["imp"].append(row)
        if native is not None:
            out["native"].append(mtmd_cli.run(native, text, mmproj, image, QUESTIONS[0], a.tokens, threads))
        log(f"  imp wall {row['plain'].get('wall_s')}, native wall {out['native'][-1].get('wall_s') if native else '-'}")
    shutil.rmtree(home, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="imp benchmark (see bench/run.py's docstring)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each figure (default 3)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per answer (default 32)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads everywhere (0: the CPU count)")
    ap.add_argument("--sizes", default="384,196", help="image sizes of the Imp-3B variants (384, 196)")
    ap.add_argument("--families", default=",".join(synthetic.FAMILIES),
                    help="models: phi2 (Imp-3B, at each of --sizes), phi3 (Imp-v1.5-4B) and qwen2 (Imp-v1.5-2B) "
                         "at 384 px (default: all three)")
    ap.add_argument("--quant", default="Q4_K_M", help="text model type (default Q4_K_M)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: " + ",".join(STEPS))
    ap.add_argument("--imp-args", default="", help="extra options for every `imp ask` (e.g. engine settings)")
    ap.add_argument("--tune-rounds", type=int, default=1,
                    help="`imp tune --rounds` for the tuned step (0: no tune, pass the settings in --imp-args)")
    ap.add_argument("--batch-images", type=int, default=24, help="distinct pictures in the batch step (default 24)")
    ap.add_argument("--batch-tokens", type=int, default=16, help="tokens per answer in the batch step (default 16)")
    ap.add_argument("--batch-work", type=Path, help="scratch folder of the batch step (default: CACHE/batch)")
    ap.add_argument("--cache", type=Path, default=BENCH / "cache")
    ap.add_argument("--homes", type=Path, default=None,
                    help="folder for the measured processes' IMP_HOMEs (default: --cache; give your own when "
                         "several people share one --cache)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="before each measurement, wait up to this many seconds for other processes to go idle")
    a = ap.parse_args()
    a.cache = a.cache.resolve()  # the measured processes run from the repository root
    a.homes = (a.homes or a.cache).resolve()
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - set(STEPS):
        ap.error(f"unknown step(s) to skip: {', '.join(sorted(skip - set(STEPS)))}")
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    if set(families) - set(synthetic.FAMILIES):
        ap.error(f"unknown family: {', '.join(sorted(set(families) - set(synthetic.FAMILIES)))} "
                 f"(choose from {', '.join(synthetic.FAMILIES)})")
    models = [(size, f) for f in families for size in (sizes if f == "phi2" else (384,))]
    threads = a.threads or os.cpu_count() or 1
    measure.QUIET.max_wait_s = a.quiet_wait
    started = time.perf_counter()
    report.RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": measure.machine(threads),
                 "command": shlex.join([Path(sys.executable).name, "bench/run.py", *sys.argv[1:]]),
                 "settings": {"runs": a.runs, "tokens": a.tokens, "threads": threads, "sizes": sizes, "families": families,
                              "quant": a.quant, "questions": QUESTIONS, "batch_images": a.batch_images,
                              "batch_tokens": a.batch_tokens, "tune_rounds": a.tune_rounds, "skip": sorted(skip), "imp_args": a.imp_args,
                              "quiet_wait_s": a.quiet_wait, "quiet_threshold": measure.QUIET.threshold}}
    log(f"machine: {res['machine']['cpu_model']}, {threads} threads, load {res['machine']['loadavg']}")
    image = test_image(a.cache / "bench-image.png")

    native, native_error = None, "skipped"
    if "mtmd_cli" not in skip or "tuned" not in skip:
        native, native_error = mtmd_cli.ensure_built(a.cache)
        if native is None:
            log(f"llama-mtmd-cli could not be built, going on without it: {native_error}")
    if "help" not in skip:
        res["help_s"] = measure.imp_help()
    if "bandwidth" not in skip:
        res["bandwidth"] = run_worker("bandwidth", {"threads": threads})
    res["sizes"] = {}
    for size, family in models:
        res["sizes"][model_key(size, family)] = bench_size(size, a, threads, image, skip, native, native_error, family)
    if "convert" not in skip:
        res["convert"] = {}
        for family in families:
            source = synthetic.paths(384, a.cache, family)["checkpoint"]
            # the 3B to F16 and Q4_K_M (keys "F16", "Q4_K_M" as before the families), the others to --quant
            for q in ("F16", "Q4_K_M") if family == "phi2" else (a.quant,):
                log(f"imp convert -q {q} ({family})")
                res["convert"][q if family == "phi2" else f"{family} {q}"] = {
                    **measure.imp_convert(source, q, a.cache / "convert-bench", threads), "family": family, "quant": q}
    p384 = synthetic.paths(384, a.cache)
    if "phi2" not in families:  # the baselines below run the 3B
        skip |= {"llava", "transformers", "serve", "tuned"}
    if "serve" not in skip or "tuned" not in skip:
        p384 = ensure_model(384, a.quant, a.cache)
    if "serve" not in skip:
        log("imp serve (384 px)")
        res["serve"] = bench_serve(p384, a, threads, image)
    if "tuned" not in skip:
        res["tuned"] = bench_tuned(p384, a, threads, image, native)
    if "batch" not in skip and "phi2" in families:
        p196 = ensure_model(196, a.quant, a.cache)
        log(f"batch: {a.batch_images} images through the 196-px model")
        res["batch"] = batches.run(p196[a.quant], p196["mmproj"], a.batch_work or a.cache / "batch", a.batch_images,
                                   a.batch_tokens, min(threads, 2))
    if "llava" not in skip:
        log("llama-cpp-python Llava15ChatHandler")
        res["llava"] = run_worker("llava", {"text": str(p384[a.quant]), "mmproj": str(p384["mmproj"]),
                                            "image": str(image), "question": QUESTIONS[0], "tokens": a.tokens,
                                            "runs": a.runs + 1, "threads": threads})
    if "transformers" not in skip:
        log("transformers float32")
        res["transformers"] = run_worker("transformers", {"checkpoint": str(p384["checkpoint"]), "image": str(image),
                                                          "question": QUESTIONS[0], "tokens": 8, "runs": a.runs,
                                                          "threads": threads})
    res["quiet_waits"] = measure.QUIET.waits
    res["elapsed_s"] = time.perf_counter() - started
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw = report.RESULTS / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}.json"
    md = report.write(res, raw)
    log(f"done in {res['elapsed_s'] / 60:.1f} min: {raw}, {report.RESULTS / 'latest.md'}")
    print(md)


if __name__ == "__main__":
    main()
