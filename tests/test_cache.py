"""The Session and its prompt cache: a cached prefix must give exactly the uncached answer.

- through the command, across processes: miss, then hit, then --no-cache, same answer;
- in-process: the first-step logits after a restore equal a fresh evaluation (1e-4 x std), and the
  vision tower is not loaded on a hit;
- a corrupt, truncated, foreign or stale entry is ignored and removed, never used;
- the budget is kept by evicting the least recently used entries; concurrent writers never leave
  a broken entry; a full disk costs the cache, not the answer;
- `-q` answers equal one question per call; memory stays that of one image for many images.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import clean_env, run_imp
from factory import predictable_ids

QUESTION = "What is in the image?"
Q2 = "How many dogs are there?"
N = 16
LAYOUTS_ASPECTS = [("new", "square"), ("new", "pad"), ("old", "square"), ("old", "pad")]
REUSE_TOL = 1e-4  # a restored state holds the very same KV values: only rounding may differ


def ask_json(imp_bin, image, model, *extra, env, question=QUESTION) -> dict:
    p = run_imp("ask", image, question, "--model", model, "-n", N, "--json", *extra, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def cache_files(env) -> list[Path]:
    return sorted((Path(env["IMP_HOME"]) / "cache").glob("*.kv"))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    ids = predictable_ids()
    return float(np.abs(a[ids] - b[ids]).max() / b[ids].std())


@pytest.fixture
def env(tmp_path):
    return clean_env(tmp_path)


@pytest.fixture(scope="module")
def model(converted):
    return converted("new", "float16", "square")


# ----------------------------------------------------------------------- across processes (CLI)
@pytest.mark.parametrize("layout,aspect", LAYOUTS_ASPECTS)
def test_hit_in_a_new_process_equals_no_cache(imp_bin, converted, photo, env, layout, aspect):
    text, _ = converted(layout, "float16", aspect)
    cold = ask_json(imp_bin, photo, text, env=env)
    assert cold["cache"] == "miss" and len(cache_files(env)) == 1
    warm = ask_json(imp_bin, photo, text, env=env, question=Q2)  # another question, same image
    off = ask_json(imp_bin, photo, text, "--no-cache", env=env, question=Q2)
    assert warm["cache"] == "hit" and off["cache"] == "off"
    assert warm["answer"] == off["answer"]
    assert warm["usage"]["completion_tokens"] == off["usage"]["completion_tokens"]
    # the hit evaluated only the question's tokens; the image was neither loaded nor encoded
    prefix = off["usage"]["evaluated_tokens"] - warm["usage"]["evaluated_tokens"]
    assert warm["usage"]["reused_tokens"] == prefix > 16
    assert warm["timings"]["vision_load_ms"] == 0 and warm["timings"]["image_encode_ms"] == 0
    assert off["timings"]["vision_load_ms"] > 0
    assert len(cache_files(env)) == 1  # --no-cache neither read nor wrote


def test_imp_cache_env_off(imp_bin, model, photo, env):
    env["IMP_CACHE"] = "off"
    assert ask_json(imp_bin, photo, model[0], env=env)["cache"] == "off"
    assert cache_files(env) == []


def test_copied_model_hits_and_changed_model_misses(imp_bin, model, photo, env, tmp_path):
    """The key is the files' content, not their path."""
    text, mmproj = model
    ask_json(imp_bin, photo, text, env=env)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(text, copy / text.name)
    shutil.copy(mmproj, copy / mmproj.name)
    assert ask_json(imp_bin, photo, copy / text.name, env=env)["cache"] == "hit"
    # One byte of the last tensor's data changed: another model, whatever its path or name.
    data = bytearray((copy / text.name).read_bytes())
    data[-3] ^= 0x01
    (copy / text.name).write_bytes(data)
    assert ask_json(imp_bin, photo, copy / text.name, env=env)["cache"] == "miss"
    assert len(cache_files(env)) == 2


