"""`imp serve`: the OpenAI request fields beyond the messages, each supported or refused with a
400 — never silently ignored — and the server-wide defaults (--system, --top-p, --top-k, --seed),
the `model` names it answers to, CORS, and the usage it reports.

- response_format: `text`; `json_object` (any JSON object); `json_schema` ({"name", "schema",
  "strict"}): the schema goes through the same checks and converter as `imp ask --json-schema`
  (a schema it cannot enforce is a 400), and generation follows the grammar it becomes.
- logprobs / top_logprobs (0-20): the log-probabilities of the model's own distribution at each
  step (log-softmax of the logits, before temperature / top-k / top-p), not streamed.
- model: the served id, the GGUF's own name (general.name), or anything `--model` would resolve
  to the same GGUF file (a store name, a path). Any other name is a 404 naming the served id.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .api_errors import _bad, _flag, _number

MAX_TOP_LOGPROBS = 20  # as OpenAI

# Fields of OpenAI's chat completion request that imp serve ignores, and why (the README's table).
IGNORED = {
    "user": "an end-user id for abuse monitoring: nothing to monitor on a local server",
    "metadata": "stored-completion tags: nothing is stored",
    "store": "nothing is stored",
    "service_tier": "one engine, one tier",
    "parallel_tool_calls": "only meaningful with tools, which are refused",
    "prompt_cache_key": "the prompt cache is keyed by content (model, image, prefix)",
    "safety_identifier": "an end-user id for abuse monitoring: nothing to monitor on a local server",
}
# Fields refused with a 400 (the model cannot do what they ask).
REFUSED = {
    "tools": "Imp has no tool calling",
    "tool_choice": "Imp has no tool calling",
    "functions": "Imp has no function calling",
    "function_call": "Imp has no function calling",
    "audio": "Imp has no audio",
    "modalities": "Imp answers in text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "no web search",
    "logit_bias": "not supported by imp serve",
    "frequency_penalty": "not supported by imp serve (no repetition penalties in imp's sampler)",
    "presence_penalty": "not supported by imp serve (no repetition penalties in imp's sampler)",
    "reasoning_effort": "Imp is not a reasoning model",
    "verbosity": "not supported by imp serve",
}


def refuse_unsupported(body: dict) -> None:
    """A field whose request imp cannot honour is a 400, never a silent ignore. A field given as
    null (or an OpenAI default that asks for nothing) is not a request."""
    harmless = {"frequency_penalty": 0, "presence_penalty": 0, "tools": [], "logit_bias": {}}
    for name, why in REFUSED.items():
        value = body.get(name)
        if value is None or (name in harmless and value == harmless[name]):
            continue
        raise _bad(f"'{name}' is not supported: {why}", name, "unsupported_parameter")


def response_format(body: dict):
    """-> a constrain.Constraint (schema set: the content is JSON) or None for plain text."""
    from .constrain import ConstraintError, schema_constraint

    spec = body.get("response_format")
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise _bad("'response_format' must be an object with a 'type'", "response_format", "invalid_type")
    kind = spec["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema: dict = {"type": "object"}
    elif kind == "json_schema":
        inner = spec.get("json_schema")
        if not isinstance(inner, dict) or not isinstance(inner.get("schema", {}), dict):
            raise _bad("'response_format.json_schema' must be an object with a 'schema' object",
                       "response_format.json_schema", "invalid_type")
        schema = inner.get("schema") or {"type": "object"}
    else:
        raise _bad(f"'response_format.type' must be 'text', 'json_object' or 'json_schema', not {kind!r}",
                   "response_format.type")
    try:
        return schema_constraint(schema, "response_format")
    except ConstraintError as e:
        raise _bad(str(e), "response_format") from None


def logprobs_option(body: dict, stream: bool) -> int:
    """-> -1 (none), or how many alternatives to give per token (0: the chosen token's only)."""
    wanted = _flag(body, "logprobs")
    top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if not wanted:
        return -1
    if stream:
        raise _bad("'logprobs' is not supported with 'stream': ask without streaming", "logprobs",
                   "unsupported_parameter")
    return top or 0


def apply_defaults(r, body: dict, options) -> None:
    """The server-wide defaults for what a request does not say (imp serve --top-p, --top-k,
    --seed, --system), then the fields above. `r`: serve.ChatRequest (changed in place)."""
    s = r.sampling
    s = replace(s, top_p=options.top_p if body.get("top_p") is None else s.top_p,
                top_k=options.top_k if body.get("top_k") is None else s.top_k,
                seed=options.seed if body.get("seed") is None else s.seed)
    refuse_unsupported(body)
    constraint = response_format(body)
    if constraint is not None:
        s = replace(s, grammar=constraint.grammar)
    r.logprobs = logprobs_option(body, r.stream)
    s = replace(s, logprobs=r.logprobs)
    r.sampling, r.constraint = s, constraint
    if r.system is None and options.system is not None:
        r.system = options.system


def logprobs_content(engine, entries, text_len: int) -> dict:
    """OpenAI's `logprobs` object for the tokens behind the first `text_len` characters of the
    answer as sent (which drops the leading blanks the tokens carry). `entries`: the engine's
    (token id, logprob, [(id, logprob)...]) per generated token, the end-of-turn token excluded."""
    full = "".join(engine.token_bytes(t).decode("utf-8", "replace") for t, _, _ in entries)
    lead = len(full) - len(full.lstrip())
    def item(token: int, logprob: float) -> dict:
        raw = engine.token_bytes(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": round(float(logprob), 6), "bytes": list(raw)}

    content, seen = [], 0
    for token, logprob, top in entries:
        if seen >= lead + text_len and content:
            break
        seen += len(engine.token_bytes(token).decode("utf-8", "replace"))
        content.append({**item(token, logprob), "top_logprobs": [item(t, lp) for t, lp in top]})
    return {"content": content, "refusal": None}


def accepts_model(name: str, served: str, pair) -> bool:
    """A request's `model` names the served pair: its served id, the GGUF's own name, the file's
    stem, or anything that resolves (as --model would) to the same text GGUF."""
    if name in (served, pair.name, pair.text_path.stem):
        return True
    from .errors import ImpError
    from .resolve import resolve

    try:
        found = resolve(name)
    except (ImpError, OSError, ValueError):
        return False
    try:
        return found.text is not None and Path(found.text).samefile(pair.text_path)
    except OSError:
        return False


def usage(outcome) -> dict:
    """As OpenAI's: prompt_tokens counts the whole prompt (image included), of which
    prompt_tokens_details.cached_tokens were reused; the same meaning as `imp ask --json`'s usage."""
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.reused_tokens}}


def with_cors(app, origins: list[str]):
    """--cors-origin: browsers on those origins may call the API (preflights answered; the
    Authorization header allowed). Without the option no CORS header is sent: browsers then
    refuse cross-origin calls, as they should for a local server."""
    if not origins:
        return app
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST", "OPTIONS"],
                          allow_headers=["Authorization", "Content-Type"], max_age=600)
