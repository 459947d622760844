"""Issue 24, `imp serve`: what a request asks for is done or refused with a 400, never ignored
(response_format, logprobs, unsupported fields), image_url as a plain string, the `model` names it
answers to, server-wide defaults (--system, --top-p, --top-k, --seed), the seed it returns, and
--cors-origin. One server for the module."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schema_check import errors
from test_serve import QUESTION, Server, as_imp_sees_it, data_url, raw, user

ORIGIN = "http://app.example"
SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "maxLength": 8},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["label", "count"], "additionalProperties": False}
# Log-probabilities against the oracle (transformers, float32, same weights): the F16 file and
# ggml's F16 KV cache cost ~2e-3 x std of the logits (DESIGN.md); 0.02 nats absolute covers it
# with room (measured: at most 1.3e-3 over four questions), and a wrong distribution (another position, temperature applied, no softmax) is off
# by far more.
LOGPROB_TOL = 0.02


@pytest.fixture(scope="module")
def server(imp_bin, converted, env):
    text, _ = converted("new", "float16", "square")
    s = Server(imp_bin, text, env, "--cors-origin", ORIGIN, "--seed", "1234", "--top-k", "5",
               "--system", "Be brief.")
    yield s
    assert s.stop() == 0, s.log()


def post(server, **body):
    body.setdefault("model", server.model)
    body.setdefault("max_tokens", 6)
    status, headers, data = raw(server.port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                                {"Content-Type": "application/json"})
    return status, json.loads(data)


def test_json_schema_response_validates(server, photo):
    status, reply = post(server, messages=[user("Describe it as JSON.", data_url(photo))], max_tokens=60,
                         response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}})
    assert status == 200, reply
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert errors(json.loads(choice["message"]["content"]), SCHEMA) == []
    status, reply = post(server, messages=[user("JSON please.")], max_tokens=40, response_format={"type": "json_object"})
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
    if reply["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(reply["choices"][0]["message"]["content"]), dict)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "email"}}}},
     "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"logprobs": True, "stream": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
], ids=["schema it cannot enforce", "unknown format", "logprobs streamed", "top_logprobs alone",
        "too many alternatives", "tools", "penalty"])
def test_what_cannot_be_honoured_is_a_400(server, body, param):
    status, reply = post(server, messages=[user(QUESTION)], **body)
    assert (status, reply["error"]["param"]) == (400, param), reply


def test_logprobs_match_the_oracle(server, photo, oracle_for):
    status, reply = post(server, messages=[user(QUESTION, data_url(photo))], temperature=0, max_tokens=3,
                         logprobs=True, top_logprobs=3)
    assert status == 200, reply
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) >= 1 and len(content[0]["top_logprobs"]) == 3
    oracle = oracle_for("new", "float16", "square")
    logits = np.asarray(oracle.first_logits(as_imp_sees_it(photo), QUESTION, system="Be brief."), dtype=np.float64)
    want = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    first = content[0]
    best = int(np.argmax(want))
    assert abs(first["logprob"] - want[best]) < LOGPROB_TOL, (first, want[best])
    assert first["top_logprobs"][0]["logprob"] == first["logprob"]  # greedy: the top alternative
    for alt in first["top_logprobs"]:
        assert alt["logprob"] <= first["logprob"] + 1e-9
    assert abs(sum(np.exp(a["logprob"]) for a in first["top_logprobs"])
               - np.sort(np.exp(want))[::-1][:3].sum()) < LOGPROB_TOL


def test_image_url_as_a_plain_string(server, photo):
    status, reply = post(server, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": data_url(photo)}, {"type": "text", "text": QUESTION}]}])
    assert status == 200, reply


def test_model_names_that_resolve_to_the_served_file(server, converted):
    text, _ = converted("new", "float16", "square")
    for name in (server.model, str(text), str(text.parent)):
        status, reply = post(server, model=name, messages=[user(QUESTION)], max_tokens=1)
        assert status == 200, (name, reply)
        assert reply["model"] == server.model
    status, reply = post(server, model="gpt-4o", messages=[user(QUESTION)])
    assert status == 404 and server.model in reply["error"]["message"]


def test_seed_defaults_and_is_returned(server):
    hot = {"messages": [user(QUESTION)], "temperature": 1.3, "max_tokens": 8}
    status, a = post(server, **hot)
    assert status == 200 and a["seed"] == 1234  # imp serve --seed 1234: the default
    status, b = post(server, **hot, seed=77)
    status, c = post(server, **hot, seed=77)
    assert b["seed"] == c["seed"] == 77 and b["choices"][0]["message"]["content"] == c["choices"][0]["message"]["content"]
    status, g = post(server, messages=[user(QUESTION)], temperature=0)
    assert g["seed"] is None  # greedy


def test_usage_means_what_ask_json_means(server, photo):
    _, first = post(server, messages=[user("First?", data_url(photo))], max_tokens=2)
    _, second = post(server, messages=[user("Second?", data_url(photo))], max_tokens=2)
    u = second["usage"]
    assert u["prompt_tokens_details"]["cached_tokens"] > 16  # the image prefix, reused
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["prompt_tokens"] > u["prompt_tokens_details"]["cached_tokens"]


def test_cors_only_for_the_given_origin(server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = raw(server.port, "OPTIONS", "/v1/chat/completions", None, preflight)
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = raw(server.port, "GET", "/v1/models", None, {"Origin": ORIGIN})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
    status, headers, _ = raw(server.port, "GET", "/v1/models", None, {"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_system_default(server):
    """imp serve --system: used when a conversation has none."""
    _, default = post(server, messages=[user(QUESTION)], max_tokens=1)
    _, explicit = post(server, messages=[{"role": "system", "content": "Be brief."}, user(QUESTION)], max_tokens=1)
    _, other = post(server, messages=[{"role": "system", "content": "Be very, very brief indeed."}, user(QUESTION)],
                    max_tokens=1)
    assert default["usage"]["prompt_tokens"] == explicit["usage"]["prompt_tokens"] < other["usage"]["prompt_tokens"]


@pytest.mark.parametrize("schema", [
    {"type": "string", "format": "email"},  # a keyword value it cannot enforce
    {"type": "object", "patternProperties": {}},  # a keyword it does not know
    {"$ref": "#/$defs/missing"},  # the converter's own complaint
], ids=["format", "keyword", "converter"])
def test_a_schema_refusal_speaks_of_response_format_not_of_a_cli_option(schema):
    """A client reads what its own request did wrong: the 400 names response_format and never
    `imp ask`'s --json-schema option (it did: "response_format: --json-schema: format ...")."""
    from imp_cli.api_errors import ApiError
    from imp_cli.openai_fields import response_format

    with pytest.raises(ApiError) as e:
        response_format({"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    assert (e.value.status, e.value.param) == (400, "response_format")
    assert e.value.message.startswith("response_format") and "--json-schema" not in e.value.message, e.value.message
