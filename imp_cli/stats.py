"""Timings as a person reads them: `imp ask --stats`, `/stats` in `imp chat`, `imp serve`'s log line.

The figures are an answer's timings dict (Engine.Timings.as_dict() plus the Session's cache
status), the same one `--json` prints under "timings". Here they become a short aligned summary
in llama.cpp's manner:

    load                  8.9 ms
    image encode        123.4 ms
    prompt               30 tokens in 0.012 s = 2431.2 tok/s, 732 reused from the cache
    answer               24 tokens in 0.457 s = 52.5 tok/s
    time to first token  45.6 ms
    cache                hit
    finish               length

Time to first token (`ttft_ms`) is the request's start to its first answer token, as llama.cpp's
server and Ollama measure it: image encoding and prompt evaluation included. The answer's rate
counts the tokens after the first (the first one's time is prompt evaluation's).
"""

from __future__ import annotations

LABELS = ("load", "image encode", "prompt", "answer", "scored", "time to first token", "total", "cache", "finish")


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 10_000 else f"{value / 1000:.2f} s"


def _rate(tokens: int, ms: float, rate: float | None = None) -> str:
    rate = rate if rate is not None else (tokens / ms * 1000 if ms > 0 else None)
    return f"{tokens} tokens in {ms / 1000:.3f} s" + (f" = {rate:.1f} tok/s" if rate and tokens else "")


def summary(t: dict) -> dict[str, str]:
    """label -> value, in LABELS order; a figure that does not apply (no image, nothing scored,
    a timing this version does not record) is left out."""
    rows: dict[str, str] = {}
    load = (t.get("load_ms") or 0) + (t.get("vision_load_ms") or 0)
    if load:
        rows["load"] = _ms(load) + (f" (vision tower {_ms(t['vision_load_ms'])})" if t.get("vision_load_ms") else "")
    if t.get("image_encode_ms"):
        rows["image encode"] = _ms(t["image_encode_ms"])
    prompt = _rate(t.get("prompt_tokens") or 0, t.get("prompt_ms") or 0, t.get("prompt_tokens_per_s"))
    if t.get("reused_tokens"):
        prompt += f", {t['reused_tokens']} reused from the cache"
    rows["prompt"] = prompt
    if t.get("generated_tokens") or not t.get("scored_tokens"):
        rows["answer"] = _rate(t.get("generated_tokens") or 0, t.get("generation_ms") or 0,
                               t.get("generation_tokens_per_s"))
    if t.get("scored_tokens"):
        rows["scored"] = f"{t['scored_tokens']} tokens (the given answers' likelihoods)"
    if t.get("ttft_ms") is not None:
        rows["time to first token"] = _ms(t["ttft_ms"])
    if t.get("total_ms") is not None:
        rows["total"] = _ms(t["total_ms"])
    if t.get("cache"):
        read = t.get("cache_read_ms")
        rows["cache"] = t["cache"] + (f" (read in {_ms(read)})" if t["cache"] == "hit" and read else "")
    if t.get("finish_reason"):
        rows["finish"] = t["finish_reason"]
    return rows


def log_fields(t: dict) -> str:
    """The same figures on one line (imp serve's log): `prompt 30 tokens (732 reused), answer 24
    tokens (52.5 tok/s), time to first token 45.6 ms, cache hit`."""
    parts = [f"prompt {t.get('prompt_tokens') or 0} tokens ({t.get('reused_tokens') or 0} reused)"]
    rate = t.get("generation_tokens_per_s")
    parts.append(f"answer {t.get('generated_tokens') or 0} tokens" + (f" ({rate:.1f} tok/s)" if rate else ""))
    if t.get("ttft_ms") is not None:
        parts.append(f"time to first token {_ms(t['ttft_ms'])}")
    if t.get("cache"):
        parts.append(f"cache {t['cache']}")
    return ", ".join(parts)


def from_record(record: dict) -> dict:
    """An answer record (record.py: counts under `usage`, durations under `timings`) back into
    the figures summary() reads."""
    usage = record.get("usage") or {}
    return {**(record.get("timings") or {}), "prompt_tokens": usage.get("evaluated_tokens", 0),
            "reused_tokens": usage.get("reused_tokens", 0), "generated_tokens": usage.get("completion_tokens", 0),
            "scored_tokens": usage.get("scored_tokens", 0), "cache": record.get("cache"),
            "finish_reason": record.get("finish_reason")}