def test_same_pixels_from_another_file_hit(imp_bin, model, photo, env, tmp_path):
    """The image part of the key is the preprocessed pixels: the same picture re-encoded hits."""
    ask_json(imp_bin, photo, model[0], env=env)
    bmp = tmp_path / "same.bmp"
    Image.open(photo).save(bmp)
    assert ask_json(imp_bin, bmp, model[0], env=env)["cache"] == "hit"


# --------------------------------------------------------------------------------- in-process
def _session(text, mmproj, cache_dir=None, budget=10**9):
    from imp_cli.modelfiles import read_pair
    from imp_cli.prompt_cache import PromptCache
    from imp_cli.session import Session

    cache = PromptCache(cache_dir, budget) if cache_dir else None
    return Session(read_pair(text, mmproj), threads=1, ctx=512, cache=cache)


@pytest.mark.parametrize("layout,aspect", LAYOUTS_ASPECTS)
def test_restored_prefix_gives_the_same_logits(converted, photo, tmp_path, layout, aspect):
    from imp_cli.images import load_image

    text, mmproj = converted(layout, "float16", aspect)
    image = load_image(str(photo))
    with _session(text, mmproj, tmp_path) as first:
        prompt = first.prompt(first.stage(image), QUESTION)
        assert first.prefill(prompt)[0] == "miss"
    with _session(text, mmproj) as fresh:
        prompt = fresh.prompt(fresh.stage(image), Q2)
        assert fresh.prefill(prompt) == ("off", 0)
        expected = fresh.engine.last_logits()
    with _session(text, mmproj, tmp_path) as warm:
        prompt = warm.prompt(warm.stage(image), Q2)
        status, reused = warm.prefill(prompt)
        assert status == "hit" and reused == len(prompt.head) + prompt.image.n_tokens
        assert not warm.engine.vision_loaded  # the mmproj was never loaded
        assert rel(warm.engine.last_logits(), expected) < REUSE_TOL
        # and generation after a restore is the uncached generation
        got = warm.answer(warm.stage(image), Q2, max_tokens=N).collect()
    with _session(text, mmproj) as fresh:
        want = fresh.answer(fresh.stage(image), Q2, max_tokens=N).collect()
    assert got.text == want.text and got.cache == "hit" and want.cache == "off"


def test_second_question_in_process_reuses_memory_not_disk(model, photo, tmp_path):
    from imp_cli.images import load_image

    with _session(*model, tmp_path) as s:
        staged = s.stage(load_image(str(photo)))
        a = s.answer(staged, QUESTION, max_tokens=4).collect()
        s.cache.wait()
        # the entry for [system, image] is not written yet (its KV copy waits until the prefix
        # leaves the KV cache or the session ends, issue 23): a second question can only find
        # the prefix in memory
        assert sorted(tmp_path.glob("*.kv")) == []
        b = s.answer(staged, Q2, max_tokens=4).collect()
        assert a.cache == "miss" and b.cache == "hit"
        assert b.timings["cache_read_ms"] == 0  # nothing read back from disk
        assert b.reused_tokens >= 16
    assert len(sorted(tmp_path.glob("*.kv"))) == 1  # written once, at close, not again for the hit


# ---------------------------------------------------------------------------- damaged entries
def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "payload bit flip":
        data[-100] ^= 0x40
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "foreign magic":
        data[:8] = b"NOTIMPKV"
    elif how == "other format version":
        data[8] = 99
    elif how == "other KV layout":
        n = int.from_bytes(data[12:16], "little")
        header = json.loads(data[16:16 + n])
        header["layout"]["type_k"] = 0  # F32 K cache: another context type
        blob = json.dumps(header, separators=(",", ":")).encode()
        data = data[:12] + len(blob).to_bytes(4, "little") + blob + data[16 + n:]
    elif how == "garbage header":
        data[16:40] = b"\xff" * 24
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["payload bit flip", "truncated", "empty", "foreign magic",
                                 "other format version", "other KV layout", "garbage header"])
