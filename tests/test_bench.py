"""The benchmark's own plumbing on a tiny model (the full-size figures come from `make bench`):
the cold/warm measurement really sees a prompt-cache miss then a hit across two processes, the
report derives its figures from those runs, and the oracle computes in the dtype it is given."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

QUESTIONS = ("What is in the image?", "Which colours dominate this picture?")


@pytest.fixture
def bench_modules(monkeypatch):
    import measure
    import report

    monkeypatch.setattr(measure.QUIET, "max_wait_s", 0)  # never wait for an idle machine in a test
    return measure, report


def test_cold_then_warm_in_new_processes(bench_modules, converted, photo, tmp_path):
    measure, report = bench_modules
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import Session

    text, mmproj = converted()
    home = tmp_path / "home"
    out = measure.cold_warm(text, mmproj, photo, QUESTIONS, tokens=4, threads=1, home=home)

    cold, warm = out["json"]["cold"], out["json"]["warm"]
    assert (cold["cache"], warm["cache"]) == ("miss", "hit")
    assert out["json"]["cache_after_cold"]["entries"] == 1
    assert out["plain"]["cache_after_cold"]["entries"] == 1  # the cache was cleared in between
    # on a hit the vision tower is not loaded and only the second question's tokens are evaluated
    assert warm["timings"]["vision_load_ms"] == 0 and warm["timings"]["image_encode_ms"] == 0
    with Session(read_pair(text, mmproj), threads=1, ctx=2048) as session:
        staged = session.stage(load_image(str(photo)))
        p1, p2 = (session.prompt(staged, q) for q in QUESTIONS)
    assert cold["timings"]["prompt_tokens"] == p1.n_tokens
    assert warm["timings"]["reused_tokens"] == p2.n_tokens - len(p2.tail)
    assert warm["timings"]["prompt_tokens"] == len(p2.tail)
    for mode in ("json", "plain"):
        for k in ("cold", "warm"):
            assert out[mode][k]["first_output_s"] is not None

    res = {"machine": measure.machine(1), "command": "test", "elapsed_s": 0.0, "quiet_waits": [],
           "settings": {"runs": 1, "tokens": 4, "quant": "F16", "quiet_wait_s": 0, "quiet_threshold": 0.15},
           "sizes": {"tiny": {"cold_warm": [out], "mtmd_cli": {"error": "not built in tests"}}}}
    md = report.write(res, tmp_path / "raw.json")
    d = res["derived"]["tiny"]
    assert d["warm_cache_status"] == ["hit"] and d["cold_cache_status"] == ["miss"]
    assert d["entry_bytes"]["median"] == out["json"]["cache_after_cold"]["bytes"]
    assert d["warm_over_cold"]["median"] == pytest.approx(
        out["plain"]["warm"]["first_output_s"] / out["plain"]["cold"]["first_output_s"])
    # both figures of the first answer token: launch to first byte (outside), ttft_ms (inside)
    assert d["warm_ttft_ms"]["median"] == out["json"]["warm"]["timings"]["ttft_ms"] > 0
    assert "launch to first answer byte" in md and "(`ttft_ms`" in md
    assert "llama-mtmd-cli not available: not built in tests" in md
    assert (tmp_path / "latest.md").read_text() == md


def test_oracle_computes_in_the_dtype_it_is_given(checkpoint, photo):
    import factory as F
    from oracle import Oracle

    folder = checkpoint()
    ref, half = Oracle(folder), Oracle(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ref.lm.parameters()} == {torch.float32}
    assert {p.dtype for m in (half.lm, half.vision, half.projector) for p in m.parameters()} == {torch.bfloat16}
    image = Image.open(photo)
    a, b = ref.first_logits(image, QUESTIONS[0]), half.first_logits(image, QUESTIONS[0])
    assert b.dtype == np.float32
    # bfloat16 keeps 8 bits of mantissa: close to the float32 reference, not equal to it
    ids = F.predictable_ids()
    diff = np.abs(a - b)[ids]
    assert 0 < diff.max() < 0.25 * a[ids].std()


def test_synthetic_makes_caches_and_reports_each_family(bench_modules, converted, photo, tmp_path):
    """bench/synthetic.py --family: the 4B / 2B are made, named and cached like the 3B (here at the
    tiny size), their conversion's time and RSS are kept, and the report puts them side by side."""
    import gguf
    import synthetic
    from run import model_key

    import factory as F

    measure, report = bench_modules
    assert synthetic.base_name(384, "phi3") == "imp-synth-phi3-384"
    assert synthetic.base_name(196) == "imp-synth-196"  # the 3B's caches keep their names
    with pytest.raises(ValueError, match="no 196-px variant"):
        synthetic.base_name(196, "qwen2")

    ckpt = synthetic.ensure_checkpoint(384, tmp_path, family="qwen2", sizes=F.TINY_QWEN2)
    assert ckpt == tmp_path / "imp-synth-qwen2-384" / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "imp_qwen2"
    assert synthetic.conversion("F16", 384, tmp_path, "qwen2") is None
    text, mmproj = synthetic.ensure_gguf("F16", 384, tmp_path, "qwen2", threads=1)
    assert (text.name, mmproj.name) == ("imp-synth-qwen2-384-F16.gguf", "imp-synth-qwen2-384-mmproj-F16.gguf")
    arch = gguf.GGUFReader(text).fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "qwen2"
    conv = synthetic.conversion("F16", 384, tmp_path, "qwen2")
    assert conv["seconds"] > 0 and conv["peak_rss"] >= conv["peak_rss_before"] > 0 and conv["threads"] == 1
    made = text.stat().st_mtime_ns
    assert synthetic.ensure_gguf("F16", 384, tmp_path, "qwen2") == (text, mmproj)
    assert text.stat().st_mtime_ns == made  # cached: not converted again
    with open(text, "r+b") as f:  # a GGUF cut short is not trusted
        f.truncate(1000)
    assert synthetic.conversion("F16", 384, tmp_path, "qwen2") is None
    assert synthetic.ensure_gguf("F16", 384, tmp_path, "qwen2", threads=1) == (text, mmproj)  # made again
    conv = synthetic.conversion("F16", 384, tmp_path, "qwen2")
    assert conv["threads"] == 1 and text.stat().st_size > 1000

    sizes = {}
    for family, (t, m) in (("phi2", converted()), ("qwen2", (text, mmproj))):
        out = measure.cold_warm(t, m, photo, QUESTIONS, tokens=2, threads=1, home=tmp_path / f"home-{family}")
        assert out["json"]["cold"]["cache"] == "miss"
        sizes[model_key(384, family)] = {
            "family": family, "model": synthetic.FAMILIES[family][0], "image_size": 384, "image_tokens": 16,
            "text_bytes": t.stat().st_size, "cold_warm": [out], "mtmd_cli": {"error": "not built in tests"},
            "conversion": synthetic.conversion("F16", 384, tmp_path, family)}
    assert list(sizes) == ["384", "qwen2-384"]
    res = {"machine": measure.machine(1), "command": "test", "elapsed_s": 0.0, "quiet_waits": [],
           "settings": {"runs": 1, "tokens": 2, "quant": "F16", "threads": 1, "quiet_wait_s": 0, "quiet_threshold": 0.15},
           "sizes": sizes}
    md = report.write(res, tmp_path / "raw.json")
    assert "## 384 px (16 image tokens)" in md and "## Imp-v1.5-2B (Qwen1.5-1.8B), 384 px (16 image tokens)" in md
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in md.splitlines()
            if line.startswith("| Imp-")}
    assert set(rows) == {"Imp-3B (Phi-2 2.7B)", "Imp-v1.5-2B (Qwen1.5-1.8B)"}
    d = res["derived"]["qwen2-384"]
    qwen = rows["Imp-v1.5-2B (Qwen1.5-1.8B)"]
    assert float(qwen[2]) == round(conv["seconds"])
    assert float(qwen[3]) == pytest.approx(conv["peak_rss"] / 1e9, abs=0.005)
    assert qwen[6] == f"{d['cold_generation_tokens_per_s']['median']:,.2f}"
    assert rows["Imp-3B (Phi-2 2.7B)"][2] == "n/a"  # the conftest conversion wrote no marker


