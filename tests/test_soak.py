"""A short soak of `imp serve` (bench/soak.py; `make bench` runs the long one): three clients for
~25 s on the tiny model with every kind of request (new images, follow-ups, streams, streams
dropped mid-answer, malformed requests). Held to: no error besides the intended 4xx; open file
descriptors and threads at the end, idle, no more than after the warm-up, idle; RSS growth after
the warm-up at most 16 kB per request. That last bound is a ceiling, not the goal: the 10-minute
soak measured a native growth of about 3 kB per request (5-7 kB in the first minutes), which
fails its +2% bound (docs/performance.md); 16 kB still catches a leaked image embedding or KV
state per request."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import clean_env

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import soak  # noqa: E402

SHORT_BOUNDS = {"rss_growth": None, "rss_kb_per_request": 16}


def test_short_soak_of_imp_serve(converted, tmp_path):
    text, _ = converted("new", "float16", "square")
    report = soak.soak(text, minutes=0.4, min_requests=30, clients=3, env=clean_env(tmp_path), seed=1,
                       serve_args=("--threads", "1"))
    summary = report.summary()
    assert soak.check(report, SHORT_BOUNDS) == [], summary
    assert summary["served"] >= 10 and summary["intended_4xx"] >= 1, summary
    assert set(summary["kinds"]) == set(soak.Client.KINDS), summary  # every kind of request was sent
    assert summary["ttft_p50_ms"] is not None


def test_the_check_can_fail():
    """check() reports growth and errors (else the soak above could not fail)."""
    report = soak.Report("m", 1, seconds=10.0, errors=[("new", "status 500")])
    report.samples = [soak.Sample(1, 1000, 10, 5), soak.Sample(2, 1000, 10, 5, "A"), soak.Sample(9, 1100, 11, 6),
                      soak.Sample(10, 1100, 11, 6, "B")]
    report.requests, report.requests_at_warmup = 10, 5
    wrong = soak.check(report, {"rss_growth": 0.02, "rss_kb_per_request": 16})
    assert len(wrong) == 5 and "500" in wrong[0] and "descriptors" in wrong[1] and "threads" in wrong[2]
    assert "RSS grew by 10.0%" in wrong[3] and "20.0 kB per request" in wrong[4]
