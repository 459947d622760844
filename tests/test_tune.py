"""Weight repacking and flash attention chosen per machine (`imp tune`, DESIGN.md section 6).

  - every setting reaches llama.cpp (its own log says so) and does not change the answer: on the
    F16 tiny model all four give the oracle's greedy tokens; on a Q4_K_M model whose weights are
    really repacked, repacking keeps the greedy tokens, and flash attention moves the logits by
    less than a stated tolerance (top-1 changes only where the reference has a near-tie);
  - the tuning file: written atomically, keyed, read back; a corrupt or foreign file is ignored
    with a note; explicit overrides win over it;
  - `imp tune` and `imp pull` end to end through the installed command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from helpers import clean_env, run_imp
from factory import TINY, Sizes
from test_ask import (LOGITS_TOL, N_TOKENS, QUESTION, _torch_one_thread, as_imp_sees_it,  # noqa: F401
                      engine_greedy, live, prompt_segments, rel_diff)

ALL = [(r, f) for r in (True, False) for f in (False, True)]
# Q4_K rows must be a multiple of 256 wide for llama.cpp to quantize (and then repack) them; the
# TINY model's 64-wide rows fall back to Q5_0, which has no repacked kernels.
REPACKABLE = Sizes(**{**TINY.__dict__, "hidden_size": 256, "intermediate_size": 512})
# Tolerances as fractions of the reference's logit std, measured here (AVX-512 EPYC) on the
# REPACKABLE Q4_K_M model: repacked vs plain Q4_K kernels 7.9e-3 to 8.8e-3 (they quantize the
# activations differently); flash attention on vs off 1.8e-2 to 3.5e-2 (its F16 accumulation,
# amplified by the activation quantization; on the F16 model it is 1.6e-3, inside LOGITS_TOL).
# About the size of Q8_0's own quantization error (~5e-2, DESIGN.md section 4).
REPACK_TOL = 2e-2
FLASH_TOL = 6e-2
FORCED = (" The photo shows a big red bus and a small dog. The dog is sitting, and the bus is on "
          "the street near a tall building.")


def engine(pair, repack: bool, flash_attn: bool, verbose: bool = False):
    from imp_cli.engine import Engine, Tuning

    return Engine(pair, n_ctx=1024, threads=1, verbose=verbose, tuning=Tuning(repack, flash_attn))


def logged_engine(pair, repack: bool, flash_attn: bool, capsys):
    """An engine with llama.cpp's log on (-v), after checking that the log shows the settings."""
    capsys.readouterr()
    eng = engine(pair, repack, flash_attn, verbose=True)
    llama_log_says(capsys.readouterr().err, repack, flash_attn)
    return eng


def llama_log_says(err: str, repack: bool, flash_attn: bool) -> None:
    """llama.cpp's own log (-v) shows the settings it ran with."""
    assert ("CPU_REPACK model buffer" in err) == repack, err[-2000:]
    assert re.search(r"flash_attn\s+= " + ("enabled" if flash_attn else "disabled"), err), err[-2000:]


@pytest.fixture(scope="module")
def f16_pair(converted):
    from imp_cli.modelfiles import read_pair

    return read_pair(*converted("new", "float16", "square"))


@pytest.fixture(scope="module")
def q4_pair(checkpoint, tmp_path_factory):
    from convert.pipeline import convert
    from imp_cli.modelfiles import read_pair

    r = convert(str(checkpoint(sizes=REPACKABLE)), tmp_path_factory.mktemp("q4k"), quant="Q4_K_M")
    return read_pair(Path(r.text_path), Path(r.mmproj_path))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("IMP_HOME", str(tmp_path / "imp-home"))
    return tmp_path / "imp-home"


# ------------------------------------------------------------------- the settings keep the answer
def test_every_setting_gives_the_oracle_answer(f16_pair, oracle_for, photo):
    oracle = oracle_for("new", "float16", "square")
    image = as_imp_sees_it(photo)
    ref_ids = oracle.greedy(image, QUESTION, N_TOKENS)
    ref_logits = live(oracle.first_logits(image, QUESTION))
    assert len(ref_ids) == N_TOKENS
    for repack, flash_attn in ALL:
        with engine(f16_pair, repack, flash_attn) as eng:
            head, embd, tail = prompt_segments(eng, photo)
            eng.evaluate([head, embd, tail])
            assert rel_diff(live(eng.last_logits()), ref_logits) < LOGITS_TOL, (repack, flash_attn)
            assert engine_greedy(eng, head, embd, tail, N_TOKENS) == ref_ids, (repack, flash_attn)


