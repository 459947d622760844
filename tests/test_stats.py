"""The human timings summary (`imp ask --stats`, `/stats`, `imp serve`'s log line): its labels,
units and alignment, from a timings dict as `--json` prints it."""

from __future__ import annotations

from imp_cli.stats import LABELS, log_fields, summary

TIMINGS = {  # an answer with an image encoded, as Engine.Timings.as_dict() + the Session give it
    "load_ms": 8.94, "vision_load_ms": 3.5, "image_encode_ms": 123.4, "prompt_tokens": 30, "prompt_ms": 12.34,
    "reused_tokens": 732, "cache_read_ms": 0.0, "cache_save_ms": 1.2, "scored_tokens": 0, "generated_tokens": 24,
    "generation_ms": 457.0, "ttft_ms": 145.6, "finish_reason": "length", "prompt_tokens_per_s": 2431.12,
    "generation_tokens_per_s": 52.49, "cache": "miss",
}


def test_summary_reads_like_llama_cpp():
    rows = summary(TIMINGS)
    assert list(rows) == ["load", "image encode", "prompt", "answer", "time to first token", "cache", "finish"]
    assert rows["load"] == "12.4 ms (vision tower 3.5 ms)"
    assert rows["image encode"] == "123.4 ms"
    assert rows["prompt"] == "30 tokens in 0.012 s = 2431.1 tok/s, 732 reused from the cache"
    assert rows["answer"] == "24 tokens in 0.457 s = 52.5 tok/s"
    assert rows["time to first token"] == "145.6 ms"
    assert (rows["cache"], rows["finish"]) == ("miss", "length")
    assert all(label in LABELS for label in rows)


def test_summary_leaves_out_what_does_not_apply():
    text_only = {**TIMINGS, "vision_load_ms": 0.0, "image_encode_ms": 0.0, "reused_tokens": 0, "cache": "off",
                 "ttft_ms": None}
    rows = summary(text_only)
    assert "image encode" not in rows and "time to first token" not in rows
    assert rows["load"] == "8.9 ms" and rows["prompt"] == "30 tokens in 0.012 s = 2431.1 tok/s"
    hit = summary({**TIMINGS, "cache": "hit", "cache_read_ms": 4.25, "image_encode_ms": 0.0})
    assert hit["cache"] == "hit (read in 4.2 ms)"
    scored = summary({**TIMINGS, "generated_tokens": 0, "generation_ms": 0.0, "generation_tokens_per_s": None,
                      "scored_tokens": 9})
    assert "answer" not in scored and scored["scored"].startswith("9 tokens")
    assert summary({**TIMINGS, "ttft_ms": 12345.0})["time to first token"] == "12.35 s"


def test_serve_log_fields_use_the_same_names():
    assert log_fields(TIMINGS) == ("prompt 30 tokens (732 reused), answer 24 tokens (52.5 tok/s), "
                                   "time to first token 145.6 ms, cache miss")
    for name in ("prompt", "answer", "time to first token", "cache"):
        assert name in LABELS
