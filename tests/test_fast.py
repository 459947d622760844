"""Fast by default (issue 23), on the tiny models; the figures come from `make bench`.

- the prompt cache's KV copy happens after the answer, not before its first token, and the entry
  it makes is byte for byte the one a copy before the answer made; a restore of it answers as
  an uncached run does;
- `ttft_ms` (request start to the first answer token) replaces `first_token_ms`;
- a warm `imp ask` (a prompt-cache hit in a new process) imports nothing it does not use and does
  not read the GGUF headers again when the files have not changed since they were checked.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from helpers import clean_env, run_imp, run_python

QUESTION = "What is in the image?"
Q2 = "How many dogs are there?"
N = 12


@pytest.fixture(scope="module")
def model(converted):
    return converted("new", "float16", "square")


def _aged(*paths: Path) -> None:
    """Files written a minute ago (the pair check is remembered only for settled files)."""
    past = time.time() - 60
    for p in paths:
        os.utime(p, (past, past))


@pytest.fixture(scope="module")
def old_model(model, tmp_path_factory):
    """A copy of the model pair whose files are not brand new."""
    import shutil

    folder = tmp_path_factory.mktemp("settled")
    copies = tuple(Path(shutil.copy(p, folder / p.name)) for p in model)
    _aged(*copies)
    return copies


# ------------------------------------------------------------- the cache copy after the answer
def test_the_copy_after_the_answer_is_the_copy_before_it(model, photo):
    """Engine level: the KV state of the [system, image] prefix copied right after its prefill
    (the old order) and copied after the question and a whole answer, with the answer's
    positions dropped first (the new order), are the same bytes."""
    from imp_cli.engine import Engine, Sampling
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import make_prompt, stage_image

    with Engine(read_pair(*model), n_ctx=512, threads=1) as engine:
        staged = stage_image(engine.pair, load_image(str(photo)))
        prompt = make_prompt(engine, staged, QUESTION)
        image = engine.encode_image(staged.pixels, staged.key)
        engine.evaluate([prompt.head, image], logits=False)
        before = bytes(engine.save_state())
        n_prefix = len(prompt.head) + image.n_tokens
        copies = []
        engine.keep_prefix_state(n_prefix, lambda state, error: copies.append((state, error)))
        engine.evaluate([prompt.head, image, prompt.tail])
        assert copies == []  # not before the answer
        assert len(list(engine.generate(Sampling(ignore_eos=True), N))) > 0
        assert copies == []
        engine.flush_prefix_state()
        (state, error), = copies
        assert error == "" and bytes(state) == before
        # the answer's positions are gone, the prefix is still there to reuse
        assert engine.cached_prefix([prompt.head, image]) == n_prefix == len(engine._cached)
        engine.flush_prefix_state()  # nothing pending: nothing happens
        assert len(copies) == 1


def test_session_writes_the_entry_of_the_old_order_after_the_answer(model, photo, tmp_path, monkeypatch):
    """Session level: the entry file is byte-identical to the one the old order wrote (the same
    header, the state copied right after the prefix), the copy is made after the last answer
    token, and a new process restoring it answers as an uncached run."""
    from imp_cli import prompt_cache
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.prompt_cache import PromptCache
    from imp_cli.session import Session

    monkeypatch.setattr(prompt_cache.time, "time", lambda: 1_700_000_000.0)  # the header's "created"
    pair = read_pair(*model)
    seen = {}
    with Session(pair, threads=1, ctx=512, cache=PromptCache(tmp_path / "new", 10**9)) as s:
        engine = s.engine
        keep, save = engine.keep_prefix_state, engine.save_state

        def keep_and_copy_now(n, store):  # what the old order copied, at the moment it copied it
            seen["old"] = bytes(save())
            keep(n, store)

        def save_noting_when():
            seen["generated_at_copy"] = engine.timings.generated_tokens
            return save()

        monkeypatch.setattr(engine, "keep_prefix_state", keep_and_copy_now)
        monkeypatch.setattr(engine, "save_state", save_noting_when)
        stream = s.answer(s.stage(load_image(str(photo))), QUESTION, max_tokens=N)
        answer = stream.collect()
        assert "generated_at_copy" not in seen  # nothing copied while the answer streamed
    assert seen["generated_at_copy"] == answer.completion_tokens > 0  # the copy came after the last token
    (entry,) = sorted((tmp_path / "new").glob("*.kv"))
    header = PromptCache(tmp_path / "new").load(entry.stem, engine.kv_layout()).header
    old = PromptCache(tmp_path / "old", 10**9)
    assert old.store(entry.stem, {k: header[k] for k in ("layout", "prefix_tokens", "model", "image")},
                     seen["old"])
    assert entry.read_bytes() == old.path(entry.stem).read_bytes()

    with Session(pair, threads=1, ctx=512, cache=PromptCache(tmp_path / "new", 10**9)) as warm:
        got = warm.answer(warm.stage(load_image(str(photo))), Q2, max_tokens=N).collect()
    with Session(pair, threads=1, ctx=512, cache=None) as fresh:
        want = fresh.answer(fresh.stage(load_image(str(photo))), Q2, max_tokens=N).collect()
    assert got.cache == "hit" and want.cache == "off"
    assert got.tokens == want.tokens and got.text == want.text


def test_each_image_of_a_run_gets_its_entry(model, photo, tmp_path):
    """The copy put off for one image is made when the next image's prefix replaces it."""
    from PIL import Image

    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.prompt_cache import PromptCache
    from imp_cli.session import Session

    other = tmp_path / "other.png"
    Image.open(photo).rotate(90, expand=True).save(other)
    pair = read_pair(*model)
    with Session(pair, threads=1, ctx=512, cache=PromptCache(tmp_path / "c", 10**9)) as s:
        for path in (photo, other):
            assert s.answer(s.stage(load_image(str(path))), QUESTION, max_tokens=4).collect().cache == "miss"
        s.cache.wait()  # the background write of the first image's entry
        assert len(list((tmp_path / "c").glob("*.kv"))) == 1  # the first; the second's at close
        again = s.answer(s.stage(load_image(str(other))), Q2, max_tokens=4).collect()
        assert again.cache == "hit" and again.timings["cache_read_ms"] == 0  # still in memory
    assert len(list((tmp_path / "c").glob("*.kv"))) == 2
    with Session(pair, threads=1, ctx=512, cache=PromptCache(tmp_path / "c", 10**9)) as s:
        for path in (photo, other):
            assert s.answer(s.stage(load_image(str(path))), Q2, max_tokens=4).collect().cache == "hit"


