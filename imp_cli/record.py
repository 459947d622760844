"""The one answer record: what `imp ask --json` (and its --output file), `imp chat --json` and the
Python API give for an answer, built here and nowhere else. Its shape is imp_cli/schema/record.schema.json
(also in the README); tests validate every --json line the suite produces against it.

Each field appears once (finish_reason and cache at the top, not again in the timings); token
counts are named as OpenAI's `usage` names them, with prompt_tokens counting the whole prompt
(evaluated + reused), as `imp serve` counts it; every duration is in ms, including total_ms.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMA_PATH = Path(__file__).parent / "schema" / "record.schema.json"

# Keys of the engine's timing dict that are counts or states, not durations: they go to `usage`
# or the top level, never twice.
_NOT_TIMINGS = {"prompt_tokens", "reused_tokens", "scored_tokens", "generated_tokens", "finish_reason", "cache"}


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def completion_tokens(result) -> int:
    """The answer's tokens: the end-of-turn token that closed it is not one (OpenAI does not
    count it either). `result`: a session.Answer (a --choices decision generates none)."""
    generated = int(result.timings.get("generated_tokens") or 0)
    return max(0, generated - (1 if result.finish_reason == "stop" and generated else 0))


def usage(result) -> dict:
    """OpenAI-named token counts of a session.Answer (or a constrain.Decision / session.Scores)."""
    t = result.timings
    evaluated, reused = int(t.get("prompt_tokens") or 0), int(t.get("reused_tokens") or 0)
    completion = completion_tokens(result) if "generated_tokens" in t and not t.get("scored_tokens") else 0
    out = {"prompt_tokens": evaluated + reused, "evaluated_tokens": evaluated, "reused_tokens": reused,
           "completion_tokens": completion}
    if t.get("scored_tokens"):
        out["scored_tokens"] = int(t["scored_tokens"])
    out["total_tokens"] = out["prompt_tokens"] + completion
    return out


def timings(result) -> dict:
    """Durations (ms) and rates (tokens/s) only; a rate nothing was measured for is left out."""
    return {k: v for k, v in result.timings.items()
            if k not in _NOT_TIMINGS and v is not None and k.endswith(("_ms", "_per_s"))}


def model_info(pair) -> dict:
    return {"name": pair.name, "text": str(pair.text_path), "mmproj": str(pair.mmproj_path),
            "quant": pair.text_type, "mmproj_type": pair.mmproj_type}


def image_info(staged) -> dict | None:
    if staged is None:
        return None
    return {"source": staged.source, "width": staged.width, "height": staged.height, "sha256": staged.sha256}


def sampling_info(sampling, max_tokens: int, seed: int | None) -> dict:
    greedy = sampling.temperature <= 0
    return {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
            "seed": None if greedy else seed, "max_tokens": max_tokens}


def settings_info(tuning) -> dict:
    return {"repack": bool(tuning.repack), "flash_attn": bool(tuning.flash_attn)}


def run_fields(pair, tuning, sampling, max_tokens: int, seed: int | None) -> dict:
    """What a record says about the model and how it answered (model, sampling, settings): the
    same for every answer of a run with a given seed; `imp ask --resume` compares them
    (batch.same_run). `seed`: the answer's (None: greedy, or scored choices)."""
    return {"model": model_info(pair), "sampling": sampling_info(sampling, max_tokens, seed),
            "settings": settings_info(tuning)}


def error_record(source: str, question: str, message: str, fields: dict, sha256: str | None = None) -> dict:
    """The line of an (image, question) a batch could not answer: the image could not be read,
    decoded or fetched. Not an answer record (no `answer`): `error` says why; `--resume` tries
    it again. `fields`: the run's run_fields."""
    return {"error": message, "question": question, "image": {"source": source, "sha256": sha256},
            "model": fields["model"], "sampling": fields["sampling"], "settings": fields["settings"]}


_UNSET = object()


def build(result, *, question: str, pair, image, tuning, sampling, max_tokens: int, answer=_UNSET,
          choices: dict | None = None, turn: int | None = None) -> dict:
    """The record of one answer.

    result: the session.Answer (or constrain.Decision with --choices); question: as asked;
    pair: the modelfiles.ModelPair; image: the session.Staged (None without one); tuning: the
    engine's Tuning; sampling: the engine.Sampling asked for (the seed used is the answer's own);
    answer: the value to record when it is not the text (a parsed --json-schema value, or None);
    turn: imp chat's turn number.
    """
    seed = getattr(result, "seed", None)
    record = {"answer": result.text if answer is _UNSET else answer}
    if choices is not None:
        record["choices"] = choices
    record["question"] = question
    if turn is not None:
        record["turn"] = turn
    fields = run_fields(pair, tuning, sampling, max_tokens, None if choices is not None else seed)
    record.update({
        "model": fields["model"],
        "image": image_info(image),
        "sampling": fields["sampling"],
        "settings": fields["settings"],
        "finish_reason": result.finish_reason,
        "cache": result.cache,
        "usage": usage(result),
        "timings": timings(result),
    })
    return record


def from_session(session, result, **kw) -> dict:
    """build() for an answer `session` (a session.Session) gave: its model pair and engine settings.
    For the callers that hold a Session."""
    return build(result, pair=session.pair, tuning=session.engine.tuning, **kw)
