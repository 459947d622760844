"""Issue 24: one interface. One record schema for every --json answer (and serve's usage means
the same), flags that mean the same everywhere, random sampling unless seeded (the seed recorded
and reproducing), errors that name the mistake, `imp serve` without silent ignores, the store and
REPL details, and README tables generated from the CLI.

Most proofs are one CLI call and an exact message or exit code; every record line the suite's
run_imp sees is also validated against the schema (tests/helpers.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_ok, assert_one_line_error, assert_usage_error, clean_env, run_imp
from schema_check import check_record, errors, record_schema

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def model(converted):
    return converted("new", "float16", "square")


@pytest.fixture
def env(tmp_path):
    return clean_env(tmp_path)


# ------------------------------------------------------------------------------ (1) the record
def test_schema_validator_can_fail():
    """The schema check the whole suite relies on rejects what it should."""
    schema = record_schema()
    good = {"answer": "a cat", "question": "q", "model": {"name": "m", "text": "t.gguf", "mmproj": "p.gguf",
                                                           "quant": "F16", "mmproj_type": "F16"},
            "image": None, "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "max_tokens": 5},
            "settings": {"repack": True, "flash_attn": False}, "finish_reason": "stop", "cache": "off",
            "usage": {"prompt_tokens": 9, "evaluated_tokens": 9, "reused_tokens": 0, "completion_tokens": 2,
                      "total_tokens": 11},
            "timings": {"total_ms": 3.5, "prompt_ms": 1.0, "generation_tokens_per_s": 12.0}}
    assert errors(good, schema) == []
    bad = [
        {k: v for k, v in good.items() if k != "usage"},                       # a field missing
        {**good, "extra": 1},                                                  # a field the schema lacks
        {**good, "image": "photo.png"},                                        # image not an object
        {**good, "timings": {**good["timings"], "finish_reason": "stop"}},     # a field twice
        {**good, "timings": {**good["timings"], "load_s": 1.0}},               # a duration not in ms
        {**good, "model": {**good["model"], "type": "F16"}},                   # another name for the quant
        {**good, "finish_reason": ""},
    ]
    for record in bad:
        assert errors(record, schema), record


def test_ask_json_records_one_shape(model, photo, env):
    """Two questions, one image: the second reuses the prefix; the counts add up as OpenAI's do."""
    text, mmproj = model
    p = assert_ok(run_imp("ask", photo, "-q", QUESTION, "-q", "Is it red?", "-m", text, "-n", "4", "--json", env=env))
    records = [json.loads(line) for line in p.stdout.splitlines()]
    for r in records:
        check_record(r)
        u = r["usage"]
        assert u["prompt_tokens"] == u["evaluated_tokens"] + u["reused_tokens"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert r["timings"]["total_ms"] > 0 and not ({"finish_reason", "cache", "prompt_tokens"} & set(r["timings"]))
        assert r["model"] == {"name": r["model"]["name"], "text": str(text), "mmproj": str(mmproj),
                              "quant": "F16", "mmproj_type": "F16"}
        assert r["sampling"]["seed"] is None  # greedy: no randomness
    assert records[1]["usage"]["reused_tokens"] > 16 and records[1]["usage"]["evaluated_tokens"] < 16


def test_chat_json_records_have_model_and_image_objects(model, photo, env):
    text, _ = model
    p = assert_ok(run_imp("chat", photo, "-m", text, "-n", "3", "--json", env=env, stdin=b"Hello?\nAnd then?\n"))
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["turn"] for r in records] == [1, 2]
    assert all(r["image"]["source"] == str(photo) and r["model"]["text"] == str(text) for r in records)
    p = assert_ok(run_imp("chat", "-m", text, "-n", "3", "--json", env=env, stdin=b"Hello?\n"))
    assert json.loads(p.stdout)["image"] is None