# -------------------------------------------------------------------------------- ttft_ms
def test_json_timings_have_ttft_ms_and_no_first_token_ms(imp_bin, model, photo, tmp_path):
    env = clean_env(tmp_path)
    records = []
    for question in (QUESTION, Q2):  # a miss, then a hit in a new process
        p = run_imp("ask", photo, question, "-m", model[0], "-n", N, "--json", env=env)
        assert p.returncode == 0, p.stderr
        records.append(json.loads(p.stdout))
    assert [r["cache"] for r in records] == ["miss", "hit"]
    for r in records:
        t = r["timings"]
        assert "first_token_ms" not in t and not any(k.startswith("_") for k in t)
        # the request's phases before the first token all lie inside it
        before = t["image_encode_ms"] + t["vision_load_ms"] + t["cache_read_ms"] + t["prompt_ms"]
        assert 0 < before <= t["ttft_ms"] + 0.05  # (each rounded to 0.01 ms)
        assert t["load_ms"] > 0 and t["generation_tokens_per_s"] > 0
    assert records[0]["timings"]["cache_save_ms"] == 0  # the copy was not in the answer's path


# --------------------------------------------------------------------- the warm answer's floor
# What a prompt-cache hit never uses: the GGUF reader (the pair check is remembered), the vision
# tower's bindings, the Hub client and the converter, llama-cpp-python's high-level classes (and
# with them jinja2, diskcache, sqlite3), an HTTP client, package metadata, and rich when nothing
# goes to stderr.
NOT_ON_A_HIT = ("gguf", "yaml", "sentencepiece", "llama_cpp.mtmd_cpp", "llama_cpp.llama", "llama_cpp.llama_chat_format",
                "jinja2", "diskcache", "sqlite3", "huggingface_hub", "convert.hub", "convert.pipeline", "torch",
                "urllib.request", "http.client", "email", "importlib.metadata", "rich",
                "imp_cli.serve", "imp_cli.chat", "imp_cli.constrain")

_MODULES = """
import atexit, json, sys
listing = sys.argv[1]
atexit.register(lambda: open(listing, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["imp", *sys.argv[2:]]
from imp_cli.app import main
main()
"""