def test_damaged_entry_is_ignored_and_replaced(imp_bin, model, photo, env, how):
    reference = ask_json(imp_bin, photo, model[0], "--no-cache", env=env)
    ask_json(imp_bin, photo, model[0], env=env)
    (entry,) = cache_files(env)
    _damage(entry, how)
    p = run_imp("ask", photo, QUESTION, "--model", model[0], "-n", N, "--json", "-v", env=env)
    assert p.returncode == 0, p.stderr
    record = json.loads(p.stdout)
    assert record["cache"] == "miss" and record["answer"] == reference["answer"]
    assert "prompt cache: ignoring" in p.stderr and "Traceback" not in p.stderr
    # the damaged entry was removed and a good one written in its place
    assert ask_json(imp_bin, photo, model[0], env=env)["cache"] == "hit"


def test_damage_is_silent_without_verbose(imp_bin, model, photo, env):
    ask_json(imp_bin, photo, model[0], env=env)
    _damage(cache_files(env)[0], "payload bit flip")
    p = run_imp("ask", photo, QUESTION, "--model", model[0], "-n", N, env=env)
    assert p.returncode == 0 and p.stderr == ""


def test_full_disk_costs_only_the_cache(imp_bin, model, photo, env):
    """A write that fails (here: a file-size limit, EFBIG) leaves no entry and no temporary file,
    and the answer is the same."""
    reference = ask_json(imp_bin, photo, model[0], "--no-cache", env=env)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    p = run_imp("ask", photo, QUESTION, "--model", model[0], "-n", N, "--json", "-v",
                env=env, preexec_fn=small_files)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["answer"] == reference["answer"]
    assert "could not write" in p.stderr
    folder = Path(env["IMP_HOME"]) / "cache"
    assert not list(folder.glob("*.kv")) and not list(folder.glob("*.tmp"))