def test_repacking_is_applied_and_keeps_the_greedy_answer(q4_pair, photo, capsys):
    results = {}
    for repack in (True, False):
        with logged_engine(q4_pair, repack, False, capsys) as eng:
            head, embd, tail = prompt_segments(eng, photo)
            eng.evaluate([head, embd, tail])
            results[repack] = (live(eng.last_logits()), engine_greedy(eng, head, embd, tail, N_TOKENS))
    (on_logits, on_ids), (off_logits, off_ids) = results[True], results[False]
    assert len(on_ids) == N_TOKENS
    assert off_ids == on_ids
    assert 0 < rel_diff(off_logits, on_logits) < REPACK_TOL  # > 0: other kernels really ran


def test_flash_attention_is_applied_and_moves_logits_within_tolerance(q4_pair, photo, capsys):
    """Teacher-forced over a fixed answer, so that every step is compared. Where top-1 differs,
    the reference's own logit of the other token must be within the tolerance of its maximum
    (a near-tie, which random weights have many of); nowhere may the logits move more."""
    steps = {}
    for flash_attn in (False, True):
        with logged_engine(q4_pair, True, flash_attn, capsys) as eng:
            head, embd, tail = prompt_segments(eng, photo)
            forced = eng.tokenize(FORCED)[:N_TOKENS]
            logits = []
            for i in range(N_TOKENS):
                eng.evaluate([head, embd, tail + forced[:i]])
                logits.append(live(eng.last_logits()))
            steps[flash_attn] = logits
    for ref, ours in zip(steps[False], steps[True]):
        assert rel_diff(ours, ref) < FLASH_TOL
        assert ref.max() - ref[int(ours.argmax())] < FLASH_TOL * ref.std()


# ----------------------------------------------------------------------------- the tuning file
def test_tuning_file_is_written_atomically_keyed_and_read_back(home, f16_pair, monkeypatch):
    from imp_cli import tune
    from imp_cli.engine import Tuning
    from imp_cli.errors import ImpError

    key1, key2 = tune.tuning_key(f16_pair, 1), tune.tuning_key(f16_pair, 3)
    assert key1["threads"] == 1 and key1["tensor_type"] == "F16" and key1["llama_cpp"] == version("llama_cpp_python")
    assert key1["cpu"] and key1 != key2
    path = tune.tuning_path()
    assert path == home / "tuning.json"
    tune.save(key1, Tuning(repack=False, flash_attn=True), [{"load_s": 1.0}], path)
    tune.save(key2, Tuning(repack=True, flash_attn=False), [], path)
    tune.save(key1, Tuning(repack=False, flash_attn=False), [], path)  # replaces key1's entry
    assert sorted(p.name for p in home.iterdir()) == ["tuning.json"]  # no temporary left behind
    data = json.loads(path.read_text())
    assert (data["kind"], data["format"], len(data["entries"])) == ("imp-tuning", 1, 2)
    notes: list[str] = []
    assert tune.lookup(key1, path, notes.append) == Tuning(repack=False, flash_attn=False)
    assert tune.lookup(key2, path, notes.append) == Tuning(repack=True, flash_attn=False)
    assert tune.lookup({**key1, "cpu": "another CPU"}, path, notes.append) is None
    assert notes == []

    # a write that fails half-way leaves the previous file exactly as it was
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tune.os, "replace", broken_replace)
    with pytest.raises(ImpError, match="cannot write the tuning file"):
        tune.save(key2, Tuning(repack=False, flash_attn=True), [], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in home.iterdir()) == ["tuning.json"]


FOREIGN = [
    (b"\x00{not json", "unreadable (JSONDecodeError)"),
    (b'{"kind": "something-else", "entries": []}', "not an imp tuning file"),
    (b'{"kind": "imp-tuning", "format": 99, "entries": []}', "format 99, this imp reads 1"),
    (b'{"kind": "imp-tuning", "format": 1, "entries": {}}', "no list of entries"),
    (b'{"kind": "imp-tuning", "format": 1, "entries": [{"key": 1}]}', "ignoring 1 malformed entry"),
]