def test_a_hit_imports_nothing_it_does_not_use(imp_bin, old_model, photo, tmp_path):
    env = clean_env(tmp_path)
    listing = tmp_path / "modules.json"
    args = ["ask", photo, "-m", old_model[0], "-n", "4", "--json"]
    miss = run_python(_MODULES, listing, *args, QUESTION, env=env)
    assert miss.returncode == 0 and json.loads(miss.stdout)["cache"] == "miss", miss.stderr
    on_miss = set(json.loads(listing.read_text()))
    assert "gguf" in on_miss and "llama_cpp.mtmd_cpp" in on_miss  # the witnesses work
    hit = run_python(_MODULES, listing, *args, Q2, env=env)
    assert hit.returncode == 0 and json.loads(hit.stdout)["cache"] == "hit", hit.stderr
    on_hit = set(json.loads(listing.read_text()))
    assert "llama_cpp" in on_hit and "imp_cli.engine" in on_hit
    assert sorted(m for m in on_hit if any(m == n or m.startswith(n + ".") for n in NOT_ON_A_HIT)) == []


def test_the_pair_check_is_remembered_by_file_identity(old_model, tmp_path, monkeypatch):
    from imp_cli import modelfiles
    from imp_cli.errors import ImpError

    monkeypatch.setenv("IMP_HOME", str(tmp_path / "home"))
    first = modelfiles.read_pair(*old_model)
    assert (tmp_path / "home" / "pairs.json").exists()
    real_read = modelfiles._read

    def no_reading(path):
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(modelfiles, "_read", no_reading)
    assert modelfiles.read_pair(*old_model) == first
    assert modelfiles.read_pair(str(old_model[0]), str(old_model[1])) == first  # the same files

    # a changed file (a new mtime: the same bytes do not matter) is checked again
    text = old_model[0]
    os.utime(text, (time.time() - 30, time.time() - 30))
    with pytest.raises(AssertionError, match="read again"):
        modelfiles.read_pair(*old_model)
    monkeypatch.setattr(modelfiles, "_read", real_read)
    assert modelfiles.read_pair(*old_model) == first

    # a file changed in place, however quickly: it is checked again and its fault found
    data = bytearray(text.read_bytes())
    data[:4] = b"GGUX"
    text.write_bytes(bytes(data))
    with pytest.raises(ImpError, match="not a GGUF file"):
        modelfiles.read_pair(*old_model)
    data[:4] = b"GGUF"
    text.write_bytes(bytes(data))
    # just written: checked every time until it has settled (its mtime may not have moved)
    monkeypatch.setattr(modelfiles, "_read", no_reading)
    with pytest.raises(AssertionError, match="read again"):
        modelfiles.read_pair(*old_model)
    monkeypatch.setattr(modelfiles, "_read", real_read)
    _aged(text)
    assert modelfiles.read_pair(*old_model) == first

    # a corrupt or foreign memo is only a miss
    (tmp_path / "home" / "pairs.json").write_text("{not json")
    assert modelfiles.read_pair(*old_model) == first


def test_the_bindings_alone_then_the_whole_package_on_demand(tmp_path):
    """imp loads llama-cpp-python's ctypes bindings without its package __init__; everything
    else in the package still works in the same process, and llama.cpp's log stays imp's."""
    code = """
import sys
from imp_cli.engine import llama_bindings
lc = llama_bindings()
import llama_cpp
assert llama_cpp is lc and lc.__version__ and lc.llama_backend_init
from llama_cpp import mtmd_cpp
assert "llama_cpp.llama" not in sys.modules and "jinja2" not in sys.modules
from convert.native import native_log
native_log.install(False)
assert llama_cpp.Llama.__name__ == "Llama" and "llama_cpp.llama" in sys.modules
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Llava15ChatHandler
print("ok")
"""
    p = run_python(code, env=clean_env(tmp_path))
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr


def test_crc32_on_every_core_is_zlibs():
    """An entry's checksum is CRC-32 as before (the entries stay the same bytes); a large payload's
    parts are summed on several threads and combined."""
    import zlib

    from imp_cli.prompt_cache import crc32, crc32_combine

    rng = __import__("random").Random(0)
    for n in (0, 1, 7, 4097, (32 << 20) + 5):
        data = rng.randbytes(n)
        assert crc32(data) == zlib.crc32(data), n
        for cut in {0, 1, n // 3, n}:
            assert crc32_combine(zlib.crc32(data[:cut]), zlib.crc32(data[cut:]), n - cut) == zlib.crc32(data)
