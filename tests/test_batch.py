"""`imp ask` over many images (issue 18): crash-safe, resumable output; one error record per bad
image; folders, streamed lists, shards, worker processes, Ray Data; no prompt-cache churn.

The oracle for every answer is the uncached one-shot answer: a fresh Session per image with no
prompt cache (no state shared with any other image), computed in this process.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import IMP, assert_usage_error, clean_env, run_imp, run_python
from schema_check import check_record

Q1 = "What is in the image?"
Q2 = "Which colours dominate?"
N = 6  # tokens per answer: enough to tell answers apart, short enough for 80 of them


# ---------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model(converted) -> tuple[Path, Path]:
    return converted("new", "float16", "square")


@pytest.fixture
def env(tmp_path):
    return clean_env(tmp_path)


def make_images(folder: Path, n: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """n distinct small photos (gradients + noise, each its own colours)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:64]
    paths = []
    for i in range(n):
        tint = rng.integers(0, 256, 3)
        base = np.stack([x * 3 + tint[0], y * 4 + tint[1], (x + y) * 2 + tint[2]], axis=-1) % 256
        pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


class OneShot:
    """The uncached one-shot answer of each (image, question): a fresh Session per image, no
    prompt cache, the CLI's sampling defaults (greedy) and N tokens. Memoized by image bytes."""

    def __init__(self, text: Path, mmproj: Path):
        from imp_cli.modelfiles import read_pair

        self.pair = read_pair(text, mmproj)
        self.memo: dict = {}

    def __call__(self, path: Path, question: str) -> str:
        import hashlib

        from imp_cli.images import load_image
        from imp_cli.session import Sampling, Session

        key = (hashlib.sha256(Path(path).read_bytes()).hexdigest(), question)
        if key not in self.memo:
            with Session(self.pair, threads=1, ctx=512, cache=None) as session:
                staged = session.stage(load_image(str(path)))
                self.memo[key] = session.answer(staged, question, sampling=Sampling(), max_tokens=N).collect().text
        return self.memo[key]


@pytest.fixture(scope="module")
def one_shot(model) -> OneShot:
    return OneShot(*model)