def test_serve_second_question_reuses_the_image_and_all_clients_are_answered(bench_modules, converted, photo,
                                                                             tmp_path):
    """Issue 10's step on a tiny model: a real `imp serve` on a free port, streamed requests."""
    measure, report = bench_modules
    import run

    text, mmproj = converted()
    images = [photo] + [run.test_image(tmp_path / f"img{i}.png", seed=100 + i) for i in range(4)]
    out = measure.serve_figures(text, mmproj, images, QUESTIONS, tokens=4, threads=1, home=tmp_path / "home",
                                per_client=2)
    assert out["burst"]["completed"] == 8 and out["burst"]["clients"] == 4
    for r in [out["first"], out["second"], *(x for c in out["clients"] for x in c)]:
        assert r["first_content_s"] is not None and r["usage"]["completion_tokens"] == r["pieces"]
    res = {"machine": measure.machine(1), "command": "test", "elapsed_s": 0.0, "quiet_waits": [],
           "settings": {"runs": 1, "tokens": 4, "quant": "F16", "quiet_wait_s": 0, "quiet_threshold": 0.15},
           "sizes": {}, "serve": out}
    md = report.write(res, tmp_path / "raw.json")
    d = res["derived"]["serve"]
    # the server's log, in answer order: the first question evaluates everything, the second
    # reuses the [system, image] prefix (only these two, which come one after the other: with
    # concurrent requests the server's own log can lose lines, as images.py swaps fd 2 per decode)
    assert d["log"][0]["reused_tokens"] == 0
    assert d["log"][1]["reused_tokens"] > 0 and d["log"][1]["prompt_tokens"] > d["log"][1]["reused_tokens"]
    assert d["second_over_first"] == pytest.approx(out["second"]["first_content_s"] / out["first"]["first_content_s"],
                                                   abs=1e-3)
    assert d["completion_tokens"] == sum(x["usage"]["completion_tokens"] for c in out["clients"] for x in c)
    assert "## imp serve (384 px)" in md and "8 of 8 requests answered" in md