@pytest.mark.parametrize("content,reason", FOREIGN)
def test_corrupt_or_foreign_tuning_file_is_ignored_with_a_note(home, f16_pair, content, reason):
    from imp_cli import tune

    home.mkdir(parents=True)
    (home / "tuning.json").write_bytes(content)
    notes: list[str] = []
    chosen = tune.choose(f16_pair, 1, note=notes.append)
    default, why = tune.family_default(tune.tuning_key(f16_pair, 1))
    assert chosen == default
    assert reason in notes[0] and str(home / "tuning.json") in notes[0]
    assert notes[1] == f"no tuning for this machine and model: using {why}; run `imp tune -t 1` to measure"  # the thread count it was asked with


def test_an_entry_for_another_machine_is_not_used(home, f16_pair):
    from imp_cli import tune
    from imp_cli.engine import Tuning

    key = tune.tuning_key(f16_pair, 1)
    default, _ = tune.family_default(key)
    other = Tuning(repack=not default.repack, flash_attn=not default.flash_attn)
    for changed in ({"cpu": "Other CPU"}, {"threads": 7}, {"llama_cpp": "0.0.1"}, {"tensor_type": "Q8_0"}):
        tune.save({**key, **changed}, other, [], tune.tuning_path())
    assert tune.choose(f16_pair, 1) == default
    tune.save(key, other, [], tune.tuning_path())
    assert tune.choose(f16_pair, 1) == other


def test_family_defaults():
    """Issue 23: x86-64 with AVX2, with or without AVX-512, runs the K-quants and float types with
    repacking and flash attention off (the evidence is in family_default's docstring); what was
    not measured keeps llama-cpp-python's defaults; the architecture decides, not the flags."""
    from imp_cli.engine import Tuning
    from imp_cli.tune import family_default

    off, stock = Tuning(repack=False, flash_attn=False), Tuning(repack=True, flash_attn=False)
    avx2 = {"arch": "x86_64", "flags": "avx avx2 f16c fma sse4_2"}
    avx512 = {"arch": "x86_64", "flags": "avx avx2 avx512f avx512bw avx512_vnni f16c fma"}
    for cpu in (avx2, avx512, {"flags": avx512["flags"]}, {**avx2, "arch": "AMD64"}):
        for ttype in ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "F16", "BF16", "Q8_0", None):
            key = {**cpu, **({"tensor_type": ttype} if ttype else {})}
            assert family_default(key)[0] == off, key
    assert "x86 with AVX-512" in family_default({**avx512, "tensor_type": "Q4_K_M"})[1]
    assert "x86 with AVX2" in family_default({**avx2, "tensor_type": "F16"})[1]
    for key in ({**avx512, "tensor_type": "IQ4_NL"}, {**avx2, "tensor_type": "Q4_0"},  # other kernels
                {"arch": "x86_64", "flags": "avx f16c sse4_2", "tensor_type": "Q4_K_M"},  # no AVX2
                {"arch": "aarch64", "flags": "asimd i8mm dotprod", "tensor_type": "Q4_K_M"},
                {"arch": "aarch64", "flags": avx2["flags"], "tensor_type": "Q4_K_M"},  # x86 text, emulated ARM
                {"flags": "asimd i8mm"}):
        assert family_default(key) == (stock, "llama-cpp-python's defaults (not measured for this CPU family "
                                              "and model type)"), key


def test_without_a_tuning_file_x86_runs_the_measured_defaults_and_imp_tune_overrides(home, f16_pair, monkeypatch):
    from imp_cli import tune
    from imp_cli.engine import Tuning

    monkeypatch.setattr(tune, "cpu", lambda: {"cpu": "AMD EPYC 9B14", "arch": "x86_64",
                                               "flags": "avx avx2 avx512f avx512_vnni f16c fma"})
    notes: list[str] = []
    assert tune.choose(f16_pair, 2, note=notes.append) == Tuning(repack=False, flash_attn=False)
    assert notes[0].startswith("no tuning for this machine and model: using the measured defaults for x86 with "
                               "AVX-512 (repack off, flash attention off); run `imp tune")
    tune.save(tune.tuning_key(f16_pair, 2), Tuning(repack=True, flash_attn=True), [], tune.tuning_path())
    assert tune.choose(f16_pair, 2) == Tuning(repack=True, flash_attn=True)  # a measurement wins
    assert tune.choose(f16_pair, 2, repack="off") == Tuning(repack=False, flash_attn=True)