# ----------------------------------------------------------------------- budget and concurrency
def test_least_recently_used_entries_are_evicted(tmp_path):
    from imp_cli.prompt_cache import PromptCache, entry_key

    layout = {"v": 1}
    keys = [entry_key(n=i) for i in range(5)]
    probe = PromptCache(tmp_path / "probe", budget=10**6)
    probe.store(keys[0], {"layout": layout}, bytes(1000))
    size = probe.path(keys[0]).stat().st_size  # header + payload
    cache = PromptCache(tmp_path, budget=3 * size + size // 2)  # room for three entries
    for i, key in enumerate(keys):
        assert cache.store(key, {"layout": layout}, bytes([i]) * 1000)
        os.utime(cache.path(key), (1000 + i, 1000 + i))  # a clear order, whatever the clock
        if i == 2:
            assert cache.load(keys[0], layout) is not None  # a use: keys[0] becomes the newest
            os.utime(cache.path(keys[0]), (1002.5, 1002.5))
    info = cache.info()
    assert info["entries"] == 3 and info["bytes"] <= cache.budget
    present = [k for k in keys if cache.path(k).exists()]
    assert present == [keys[0], keys[3], keys[4]]
    assert bytes(cache.load(keys[4], layout).payload) == bytes([4]) * 1000


def test_entry_over_the_budget_is_not_stored(tmp_path):
    from imp_cli.prompt_cache import PromptCache, entry_key

    notes = []
    cache = PromptCache(tmp_path, budget=500, note=notes.append)
    assert not cache.store(entry_key(n=1), {"layout": {}}, b"x" * 1000)
    assert cache.info()["entries"] == 0 and "exceeds the budget" in notes[0]


def _writer(folder: str, worker: int, rounds: int) -> None:
    from imp_cli.prompt_cache import PromptCache, entry_key

    cache = PromptCache(Path(folder), budget=10**9)
    for r in range(rounds):
        payload = bytes([worker]) * (50_000 + 1000 * r)
        cache.store(entry_key(shared=True), {"layout": {"w": 1}, "writer": worker}, payload)
        loaded = cache.load(entry_key(shared=True), {"w": 1})
        # a reader never sees a mixture: the payload is one writer's, whole
        assert loaded is not None and len(set(loaded.payload)) == 1


def test_concurrent_writers_never_corrupt_an_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    from imp_cli.prompt_cache import PromptCache, entry_key

    loaded = PromptCache(tmp_path).load(entry_key(shared=True), {"w": 1})
    assert loaded is not None and len(set(loaded.payload)) == 1
    assert not list(tmp_path.glob("*.tmp")) and len(list(tmp_path.glob("*.kv"))) == 1


def test_two_imp_processes_at_once(imp_bin, model, photo, env):
    reference = ask_json(imp_bin, photo, model[0], "--no-cache", env=env)
    args = [imp_bin, "ask", str(photo), QUESTION, "--model", str(model[0]), "-n", str(N), "--json"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [json.loads(o)["answer"] for o, _ in outs] == [reference["answer"]] * 2
    assert len(cache_files(env)) == 1
    assert ask_json(imp_bin, photo, model[0], env=env)["cache"] == "hit"


# ------------------------------------------------------------------------------ imp cache ...
def test_cache_info_and_clear(imp_bin, model, photo, env):
    ask_json(imp_bin, photo, model[0], env=env)
    p = run_imp("cache", "info", "--json", env=env)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["entries"] == 1 and info["bytes"] == cache_files(env)[0].stat().st_size
    assert Path(info["folder"]) == Path(env["IMP_HOME"]) / "cache" and info["budget"] == 4 * 1000**3
    env["IMP_CACHE_SIZE"] = "1.5G"
    assert json.loads(run_imp("cache", "info", "--json", env=env).stdout)["budget"] == 1_500_000_000
    p = run_imp("cache", "clear", "--yes", env=env)  # a script says --yes (as for imp models rm)
    assert p.returncode == 0 and p.stdout == "" and "removed 1 entry" in p.stderr
    assert cache_files(env) == []


def test_bad_cache_size_is_one_line(imp_bin, model, photo, env):
    env["IMP_CACHE_SIZE"] = "lots"
    p = run_imp("ask", photo, QUESTION, "--model", model[0], env=env)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.splitlines() == ["error: invalid cache size 'lots' (use e.g. 4G, 500M or a number of bytes)"]


# ------------------------------------------------------------------------- several questions
def test_several_questions_equal_one_per_call(imp_bin, model, photo, env, tmp_path):
    other = tmp_path / "other.png"
    Image.open(photo).rotate(90, expand=True).save(other)
    singles = {(img, q): ask_json(imp_bin, img, model[0], "--no-cache", env=env, question=q)["answer"]
               for img in (photo, other) for q in (QUESTION, Q2)}
    p = run_imp("ask", photo, other, "-q", QUESTION, "-q", Q2, "--model", model[0], "-n", N,
                "--json", env=env)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(r["image"]["source"], r["question"]) for r in records] == [
        (str(photo), QUESTION), (str(photo), Q2), (str(other), QUESTION), (str(other), Q2)]
    assert [r["answer"] for r in records] == [singles[(Path(r["image"]["source"]), r["question"])] for r in records]
    # later questions about an image evaluate only their own tokens
    for first, second in (records[0:2], records[2:4]):
        assert second["usage"]["reused_tokens"] >= first["usage"]["evaluated_tokens"] - 12
        assert second["usage"]["evaluated_tokens"] < 16
    # plain output: one header per answer
    p = run_imp("ask", photo, "-q", QUESTION, "-q", Q2, "--model", model[0], "-n", N, env=env)
    assert p.stdout == (f"==> {photo} | {QUESTION} <==\n{singles[(photo, QUESTION)]}\n\n"
                        f"==> {photo} | {Q2} <==\n{singles[(photo, Q2)]}\n")


def test_questions_from_file_and_stdin(imp_bin, model, photo, env, tmp_path):
    listing = tmp_path / "questions.txt"
    listing.write_text(f"{QUESTION}\n\n{Q2}\n")
    from_file = run_imp("ask", photo, "--questions-from", listing, "--model", model[0], "-n", N,
                        "--json", env=env)
    from_stdin = run_imp("ask", photo, "--questions-from", "-", "--model", model[0], "-n", N,
                         "--json", env=env, stdin=listing.read_bytes())
    assert from_file.returncode == from_stdin.returncode == 0, (from_file.stderr, from_stdin.stderr)
    answers = [json.loads(line)["answer"] for line in from_file.stdout.splitlines()]
    assert len(answers) == 2 and answers == [json.loads(line)["answer"] for line in from_stdin.stdout.splitlines()]


def test_questions_from_and_image_both_on_stdin_is_usage_error(imp_bin, model, env):
    p = run_imp("ask", "-", "--questions-from", "-", "--model", model[0], env=env)
    assert p.returncode == 2 and "standard input" in p.stderr and "Traceback" not in p.stderr


def test_empty_questions_file_is_one_line(imp_bin, model, photo, env, tmp_path):
    empty = tmp_path / "none.txt"
    empty.write_text("\n\n")
    p = run_imp("ask", photo, "--questions-from", empty, "--model", model[0], env=env)
    assert p.returncode == 1 and p.stderr.splitlines() == [f"error: no questions in '{empty}'"]


# ------------------------------------------------------------------------------ bounded memory
def _peak_rss_kb(args: list[str], env: dict) -> int:
    """Peak RSS of one child process, read by a wrapper that runs nothing else."""
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
            "assert p.returncode == 0, p.returncode\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr.decode()
    return int(out.stdout)


def test_many_images_run_in_the_memory_of_one(imp_bin, model, env, tmp_path):
    """Every image used to be decoded up front and every embedding kept: 200 images of 400 x 400
    (480 kB decoded each) would hold 96 MB. Now each image is loaded in its turn."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(200):
        path = tmp_path / f"img{i:03d}.bmp"
        Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    base = [imp_bin, "ask", "-q", QUESTION, "--model", str(model[0]), "-n", "1", "--no-cache"]
    few = _peak_rss_kb(base[:2] + paths[:5] + base[2:], env)
    many = _peak_rss_kb(base[:2] + paths + base[2:], env)
    assert many - few < 20_000, (few, many)  # kB: within a few MB, not hundreds


# ------------------------------------------------------------------------------ native errors
def test_native_error_lines_are_kept():
    """ggml's levels are INFO=2, WARN=3, ERROR=4: the newest ERROR names the failure."""
    from convert.native import NativeLog

    log = NativeLog()
    log.handle(2, "llama_model_loader: loaded meta data\n")
    assert log.last_error() == ""
    log.handle(4, "llama_model_load: error loading model: tensor 'x' data is not within the file bounds")
    log.handle(5, ", model is corrupted or incomplete\n")  # CONT continues the previous line
    log.handle(4, "llama_model_load_from_file_impl: failed to load model\n")  # an echo of the cause
    log.handle(3, "a warning after the error\n")
    assert log.last_error() == ("llama_model_load: error loading model: tensor 'x' data is not within "
                                "the file bounds, model is corrupted or incomplete")


def test_native_load_failure_names_the_cause(model, tmp_path):
    """A text GGUF cut short after a valid header, given to the engine past the pair check:
    llama.cpp's own ERROR line is the message."""
    from dataclasses import replace

    from imp_cli.engine import Engine, EngineError
    from imp_cli.modelfiles import read_pair

    pair = read_pair(*model)
    cut = tmp_path / "cut.gguf"
    data = model[0].read_bytes()
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(EngineError) as e:
        Engine(replace(pair, text_path=cut), n_ctx=256, threads=1)
    message = str(e.value)
    assert "could not load cut.gguf" in message and "file bounds" in message, message


def test_answer_without_an_image(model):
    """A conversation with no picture: the template without `<image>\\n`, the vision tower never
    loaded, the cache not involved."""
    with _session(*model) as s:
        prompt = s.prompt(None, QUESTION)
        assert prompt.image is None and prompt.tail == []
        expected = s.engine.tokenize(
            "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            f"helpful, detailed, and polite answers to the user's questions. USER: {QUESTION} ASSISTANT:")
        assert prompt.head == expected
        result = s.answer(None, QUESTION, max_tokens=4).collect()
        assert result.cache == "off" and result.prompt_tokens == len(expected)
        assert result.completion_tokens >= 1 and not s.engine.vision_loaded