def test_serve_log_lines_parse_and_others_are_ignored(bench_modules):
    _, report = bench_modules
    lines = ["imp serve: m on http://127.0.0.1:1234/v1 (max queue 16)", "GET /v1/models 200 - 0 ms",
             "POST /v1/chat/completions 200 775+32 tokens (0 reused) 21000 ms",
             "POST /v1/chat/completions 503 - 1 ms", "POST /v1/chat/completions 200 16+7 tokens (760 reused) 900 ms",
             "POST /v1/chat/completions 200 prompt 16 tokens (760 reused), answer 8 tokens (9.1 tok/s), "
             "time to first token 610.0 ms, cache hit 900 ms (client gone)"]
    assert report.serve_log_requests(lines) == [
        {"status": 200, "prompt_tokens": 775, "completion_tokens": 32, "reused_tokens": 0, "ms": 21000},
        {"status": 200, "prompt_tokens": 16, "completion_tokens": 7, "reused_tokens": 760, "ms": 900},
        {"status": 200, "prompt_tokens": 776, "completion_tokens": 8, "reused_tokens": 760, "ms": 900}]


def test_tuned_step_runs_tune_then_ask_with_its_choice(bench_modules, converted, photo, tmp_path):
    """Issue 14's step on a tiny model, without the native binary: `imp tune` in a fresh IMP_HOME
    stores a choice, the cold `imp ask` runs after it, the report shows the tuner's table."""
    measure, report = bench_modules
    import argparse

    import run

    text, mmproj = converted()
    a = argparse.Namespace(quant="F16", cache=tmp_path, homes=tmp_path, imp_args="", tune_rounds=1, runs=1, tokens=4)
    out = run.bench_tuned({"F16": text, "mmproj": mmproj}, a, 1, photo, None)
    assert "error" not in out["tune"] and len(out["tune"]["measurements"]) == 4
    assert "error" not in out["imp"][0]["plain"] and out["imp"][0]["json"]["cache"] == "miss"
    assert not (tmp_path / "imp-home-tuned").exists()  # removed after the step
    res = {"machine": measure.machine(1), "command": "test", "elapsed_s": 0.0, "quiet_waits": [],
           "settings": {"runs": 1, "tokens": 4, "quant": "F16", "quiet_wait_s": 0, "quiet_threshold": 0.15},
           "sizes": {}, "tuned": out}
    md = report.write(res, tmp_path / "raw.json")
    d = res["derived"]["tuned"]
    assert d["imp_wall_s"]["median"] == out["imp"][0]["plain"]["wall_s"]
    assert [t["met"] for t in d["targets"]] == [None, None, None]  # no native run to compare with
    assert md.count(" | * |") == 1  # exactly one setting chosen