def test_overrides_win_over_the_file(home, f16_pair):
    from imp_cli import tune
    from imp_cli.engine import Tuning

    tune.save(tune.tuning_key(f16_pair, 1), Tuning(repack=False, flash_attn=True), [], tune.tuning_path())
    assert tune.choose(f16_pair, 1) == Tuning(repack=False, flash_attn=True)
    assert tune.choose(f16_pair, 1, repack="on") == Tuning(repack=True, flash_attn=True)
    assert tune.choose(f16_pair, 1, flash_attn="off") == Tuning(repack=False, flash_attn=False)
    assert tune.choose(f16_pair, 1, "on", "off") == Tuning(repack=True, flash_attn=False)


def test_ask_reads_the_file_and_overrides_reach_llama_cpp(imp_bin, q4_pair, photo, tmp_path, monkeypatch):
    """Through the command: the tuned settings are used, --flash-attn and IMP_REPACK override
    them (llama.cpp's own -v log is the witness)."""
    from imp_cli import tune
    from imp_cli.engine import Tuning

    env = clean_env(tmp_path)
    home = Path(env["IMP_HOME"])
    monkeypatch.setenv("IMP_HOME", str(home))
    tune.save(tune.tuning_key(q4_pair, 1), Tuning(repack=False, flash_attn=False), [], tune.tuning_path())
    args = ["ask", photo, QUESTION, "-m", q4_pair.text_path, "-n", "8", "--no-cache"]

    tuned = run_imp(*args, "-v", env=env)
    assert tuned.returncode == 0, tuned.stderr
    assert ("llama.cpp settings: repack off, flash attention off "
            f"(measured by `imp tune` ({home / 'tuning.json'}))") in tuned.stderr
    llama_log_says(tuned.stderr, False, False)

    for extra, repack, flash_attn, said in (
            ({"IMP_REPACK": "on"}, True, False, "repack on, flash attention off (measured by `imp tune` ({}); --repack on)"),
            ({"IMP_FLASH_ATTN": "on"}, False, True, "repack off, flash attention on (measured by `imp tune` ({}); --flash-attn on)")):
        forced = run_imp(*args, "-v", env={**env, **extra})
        assert forced.returncode == 0, forced.stderr
        assert "llama.cpp settings: " + said.format(home / "tuning.json") in forced.stderr
        llama_log_says(forced.stderr, repack, flash_attn)
        assert forced.stdout.strip()
    # options win over the environment; both given, the file is not consulted
    forced = run_imp(*args, "-v", "--repack", "on", "--flash-attn", "on", env={**env, "IMP_REPACK": "off"})
    assert "llama.cpp settings: repack on, flash attention on (--repack on, --flash-attn on)" in forced.stderr
    llama_log_says(forced.stderr, True, True)

    quiet = run_imp(*args, env=env)  # without -v: the answer only, the same as with -v
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout == tuned.stdout
    record = json.loads(run_imp(*args, "--json", "--repack", "on", env=env).stdout)
    assert record["settings"] == {"repack": True, "flash_attn": False}


def test_a_prompt_cache_entry_is_not_restored_under_the_other_attention(imp_bin, f16_pair, photo, tmp_path):
    """Flash attention keeps the V cache in another layout: a saved prefix is only restored into
    a context with the same setting."""
    env = clean_env(tmp_path)
    args = ["ask", photo, QUESTION, "-m", f16_pair.text_path, "-n", "8", "--json", "-v"]
    first = run_imp(*args, "--flash-attn", "off", env=env)
    assert first.returncode == 0 and json.loads(first.stdout)["cache"] == "miss"
    same = run_imp(*args, "--flash-attn", "off", env=env)
    assert same.returncode == 0 and json.loads(same.stdout)["cache"] == "hit"
    other = run_imp(*args, "--flash-attn", "on", env=env)
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["cache"] == "miss"
    assert "saved with another llama.cpp KV layout; removed" in other.stderr