def test_choices_record_has_finish_reason_and_cache_once(model, photo, env):
    text, _ = model
    p = assert_ok(run_imp("ask", photo, QUESTION, "-m", text, "--choices", "yes,no", "--json", env=env))
    r = json.loads(p.stdout)
    assert r["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 0 and r["usage"]["scored_tokens"] > 0
    assert "generation_tokens_per_s" not in r["timings"]  # nothing generated: no rate, not a null


def test_convert_and_models_list_name_the_quant_alike(checkpoint, tmp_path, env, model):
    out = tmp_path / "out"
    p = assert_ok(run_imp("convert", checkpoint("new"), "--out", out, "--quant", "f16", "--json", env=env))
    r = json.loads(p.stdout)
    assert r["quant"] == "F16" and r["mmproj_type"] == "F16" and r["total_ms"] > 0
    assert "text_type" not in r and "seconds" not in r
    assert_ok(run_imp("models", "import", model[0], model[1], "--name", "mine", env=env))
    (row,) = json.loads(assert_ok(run_imp("models", "list", "--json", env=env)).stdout)
    assert row["quant"] == "F16" and row["mmproj_type"] == "F16"


# ----------------------------------------------------------------------------- (3) sampling
def test_sampling_is_random_unless_seeded_and_the_seed_reproduces(model, photo, env):
    """Without --seed each answer draws a fresh seed (recorded); giving it back gives the same
    answer. Four answers at temperature 1.5 on a random-weight model: not all alike."""
    text, _ = model
    base = ("ask", photo, "-m", text, "-n", "8", "--temperature", "1.5", "--json")
    p = assert_ok(run_imp(*base, *sum((["-q", QUESTION] for _ in range(4)), []), env=env))
    records = [json.loads(line) for line in p.stdout.splitlines()]
    seeds = [r["sampling"]["seed"] for r in records]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 4
    assert len({r["answer"] for r in records}) > 1
    again = json.loads(assert_ok(run_imp(*base, "-q", QUESTION, "--seed", seeds[2], env=env)).stdout)
    assert again["answer"] == records[2]["answer"] and again["sampling"]["seed"] == seeds[2]


def test_session_rule_is_the_same_for_every_caller(model, photo):
    """The rule lives in the Session (ask, chat, serve and the Python API all answer through it)."""
    from imp_cli.engine import Sampling, with_seed
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import Session

    assert with_seed(Sampling(temperature=0.0, seed=5)).seed is None
    assert with_seed(Sampling(temperature=0.7, seed=5)).seed == 5
    assert isinstance(with_seed(Sampling(temperature=0.7)).seed, int)
    assert isinstance(with_seed(Sampling(temperature=0.7, seed=-1)).seed, int)
    with Session(read_pair(*model), threads=1, ctx=512) as session:
        staged = session.stage(load_image(str(photo)))
        a = session.answer(staged, QUESTION, sampling=Sampling(temperature=1.2), max_tokens=6).collect()
        b = session.answer(staged, QUESTION, sampling=Sampling(temperature=1.2, seed=a.seed), max_tokens=6).collect()
        assert a.seed is not None and (b.text, b.seed) == (a.text, a.seed)


# ------------------------------------------------------------------------------- (4) errors
@pytest.mark.parametrize("argv,code,phrases", [
    (["ask", "-m", "x.gguf", "what is this?"], 2, ["no image", "imp ask photo.jpg 'what is this?'"]),
    (["ask", "{photo}"], 2, ["no question", "imp ask {photo}"]),
    (["ask", "what is this?", "{photo}"], 2, ["the image comes first", "imp ask {photo} 'what is this?'"]),
    (["--model", "x", "ask"], 2, ["--model is an option of `imp ask`", "give it after the command"]),
    (["convert", "ckpt", "-q", "Q8_0"], 2, ["-q is `imp ask`'s --question", "--quant"]),
    (["pull", "-q", "Q8_0"], 2, ["--quant"]),
    (["ask", "{photo}", "q", "--json-schema", "{item.json}"], 2, ["--json-schema @{item.json}"]),
    (["ask", "{photo}", "q", "--grammar", "v.gbnf"], 2, ["--grammar @v.gbnf"]),
    (["ask", "{photo}", "q", "-m", "no-such-model"], 1, ["imp-v1-3b", "imp-v1.5-2b", "GGUF path", "repo id"]),
], ids=["no image", "no question", "reversed", "option before command", "convert -q", "pull -q",
        "schema without @", "grammar without @", "unknown model"])
def test_mistakes_are_named(photo, env, tmp_path, argv, code, phrases):
    item = tmp_path / "item.json"
    item.write_text('{"type": "object"}')
    fill = {"{photo}": str(photo), "{item.json}": str(item)}
    argv = [fill.get(a, a) for a in argv]
    phrases = [p.replace("{photo}", str(photo)).replace("{item.json}", str(item)) for p in phrases]
    p = run_imp(*argv, env=env)
    assert_one_line_error(p, *phrases, code=code)


def test_typo_suggests_once_and_every_error_says_error_lowercase(env):
    p = run_imp("aks", env=env)
    assert_one_line_error(p, "No such command 'aks'", code=2)
    assert p.stderr.count("Did you mean") == 1
    for argv in (["ask", "--bogus"], ["models", "rm"], ["cache", "nope"]):
        p = run_imp(*argv, env=env)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and "Error:" not in p.stderr, p.stderr


def test_unknown_model_lists_installed_names_too(model, photo, env):
    assert_ok(run_imp("models", "import", *model, "--name", "mine", env=env))
    assert_one_line_error(run_imp("ask", photo, "q", "-m", "nothing-here", env=env), "imp-v1-3b", "mine")


def test_model_folders_say_what_to_do(checkpoint, model, photo, env, tmp_path):
    ckpt = checkpoint("new")
    assert_one_line_error(run_imp("ask", photo, "q", "-m", ckpt, env=env), "checkpoint folder", f"imp convert {ckpt}")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a-F16.gguf", "b-F16.gguf"):
        (two / name).write_bytes(model[0].read_bytes()[:64])
    assert_one_line_error(run_imp("ask", photo, "q", "-m", two, env=env), "a-F16.gguf, b-F16.gguf")


def test_tune_hint_keeps_the_thread_count(model, photo, env):
    p = assert_ok(run_imp("ask", photo, "q", "-m", model[0], "-n", "1", "-t", "1", "-v", env=env))
    assert "run `imp tune -t 1` to measure" in p.stderr


# -------------------------------------------------------------------------------- (2) flags
def test_quant_choices_as_the_readme_writes_them_and_any_case(env):
    p = assert_ok(run_imp("convert", "--help", env={**env, "COLUMNS": "200"}))
    assert "Q4_K_M" in p.stdout and "q4_k_m" not in p.stdout
    assert " -q" not in p.stdout  # -q is ask's --question only
    # lowercase is accepted: the error is then about the missing folder, not the option
    assert_one_line_error(run_imp("convert", "/no/such/folder", "--quant", "q8_0", env=env), "/no/such/folder")


def test_threads_zero_means_physical_cores_everywhere_and_too_many_warns(env):
    import typer.main

    from imp_cli.app import app

    commands = typer.main.get_command(app).commands
    for command in ("ask", "chat", "serve", "tune", "convert", "pull"):
        (threads,) = [p for p in commands[command].params if p.name == "threads"]
        assert "0: one per physical core" in threads.help, command
    cpus = len(os.sched_getaffinity(0))
    p = run_imp("convert", "/no/such/folder", "-t", str(cpus + 1), env=env)
    assert p.returncode == 1
    assert p.stderr.splitlines()[0] == (f"warning: --threads {cpus + 1} is more than the {cpus} CPU{'s' if cpus != 1 else ''} "
                                        "here: llama.cpp gets slower with more threads than cores (0: one per physical core)")


# ------------------------------------------------------------------------ (6) store and REPL
def test_chat_system_command_shows_the_text(model, env):
    from imp_cli.prompts import PHI2_SYSTEM

    p = assert_ok(run_imp("chat", "-m", model[0], env=env, stdin=b"/system\n/system Be brief.\n/system\n"))
    assert f"system (the model's own): {PHI2_SYSTEM}" in p.stderr
    assert "system: Be brief." in p.stderr


def test_import_never_shadows_a_known_name_without_force(model, env):
    assert_one_line_error(run_imp("models", "import", *model, "--name", "imp-v1-3b", env=env),
                          "the name of the known model MILVLG/imp-v1-3b", "--force")
    assert_ok(run_imp("models", "import", *model, "--name", "imp-v1-3b", "--force", env=env))


def test_models_rm_several_aliases_and_one_confirmation_rule(model, env, tmp_path):
    for name in ("a", "b"):
        assert_ok(run_imp("models", "import", *model, "--name", name, env=env))
    assert_one_line_error(run_imp("models", "rm", "a", "b", env=env), "without confirmation", "--yes")
    assert_ok(run_imp("models", "remove", "a", "b", "--yes", env=env))  # several names; rm's alias
    assert assert_ok(run_imp("models", "ls", env=env)).stdout == ""  # list's alias: both gone
    cache = Path(env["IMP_HOME"]) / "cache"
    cache.mkdir(parents=True)
    (cache / ("0" * 64 + ".kv")).write_bytes(b"x")
    assert_one_line_error(run_imp("cache", "clear", env=env), "without confirmation", "--yes")
    assert "removed 1 entry" in assert_ok(run_imp("cache", "clear", "--yes", env=env)).stderr


def test_pull_a_local_checkpoint_converts_and_installs_it(checkpoint, env, photo):
    ckpt = checkpoint("new")
    p = assert_ok(run_imp("pull", ckpt, "--quant", "F16", "--no-tune", "--name", "local-tiny", env=env))
    assert p.stdout.strip().endswith("local-tiny")
    (row,) = json.loads(assert_ok(run_imp("models", "list", "--json", env=env)).stdout)
    assert (row["name"], row["quant"], row["source"]) == ("local-tiny", "F16", f"local:{Path(ckpt).resolve()}")
    assert_ok(run_imp("ask", photo, QUESTION, "-m", "local-tiny", "-n", "2", env=env))


def test_sizes_are_decimal_and_labelled_so(env):
    p = assert_ok(run_imp("cache", "info", env={**env, "IMP_CACHE_SIZE": "4G"}))
    assert "budget\t4.0 GB" in p.stdout
    p = assert_ok(run_imp("cache", "info", env={**env, "IMP_CACHE_SIZE": "1500M"}))
    assert "budget\t1.5 GB" in p.stdout


# ------------------------------------------------------------------------------ (7) README
def test_readme_flag_tables_are_the_clis():
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_flags.py"), "--check"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr


def test_readme_shows_the_record_schema_and_the_serve_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    schema = (ROOT / "imp_cli" / "schema" / "record.schema.json").read_text(encoding="utf-8")
    assert f"```json\n{schema}```" in readme
    from imp_cli.openai_fields import IGNORED, REFUSED

    table = readme.split("#### OpenAI fields", 1)[1]
    for field in (*IGNORED, *REFUSED, "response_format", "logprobs", "top_logprobs", "seed", "model"):
        assert f"| `{field}` |" in table, field


def test_models_list_has_a_header_on_a_terminal_only(model, env):
    import pexpect

    from helpers import IMP

    assert_ok(run_imp("models", "import", *model, "--name", "mine", env=env))
    assert not assert_ok(run_imp("models", "list", env=env)).stdout.startswith("NAME")  # a pipe: rows only
    child = pexpect.spawn(IMP, ["models", "list"], env=env, encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    lines = child.before.replace("\r", "").splitlines()
    assert lines[0] == "NAME\tSOURCE\tQUANT\tSIZE\tFOLDER" and lines[1].startswith("mine\t"), lines
