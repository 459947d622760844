"""The benchmark's own plumbing on a tiny model (the full-size figures come from `make bench`):
the cold/warm measurement really sees a prompt-cache miss then a hit across two processes, the
report derives its figures from those runs, and the oracle computes in the dtype it is given."""

from __future__ import annotations

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