def test_bad_override_is_a_usage_error(imp_bin, f16_pair, photo, tmp_path):
    env = clean_env(tmp_path, IMP_REPACK="sometimes")
    p = run_imp("ask", photo, QUESTION, "-m", f16_pair.text_path, env=env)
    assert p.returncode == 2 and p.stdout == ""
    assert "sometimes" in p.stderr


# ------------------------------------------------------------------------------ imp tune, imp pull
def test_imp_tune_end_to_end(imp_bin, q4_pair, photo, tmp_path):
    from imp_cli import tune

    env = clean_env(tmp_path)
    p = run_imp("tune", "-m", q4_pair.text_path, "--json", env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["key"] == tune.tuning_key(q4_pair, 1)  # IMP_THREADS=1 in clean_env
    assert result["workload"] == {"prompt_tokens": 512, "depth": 700, "gen_tokens": 16}
    assert result["rounds"] == 1
    assert result["estimate"] == {"prompt_tokens": q4_pair.image_tokens + tune.QUESTION_TOKENS,
                                  "answer_tokens": tune.ANSWER_TOKENS}
    measured = result["measurements"]
    assert [(m["repack"], m["flash_attn"]) for m in measured] == ALL
    for m in measured:
        assert m["load_ms"] > 0 and m["prompt_tokens_per_s"] > 0 and m["generation_tokens_per_s"] > 0
        assert 0 < m["cpu_share"] < 2
        expected = m["load_ms"] / 1000 + result["estimate"]["prompt_tokens"] / m["prompt_tokens_per_s"] \
            + result["estimate"]["answer_tokens"] / m["generation_tokens_per_s"]
        assert m["estimate_ms"] / 1000 == pytest.approx(expected, abs=0.02)
    chosen = [m for m in measured if (m["repack"], m["flash_attn"]) == tuple(result["choice"].values())]
    assert chosen[0]["estimate_ms"] == min(m["estimate_ms"] for m in measured)  # rounded: ties are possible
    stored = json.loads((Path(env["IMP_HOME"]) / "tuning.json").read_text())["entries"]
    assert [(e["key"], e["choice"]) for e in stored] == [(result["key"], result["choice"])]
    assert "measuring 4 settings" in p.stderr

    # the table: a header, one row per setting, the chosen one starred (and it is the stored one)
    p = run_imp("tune", "-m", q4_pair.text_path, "--rounds", "2", env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "measuring 4 settings of llama.cpp" in p.stderr and "2 rounds" in p.stderr
    assert p.stderr.count(" tok/s, CPU share ") == 8  # each setting twice
    lines = p.stdout.splitlines()
    assert lines[0] == "repack\tflash_attn\tload_s\tprompt_tok_s\tgen_tok_s\test_ask_s\tchosen"
    rows = [line.split("\t") for line in lines[1:]]
    assert [(r[0], r[1]) for r in rows] == [("on", "off"), ("on", "on"), ("off", "off"), ("off", "on")]
    assert sorted(r[6] for r in rows) == ["", "", "", "*"]
    starred = [r for r in rows if r[6] == "*"]
    assert float(starred[0][5]) == min(float(r[5]) for r in rows)  # shown rounded: ties are possible
    stored = json.loads((Path(env["IMP_HOME"]) / "tuning.json").read_text())["entries"]
    assert len(stored) == 1
    assert stored[0]["choice"] == {"repack": starred[0][0] == "on", "flash_attn": starred[0][1] == "on"}

    ask = run_imp("ask", photo, QUESTION, "-m", q4_pair.text_path, "-n", "4", "-v", env=env)
    assert ask.returncode == 0 and "(measured by `imp tune`" in ask.stderr


def test_pull_tunes_after_a_conversion_unless_told_not_to(imp_bin, hub_cache, tmp_path):
    cache, _ = hub_cache("MILVLG/imp-tiny-tune")
    env = clean_env(tmp_path, HF_HUB_CACHE=str(cache))
    tuning = Path(env["IMP_HOME"]) / "tuning.json"

    p = run_imp("pull", "MILVLG/imp-tiny-tune", "--no-tune", env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert not tuning.exists() and "tuned:" not in p.stderr

    p = run_imp("pull", "MILVLG/imp-tiny-tune", "--force", env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{Path(env['IMP_HOME']) / 'models' / 'imp-tiny-tune'}\n"
    entries = json.loads(tuning.read_text())["entries"]
    assert [(e["key"]["tensor_type"], e["key"]["threads"]) for e in entries] == [("Q4_K_M", 1)]
    assert f"(saved in {tuning})" in p.stderr
    written = tuning.stat().st_mtime_ns

    p = run_imp("pull", "MILVLG/imp-tiny-tune", env=env, timeout=300)  # installed: no conversion
    assert p.returncode == 0, p.stderr
    assert tuning.stat().st_mtime_ns == written and "tuned:" not in p.stderr


def test_imp_tune_without_an_installed_model_says_what_to_run(imp_bin, tmp_path):
    p = run_imp("tune", env=clean_env(tmp_path))
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == "error: model imp-v1-3b is not installed: run `imp pull imp-v1-3b`\n"
    assert not (tmp_path / "imp-home" / "tuning.json").exists()


def test_the_choice_is_the_shortest_estimated_answer_from_each_figures_best_round(home, f16_pair, monkeypatch, capsys):
    """The selection rule on scripted figures (the end-to-end test above measures for real):
    per setting the best load, prompt and generation figures over the rounds; the setting with
    the shortest load + prefill + answer wins; a disturbed measurement is reported."""
    from imp_cli import tune
    from imp_cli.engine import Tuning
    from imp_cli.output import Output

    figures = {  # (repack, flash_attn): [round 1, round 2] as (load s, prompt tok/s, gen tok/s, cpu share)
        (True, False): [(2.0, 20.0, 7.0, 0.5), (2.2, 21.0, 6.0, 0.9)],
        (True, True): [(2.0, 20.0, 4.5, 0.9), (1.8, 20.0, 4.4, 0.9)],
        (False, False): [(0.2, 10.0, 7.0, 0.9), (0.3, 25.0, 7.2, 0.9)],  # disturbed in round 1
        (False, True): [(0.2, 25.0, 4.0, 0.9), (0.2, 24.0, 4.5, 0.9)],
    }
    calls = []

    def scripted(pair, tuning, threads, work, verbose=False):
        key = (tuning.repack, tuning.flash_attn)
        load, prompt, gen, share = figures[key][sum(1 for c in calls if c == key)]
        calls.append(key)
        return tune.Measurement(tuning, load, prompt, gen, share)

    monkeypatch.setattr(tune, "measure", scripted)
    result = tune.tune_pair(f16_pair, Output(), threads=2, rounds=2)
    assert calls == ALL + ALL  # interleaved rounds
    best = {(m.tuning.repack, m.tuning.flash_attn): m for m in result.measurements}
    assert (best[(False, False)].load_s, best[(False, False)].prompt_tokens_per_s,
            best[(False, False)].generation_tokens_per_s) == (0.2, 25.0, 7.2)
    prefill = f16_pair.image_tokens + tune.QUESTION_TOKENS
    assert best[(False, False)].estimate_s == pytest.approx(0.2 + prefill / 25.0 + tune.ANSWER_TOKENS / 7.2)
    assert result.choice == Tuning(repack=False, flash_attn=False)
    assert tune.lookup(tune.tuning_key(f16_pair, 2), tune.tuning_path(), print) == result.choice
    assert "warning" not in capsys.readouterr().err  # each setting had an undisturbed round

    calls.clear()
    tune.tune_pair(f16_pair, Output(), threads=2, rounds=1)
    err = capsys.readouterr().err
    assert "other processes took the CPUs while measuring (imp got as little as 50% of its 2 threads' time)" in err


def test_chat_takes_the_overrides(imp_bin, q4_pair, photo, tmp_path):
    """--repack/--flash-attn are shared options: imp chat reaches llama.cpp with them."""
    env = clean_env(tmp_path)
    chat = subprocess.run([imp_bin, "chat", str(photo), "-m", str(q4_pair.text_path), "-n", "4", "-v", "--no-cache",
                           "--repack", "on", "--flash-attn", "on"], input=QUESTION.encode() + b"\n",
                          capture_output=True, env=env, timeout=120)
    assert chat.returncode == 0, chat.stderr.decode()
    assert "llama.cpp settings: repack on, flash attention on (--repack on, --flash-attn on)" in chat.stderr.decode()
    llama_log_says(chat.stderr.decode(), True, True)