def records_of(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "the output ends in a torn line"
    return [json.loads(line) for line in text.splitlines()]


def sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def free_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def list_on_stdin(*args, env: dict):
    """`imp ask --images-from - ARGS`, the list written by the test as it goes (send); when the
    block ends, the list is closed, the run awaited and `done` holds its stdout and stderr."""
    proc = subprocess.Popen([IMP, "ask", "--images-from", "-", *map(str, args)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done: dict = {}
    try:
        yield proc, done
        proc.stdin.close()
        proc.wait(timeout=120)
        done["stdout"], done["stderr"] = proc.stdout.read().decode(), proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def send(proc: subprocess.Popen, line) -> None:
    proc.stdin.write(f"{line}\n".encode())
    proc.stdin.flush()


def cache_entries(env: dict) -> int:
    p = run_imp("cache", "info", "--json", env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["entries"]


# ---------------------------------------------------------------------- crash, resume, torn line
def test_kill_at_random_points_then_resume(model, one_shot, env, tmp_path):
    """kill -9 at 5 random moments of a 40-image, 2-question batch, --resume after each: in the
    end the file holds every (image, question) exactly once, each answer equal to the uncached
    one-shot answer, and only whole lines."""
    images = make_images(tmp_path / "photos", 40)
    out = tmp_path / "answers.jsonl"
    args = [IMP, "ask", *map(str, images), "-q", Q1, "-q", Q2, "--model", str(model[0]), "-n", str(N),
            "--output", str(out), "--resume"]
    rng = random.Random(18)
    kill_at = sorted(rng.sample(range(1, 78), 5))  # records in the file when the kill is sent
    kills = 0
    for target in kill_at:
        with open(tmp_path / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if out.exists() and out.read_bytes().count(b"\n") >= target:
                    time.sleep(rng.uniform(0, 0.08))  # land anywhere: mid-answer, mid-write, between
                    break
                time.sleep(0.005)
        finally:
            if proc.poll() is None:
                proc.kill()
                kills += 1
            proc.wait()
    assert kills >= 5, (kills, kill_at)
    p = run_imp(*args[1:], env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    records = records_of(out)
    expected = {(sha(img), q) for img in images for q in (Q1, Q2)}
    counts = Counter((r["image"]["sha256"], r["question"]) for r in records)
    assert set(counts) == expected
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    by_sha = {sha(img): img for img in images}
    for r in records:
        check_record(r)  # the one answer record (imp_cli/schema/record.schema.json)
        assert r["answer"] == one_shot(by_sha[r["image"]["sha256"]], r["question"]), r["image"]["source"]


def test_torn_last_line_is_cut_and_answered_again(model, one_shot, env, tmp_path):
    images = make_images(tmp_path / "p", 3, seed=1)
    out = tmp_path / "out.jsonl"
    base = ["ask", *images, "-q", Q1, "--model", model[0], "-n", N, "--output", out]
    p = run_imp(*base, env=env)
    assert p.returncode == 0, p.stderr
    whole = out.read_bytes()
    assert whole.count(b"\n") == 3
    out.write_bytes(whole[:-25])  # a crash in the middle of writing the third record
    p = run_imp(*base, "--resume", env=env)
    assert p.returncode == 0, p.stderr
    assert "cut short" in p.stderr
    records = records_of(out)
    assert [r["image"]["source"] for r in records] == [str(i) for i in images]
    assert [r["answer"] for r in records] == [one_shot(i, Q1) for i in images]
    # the first two lines were kept byte for byte
    assert out.read_bytes().split(b"\n")[:2] == whole.split(b"\n")[:2]


def test_resume_knows_images_by_their_bytes_and_runs_by_their_settings(model, env, tmp_path):
    images = make_images(tmp_path / "p", 3, seed=2)
    out = tmp_path / "out.jsonl"
    p = run_imp("ask", *images[:2], "-q", Q1, "--model", model[0], "-n", N, "--output", out, env=env)
    assert p.returncode == 0, p.stderr
    moved = tmp_path / "moved.png"
    images[0].rename(moved)  # renamed: still the same picture, still done
    p = run_imp("ask", moved, *images[1:], "-q", Q1, "--model", model[0], "-n", N, "--output", out, "--resume",
                env=env)
    assert p.returncode == 0, p.stderr
    assert "2 answers already there" in p.stderr
    assert [r["image"]["source"] for r in records_of(out)] == [str(images[0]), str(images[1]), str(images[2])]
    # other settings are another run: everything is answered again, nothing is overwritten
    p = run_imp("ask", moved, *images[1:], "-q", Q1, "--model", model[0], "-n", N + 1, "--output", out,
                "--resume", env=env)
    assert p.returncode == 0, p.stderr
    records = records_of(out)
    assert len(records) == 6
    assert [r["sampling"]["max_tokens"] for r in records] == [N] * 3 + [N + 1] * 3


def test_output_file_rules(model, photo, env, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"answer": "x"}\n')
    p = run_imp("ask", photo, photo, "-q", Q1, "--model", model[0], "--output", out, env=env)
    assert p.returncode == 1 and p.stderr.splitlines() == [
        f"error: output file '{out}' already exists: --resume continues it (or remove it)"]
    p = run_imp("ask", photo, photo, "-q", Q1, "--model", model[0], "--output", out, "--resume", env=env)
    assert p.returncode == 1 and "line 1" in p.stderr and "not an `imp ask` record" in p.stderr
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
    assert_usage_error(run_imp("ask", photo, "-q", Q1, "--resume", env=env), "--resume needs --output")
    assert_usage_error(run_imp("ask", photo, "-q", Q1, "--shard", "3/3", env=env), "--shard")
    assert_usage_error(run_imp("ask", photo, "-q", Q1, "--shard", "x", env=env), "--shard")


# ------------------------------------------------------------------------------- bad inputs
def test_bad_images_are_error_records_and_the_run_goes_on(model, one_shot, env, tmp_path):
    good = make_images(tmp_path / "p", 4, seed=3)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:200])
    missing = tmp_path / "missing.png"
    url = f"http://127.0.0.1:{free_port()}/photo.png"  # nothing listens there
    order = [good[0], corrupt, good[1], missing, good[2], url, good[3]]
    out = tmp_path / "out.jsonl"
    p = run_imp("ask", *order, "-q", Q1, "--model", model[0], "-n", N, "--output", out, env=env)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and p.stdout == ""
    records = records_of(out)
    assert [r["image"]["source"] for r in records] == [str(s) for s in order]
    for source, r in zip(order, records):
        if source in (corrupt, missing, url):
            assert "answer" not in r and r["question"] == Q1, r  # an error line, not an answer record
        else:
            assert "error" not in r and r["answer"] == one_shot(source, Q1)
    assert "truncated or corrupt" in records[1]["error"] and str(corrupt) in records[1]["error"]
    assert "not found" in records[3]["error"] and str(missing) in records[3]["error"]
    assert "cannot fetch image URL" in records[5]["error"] and url in records[5]["error"]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors[:3] == [f"error: {records[i]['error']}" for i in (1, 3, 5)]
    assert errors[3] == f"error: 3 images could not be answered (error records in '{out}')"
    # --max-errors 2: the run stops at the second failure
    out2 = tmp_path / "out2.jsonl"
    p = run_imp("ask", *order, "-q", Q1, "--model", model[0], "-n", N, "--output", out2, "--max-errors", 2, env=env)
    assert p.returncode == 1
    assert [r["image"]["source"] for r in records_of(out2)] == [str(s) for s in order[:4]]
    assert "stopped after 2 images failed (--max-errors 2)" in p.stderr.splitlines()[-1]


def test_json_on_stdout_with_an_error_record(model, one_shot, env, tmp_path):
    """Without --output the records go to stdout (--json), errors included, in order."""
    good = make_images(tmp_path / "p", 2, seed=4)
    missing = tmp_path / "nope.jpg"
    p = run_imp("ask", good[0], missing, good[1], Q1, "--model", model[0], "-n", N, "--json", env=env)
    assert p.returncode == 1
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert ["error" in r for r in records] == [False, True, False]
    assert [r.get("answer") for r in records] == [one_shot(good[0], Q1), None, one_shot(good[1], Q1)]
    assert p.stderr.splitlines()[0] == f"error: cannot read image '{missing}': file not found"


# ------------------------------------------------------------------------------------ inputs
def test_images_from_stdin_is_streamed(model, one_shot, env, tmp_path):
    """Each line is answered before the next is even written: the list is read as it comes."""
    images = make_images(tmp_path / "p", 3, seed=5)
    out = tmp_path / "out.jsonl"
    with list_on_stdin("-q", Q1, "--model", model[0], "-n", N, "--output", out, env=env) as (proc, done):
        for i, image in enumerate(images):
            send(proc, image)
            deadline = time.monotonic() + 120
            while not (out.exists() and out.read_bytes().count(b"\n") == i + 1):
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "no record for a line already given"
                time.sleep(0.02)
    assert proc.returncode == 0, done["stderr"]
    assert done["stdout"] == ""
    assert [r["answer"] for r in records_of(out)] == [one_shot(i, Q1) for i in images]


def test_a_folder_means_its_images_recursively_in_sorted_order(model, env, tmp_path):
    root = tmp_path / "shots"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    sources = make_images(tmp_path / "src", 6, seed=6)
    layout = {"b.png": 0, "a.jpg": 1, "Z.PNG": 2, "sub/c.png": 3, "sub/deeper/d.bmp": 4, ".hidden/e.png": 5}
    for name, i in layout.items():
        Image.open(sources[i]).save(root / name, format={"jpg": "JPEG", "bmp": "BMP"}.get(name[-3:], "PNG"))
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "cat.gif.bak").write_bytes(b"nope")
    p = run_imp("ask", root, Q1, "--model", model[0], "-n", 1, "--json", env=env)
    assert p.returncode == 0, p.stderr
    seen = [json.loads(line)["image"]["source"] for line in p.stdout.splitlines()]
    assert seen == [str(root / n) for n in ("Z.PNG", "a.jpg", "b.png", "sub/c.png", "sub/deeper/d.bmp")]
    # --glob matches the path inside the folder ('*' crosses '/'), in place of the extensions
    p = run_imp("ask", root, Q1, "--glob", "sub/*.[bp][mn][pg]", "--model", model[0], "-n", 1, "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["image"]["source"] for line in p.stdout.splitlines()] == [
        str(root / "sub/c.png"), str(root / "sub/deeper/d.bmp")]
    # a folder in a list is walked the same way
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'sub'}\n\n{root / 'a.jpg'}\n")
    p = run_imp("ask", "--images-from", listing, "-q", Q1, "--model", model[0], "-n", 1, "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["image"]["source"] for line in p.stdout.splitlines()] == [
        str(root / "sub/c.png"), str(root / "sub/deeper/d.bmp"), str(root / "a.jpg")]


def test_shards_are_disjoint_and_cover_the_list(model, env, tmp_path):
    images = [str(p.relative_to(tmp_path)) for p in make_images(tmp_path / "p", 12, seed=7)]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{i}\n" for i in images))  # relative paths: the same hashes on every run
    shards = []
    for i in range(3):
        p = run_imp("ask", "--images-from", listing, "-q", Q1, "--shard", f"{i}/3", "--model", model[0], "-n", 1,
                    "--json", env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        shards.append([json.loads(line)["image"]["source"] for line in p.stdout.splitlines()])
    assert sorted(s for shard in shards for s in shard) == sorted(images)  # cover, no repeats
    assert all(shards), shards  # 12 images over 3 shards: each has some (so disjointness means something)
    from imp_cli.batch import shard_of

    for i, shard in enumerate(shards):  # each is the hash's choice, in the list's order
        assert shard == [s for s in images if shard_of(s, 3) == i]


# ---------------------------------------------------------------------------- cache, jobs, Ray
def test_a_batch_reads_the_prompt_cache_but_writes_none(model, env, tmp_path):
    images = make_images(tmp_path / "p", 3, seed=8)
    p = run_imp("ask", images[0], Q1, "--model", model[0], "-n", N, env=env)  # one image: writes its entry
    assert p.returncode == 0 and cache_entries(env) == 1
    p = run_imp("ask", *images, "-q", Q1, "--model", model[0], "-n", N, "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["cache"] for line in p.stdout.splitlines()] == ["hit", "miss", "miss"]
    assert cache_entries(env) == 1  # nothing written
    p = run_imp("ask", *images, "-q", Q1, "--model", model[0], "-n", N, "--json", "--cache", "write", env=env)
    assert p.returncode == 0, p.stderr
    assert cache_entries(env) == 3


def test_jobs_2_gives_the_records_of_jobs_1(model, env, tmp_path):
    images = make_images(tmp_path / "p", 6, seed=9)
    outs = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}.jsonl"
        p = run_imp("ask", *images, "-q", Q1, "-q", Q2, "--model", model[0], "-n", N, "--output", out,
                    "--jobs", jobs, "--threads", 2, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        outs[jobs] = records_of(out)

    def answers(records):
        return {(r["image"]["source"], r["image"]["sha256"], r["question"], r["answer"],
                 json.dumps(r["model"]), json.dumps(r["settings"])) for r in records}

    assert len(outs[2]) == len(outs[1]) == 12
    assert answers(outs[2]) == answers(outs[1])


RAY_CODE = r"""
import json, sys
import ray
from imp_cli.ray_data import ImpPredictor

text, mmproj, q, n, *paths = sys.argv[1:]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
kwargs = {"model": text, "mmproj": mmproj, "questions": [q], "max_tokens": int(n), "threads": 1}
out = {}
for how, ds, actors in (("paths", ray.data.from_items([{"path": p} for p in paths]), 2),
                        ("bytes", ray.data.read_binary_files(paths, include_paths=True), 1),
                        ("pixels", ray.data.read_images(paths, include_paths=True, mode="RGB"), 1)):
    # actors of half a CPU each: Ray's read tasks need a CPU of the 2 too
    rows = ds.map_batches(ImpPredictor, fn_constructor_kwargs=kwargs, concurrency=actors, batch_size=2,
                          num_cpus=0.5).take_all()
    out[how] = [json.loads(r["record"]) for r in rows]
print(json.dumps(out))
"""


def test_ray_records_equal_imp_ask_json(model, env, tmp_path):
    import ray  # noqa: F401  (the test extra installs it: missing, this fails rather than skips)
    images = make_images(tmp_path / "p", 4, seed=10)
    p = run_imp("ask", *images, "-q", Q1, "--model", model[0], "--mmproj", model[1], "-n", N, "--json", env=env)
    assert p.returncode == 0, p.stderr
    cli = {r["image"]["source"]: r for r in map(json.loads, p.stdout.splitlines())}
    env = {**env, "RAY_DISABLE_USAGE_STATS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    r = run_python(RAY_CODE, model[0], model[1], Q1, N, *images, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])

    def same(record: dict) -> dict:  # all but how long it took and what was reused from earlier answers
        return {k: v for k, v in record.items() if k not in ("timings", "cache", "usage")}

    for how in ("paths", "bytes"):
        assert sorted(x["image"]["source"] for x in got[how]) == sorted(cli)
        for record in got[how]:
            assert same(record) == same(cli[record["image"]["source"]]), how
    # pixels Ray decoded: the same answers (PNGs: no EXIF, same RGB); sha256 is of the pixels
    assert sorted((x["image"]["source"].split("/")[-1], x["answer"]) for x in got["pixels"]) == sorted(
        (s.split("/")[-1], rec["answer"]) for s, rec in cli.items())


# ---------------------------------------------------------------------------------- progress
def test_progress_lines_on_a_pipe_never_on_stdout(model, env, tmp_path):
    """Not a terminal: plain progress lines on stderr (every IMP_PROGRESS_SECONDS, 30 by default),
    a summary at the end; stdout holds the records only."""
    images = make_images(tmp_path / "p", 2, seed=11)
    env = {**env, "IMP_PROGRESS_SECONDS": "0.2"}
    with list_on_stdin("-q", Q1, "--model", model[0], "-n", N, "--json", env=env) as (proc, done):
        send(proc, images[0])
        # the run answers it, then waits for more of the list: meanwhile a line every 0.2 s, the
        # first ones possibly from before the answer ("0 images"), then "1 image" until more comes
        lines = [proc.stderr.readline().decode() for _ in range(3)]
        while not lines[-1].startswith("imp ask: 1 image,"):
            assert len(lines) < 200 and lines[-1].startswith("imp ask: 0 images,"), lines
            lines.append(proc.stderr.readline().decode())
        assert lines[-1].rstrip().endswith("0 errors"), lines
        send(proc, images[1])
    assert proc.returncode == 0, done["stderr"]
    stdout, stderr = done["stdout"], done["stderr"]
    assert [json.loads(x)["image"]["source"] for x in stdout.splitlines()] == [str(i) for i in images]
    last = stderr.splitlines()[-1]
    assert last.startswith("imp ask: 2 images answered, 0 failed, 0 done before, 2 answers in "), last
    assert "\x1b" not in stderr


def test_progress_bar_on_a_terminal(model, env, tmp_path):
    """stderr a terminal: a Rich bar that ends at done/total, answers per minute, errors."""
    import pexpect

    images = make_images(tmp_path / "p", 2, seed=12)
    out = tmp_path / "out.jsonl"
    child = pexpect.spawn(IMP, ["ask", *map(str, images), "-q", Q1, "--model", str(model[0]), "-n", str(N),
                                "--output", str(out)], env=env, encoding="utf-8", timeout=120, dimensions=(24, 160))
    child.expect(pexpect.EOF)
    child.close()
    shown = child.before
    assert child.exitstatus == 0, shown
    assert "imp ask" in shown and "2/2 images" in shown and "answers/min" in shown and "0 errors" in shown
    assert "Traceback" not in shown
    assert len(records_of(out)) == 2
