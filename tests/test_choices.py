"""Answers a script can trust: `imp ask --choices`, `--json-schema` and `--grammar`.

- `--choices`: each choice's probability must equal the transformers reference's (softmax over
  the summed log-likelihoods of " {choice}</s>" after the prompt, oracle.answer_logprob), for both
  checkpoint layouts; the printed choice is the oracle's argmax; the prompt is evaluated once for
  all choices (token counts), and the scores equal a fresh, uncached evaluation of each choice.
- `--json-schema` / `--grammar`: over many seeds and temperatures (hypothesis, in one process
  through the Session), every answer of a random tiny model is complete, parses and validates;
  the schemas bound the answer's length so that `--max-tokens` is never what ends it. A few CLI
  runs check what a script sees: stdout, --json records, exit codes, usage errors.
"""

from __future__ import annotations

import json
import math
import re
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from factory import EOS_ID
from test_ask import _torch_one_thread, as_imp_sees_it, env  # noqa: F401  (fixtures, shared)
from helpers import run_imp

QUESTION = "What color is the car?"

# Tolerances. ggml's F16 KV cache and F16/tanh-GELU vision path put the first-step logits
# ~2e-3 x std off the reference (DESIGN.md section 4); over a choice of up to 16 tokens the summed
# log-likelihoods measured here differ by at most 4.2e-3 (nats), the normalised probabilities by
# 3e-5. A real scoring mistake (a missing leading space or end token, an off-by-one position,
# the last token's logits reused) moves a log-likelihood by whole nats.
LOGPROB_TOL = 0.02
PROB_TOL = 5e-3
# The prefix-reuse path against a fresh evaluation: same weights and KV values, only the batch
# split differs.
REUSE_TOL = 1e-3


def assert_usage_line(p: subprocess.CompletedProcess, phrase: str) -> None:
    """Exit 2, nothing on stdout, one stderr line naming the problem."""
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert phrase in lines[0], (phrase, lines[0])


def choices_for(oracle, image) -> list[str]:
    """Single- and multi-token choices, two of them from the oracle's own greedy answer so that
    more than one choice has a probability worth comparing."""
    words = oracle.answer_text(image, QUESTION, 8).split()
    return ["no", "blue", "red", words[0], " ".join(words[:3]), "The car is red."]


# ------------------------------------------------------------------------------------- --choices
@pytest.mark.parametrize("layout", ["new", "old"])
def test_choice_probabilities_equal_oracle(imp_bin, converted, oracle_for, photo, env, layout):
    text, _ = converted(layout)
    oracle = oracle_for(layout)
    image = as_imp_sees_it(photo)
    choices = choices_for(oracle, image)

    p = run_imp("ask", photo, QUESTION, "--model", text, "--choices", ",".join(choices), "--json", env=env)

    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    record = json.loads(p.stdout)
    ref = np.array([oracle.answer_logprob(image, QUESTION, c) for c in choices])
    ref_probs = np.exp(ref - ref.max()) / np.exp(ref - ref.max()).sum()
    ours = np.array([record["choices"][c] for c in choices])
    assert list(record["choices"]) == choices
    assert sorted(ref_probs)[-2] > 0.01  # two live choices: the comparison is not 1 vs 0
    assert np.abs(ours - ref_probs).max() <= PROB_TOL, (ours, ref_probs)
    assert math.isclose(ours.sum(), 1.0, abs_tol=1e-9)
    top, second = sorted(ref)[-1], sorted(ref)[-2]
    assert top - second > 2 * LOGPROB_TOL  # no near-tie: the argmax is well defined
    assert record["answer"] == choices[int(ref.argmax())]
    assert record["finish_reason"] == "stop"


def test_choice_log_likelihoods_equal_oracle_and_prefix_is_evaluated_once(converted, oracle_for, photo):
    """Session.score in a fresh process-like state: the whole prompt is evaluated once, each
    choice adds only its own tokens but the last; every score equals the oracle's and a fresh
    uncached evaluation of prompt + choice."""
    from imp_cli.images import load_image
    from imp_cli.modelfiles import read_pair
    from imp_cli.session import Session

    oracle = oracle_for("new")
    image = as_imp_sees_it(photo)
    choices = choices_for(oracle, image)
    text, mmproj = converted("new")
    with Session(read_pair(text, mmproj), threads=1, ctx=1024) as s:
        staged = s.stage(load_image(str(photo)))
        prompt = s.prompt(staged, QUESTION)
        scores = s.score(staged, QUESTION, choices)

        assert [t[-1] for t in scores.tokens] == [EOS_ID] * len(choices)  # each ends its turn
        assert [t[:-1] for t in scores.tokens] == [oracle.tokenizer.encode(" " + c, add_special_tokens=False).ids
                                                   for c in choices]
        assert max(len(t) for t in scores.tokens) >= 5  # multi-token choices are in the set
        assert scores.timings["prompt_tokens"] == prompt.n_tokens  # the prompt once, not once per choice
        assert scores.timings["scored_tokens"] == sum(len(t) - 1 for t in scores.tokens)
        ref = [oracle.answer_logprob(image, QUESTION, c) for c in choices]
        assert np.abs(np.array(scores.logprobs) - ref).max() <= LOGPROB_TOL

        # The uncached path: each choice token by token from a cold start of the KV cache.
        engine = s.engine
        image_embd = engine.encode_image(staged.pixels, staged.key)
        for tokens, got in zip(scores.tokens, scores.logprobs):
            total = 0.0
            for i, tok in enumerate(tokens):
                engine._truncate(0)
                engine.evaluate([prompt.head, image_embd, prompt.tail + tokens[:i]])
                logits = engine.last_logits().astype(np.float64)
                total += logits[tok] - logits.max() - math.log(np.exp(logits - logits.max()).sum())
            assert abs(total - got) <= REUSE_TOL, (tokens, total, got)

        # A second question about the same image reuses [system, image] (and the tokens its
        # question shares with the first, the "\n" after the image): only the rest is evaluated.
        engine.evaluate([prompt.head, image_embd, prompt.tail])
        tail = s.prompt(staged, "Is it outdoors?").tail
        shared = next(i for i, (a, b) in enumerate(zip(prompt.tail, tail)) if a != b)
        again = s.score(staged, "Is it outdoors?", choices)
        assert again.timings["prompt_tokens"] == len(tail) - shared
        assert again.reused_tokens == len(prompt.head) + image_embd.n_tokens + shared


def test_choices_are_deterministic_whatever_the_temperature(imp_bin, converted, photo, env):
    text, _ = converted("new")
    base = ["ask", photo, QUESTION, "--model", text, "--choices", "no,blue,red", "--json"]
    cold = run_imp(*base, env=env)
    hot = run_imp(*base, "--temperature", "1.7", "--seed", "9", "--top-k", "2", env=env)
    assert cold.returncode == 0 and hot.returncode == 0, (cold.stderr, hot.stderr)
    a, b = json.loads(cold.stdout), json.loads(hot.stdout)
    assert (a["answer"], a["choices"]) == (b["answer"], b["choices"])


def test_choices_from_a_file_for_every_image_and_question(imp_bin, converted, photo, env, tmp_path):
    """One decision per (image, question); plain output is the chosen label verbatim under a
    header per pair, as without --choices."""
    text, _ = converted("new")
    labels = tmp_path / "labels.txt"
    labels.write_text("no\n\nThe car is red.\n  blue  \n")
    other = tmp_path / "other.png"
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    args = ["ask", photo, other, "-q", QUESTION, "-q", "Is it outdoors?", "--model", text, "--choices", f"@{labels}"]

    records = run_imp(*args, "--json", env=env)
    plain = run_imp(*args, env=env)

    assert records.returncode == 0 and plain.returncode == 0, (records.stderr, plain.stderr)
    rows = [json.loads(line) for line in records.stdout.splitlines()]
    assert [(r["image"]["source"], r["question"]) for r in rows] == [
        (str(photo), QUESTION), (str(photo), "Is it outdoors?"), (str(other), QUESTION), (str(other), "Is it outdoors?")]
    for r in rows:
        assert list(r["choices"]) == ["no", "The car is red.", "blue"]
        assert r["answer"] == max(r["choices"], key=r["choices"].get)
    expected = "".join(
        ("\n" if i else "") + f"==> {r['image']['source']} | {r['question']} <==\n{r['answer']}\n"
        for i, r in enumerate(rows))
    assert plain.stdout == expected


@pytest.mark.parametrize("spec,phrase", [
    ("", "no choices"),
    (" , ", "no choices"),
    ("yes,,no", "an empty choice"),
    ("yes,no,yes", "'yes' is given twice"),
    ("yes, yes", "'yes' is given twice"),
    ("@/nonexistent/labels.txt", "not found"),
])
def test_bad_choice_lists_are_usage_errors(imp_bin, photo, env, spec, phrase):
    # The model does not exist: the usage error comes before any model is looked for.
    p = run_imp("ask", photo, QUESTION, "--model", "/nonexistent/model.gguf", "--choices", spec, env=env)
    assert_usage_line(p, phrase)


# ------------------------------------------------------------------- --json-schema and --grammar
def validate(value, schema: dict, path: str = "$") -> None:
    """The JSON-schema keywords the tests use (no jsonschema dependency); raises AssertionError."""
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if t == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), (path, value)
    elif t == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (path, value)
    elif t is not None:
        assert isinstance(value, kinds[t]), (path, value)
    if "enum" in schema:
        assert any(value == v and type(value) is type(v) for v in schema["enum"]), (path, value)
    if "const" in schema:
        assert value == schema["const"] and type(value) is type(schema["const"]), (path, value)
    if "minimum" in schema:
        assert value >= schema["minimum"], (path, value)
    if "maximum" in schema:
        assert value <= schema["maximum"], (path, value)
    if "exclusiveMinimum" in schema:
        assert value > schema["exclusiveMinimum"], (path, value)
    if "exclusiveMaximum" in schema:
        assert value < schema["exclusiveMaximum"], (path, value)
    if "minLength" in schema:
        assert len(value) >= schema["minLength"], (path, value)
    if "maxLength" in schema:
        assert len(value) <= schema["maxLength"], (path, value)
    if "minItems" in schema:
        assert len(value) >= schema["minItems"], (path, value)
    if "maxItems" in schema:
        assert len(value) <= schema["maxItems"], (path, value)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            assert name in value, (path, name, value)
        props = schema.get("properties", {})
        if schema.get("additionalProperties", True) is False:
            assert set(value) <= set(props), (path, value)
        for name, sub in props.items():
            if name in value:
                validate(value[name], sub, f"{path}.{name}")


def test_validator_rejects_what_it_should():
    """The validator the proofs rest on must be able to fail."""
    schema = SCHEMAS["record"]
    validate({"label": "cat", "count": 3, "tags": ["a"], "kind": "animal"}, schema)
    for bad in ({"count": 3, "kind": "animal"}, {"label": "cat", "count": 99, "kind": "animal"},
                {"label": "cat", "count": 3, "kind": "plant"}, {"label": "cat", "count": 3, "kind": "animal", "x": 1},
                {"label": "c" * 13, "count": 3, "kind": "animal"}, {"label": "cat", "count": 2.5, "kind": "animal"},
                {"label": "cat", "count": 3, "kind": "animal", "tags": ["a", "b", "c", "d"]}):
        with pytest.raises(AssertionError):
            validate(bad, schema)


# Every schema bounds its answer (string lengths, item counts, digit counts), so that MAX_TOKENS
# tokens always suffice: each sample must then end by completing the grammar.
SCHEMAS = {
    "record": {  # object with required fields, an enum and an integer range inside
        "type": "object",
        "properties": {"label": {"type": "string", "maxLength": 12},
                       "count": {"type": "integer", "minimum": 0, "maximum": 20},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
                       "kind": {"enum": ["animal", "vehicle", "thing"]}},
        "required": ["label", "count", "kind"],
        "additionalProperties": False,
    },
    "enum": {"enum": ["yes", "no", "maybe", 3, None]},
    "strings": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 8},
                "minItems": 1, "maxItems": 4},
    "ranges": {"type": "object",
               "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2099},
                              "delta": {"type": "integer", "exclusiveMinimum": -50, "exclusiveMaximum": 7},
                              "ok": {"type": "boolean"}},
               "required": ["year", "delta", "ok"]},
}
MAX_TOKENS = 160

# A grammar and the same language as a Python regular expression.
GRAMMAR = r'''
root ::= verdict ", " word (" " word){0,2} " (" digits ")"
verdict ::= "yes" | "no"
word ::= [a-z]{1,6}
digits ::= [1-9] [0-9]?
'''
GRAMMAR_RE = re.compile(r"(yes|no), [a-z]{1,6}( [a-z]{1,6}){0,2} \([1-9][0-9]?\)")


@pytest.fixture(scope="module")
def constraints():
    from imp_cli.constrain import from_grammar, from_schema

    made = {name: from_schema(json.dumps(schema)) for name, schema in SCHEMAS.items()}
    made["grammar"] = from_grammar(GRAMMAR)
    return made


def sample(session, staged, constraint, seed: int, temperature: float, top_k: int = 0):
    from imp_cli.engine import Sampling

    return session.answer(staged, "Describe the image as JSON.", max_tokens=MAX_TOKENS,
                          sampling=Sampling(temperature=temperature, top_k=top_k, seed=seed,
                                            grammar=constraint.grammar)).collect()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(SCHEMAS)), seed=st.integers(0, 2**32 - 1),
       temperature=st.floats(0.2, 3.0), top_k=st.sampled_from([0, 0, 5]))
def test_every_schema_answer_parses_and_validates(session, staged, constraints, name, seed, temperature, top_k):
    answer = sample(session, staged, constraints[name], seed, temperature, top_k)
    assert answer.finish_reason == "stop", answer
    value = json.loads(answer.text)  # strict: no raw control characters inside strings
    validate(value, SCHEMAS[name])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), temperature=st.floats(0.2, 3.0))
def test_every_grammar_answer_matches(session, staged, constraints, seed, temperature):
    answer = sample(session, staged, constraints["grammar"], seed, temperature)
    assert answer.finish_reason == "stop", answer
    assert GRAMMAR_RE.fullmatch(answer.text), answer.text


@pytest.mark.parametrize("name", ["enum", "grammar"])
def test_constrained_answer_starts_as_the_template_writes_answers(session, staged, constraints, name):
    """Phi-2 answers after `ASSISTANT:` with a space (`ASSISTANT: {answer}</s>`): the grammar's
    first token must carry it, as the model learned; the printed answer is the value alone."""
    answer = sample(session, staged, constraints[name], seed=3, temperature=1.0)
    first = session.engine._cached[session.prompt(staged, "Describe the image as JSON.").n_tokens]
    assert session.engine.detokenize([first]).startswith(" ")
    assert answer.finish_reason == "stop" and answer.text == answer.text.strip() != ""


def test_unconstrained_answers_would_not_validate(session, staged):
    """The constraint is what makes the answers valid: the same model unconstrained does not
    write JSON (so the tests above can fail)."""
    from imp_cli.engine import Sampling

    answer = session.answer(staged, "Describe the image as JSON.", sampling=Sampling(temperature=1.0, seed=1),
                            max_tokens=40).collect()
    with pytest.raises(ValueError):
        json.loads(answer.text)


@settings(max_examples=200, deadline=None)
@given(low=st.integers(-3000, 3000), span=st.integers(0, 3000))
def test_integer_range_rule_matches_exactly_the_range(low, span):
    """The integer-range grammar (our addition to the converter), read as a regular expression:
    every integer in [low, high] in canonical form, nothing else."""
    from imp_cli.constrain import integer_range_rule

    high = low + span
    pattern = re.compile(integer_range_rule(low, high).replace('"', "").replace(" ", ""))
    for v in {low - 1, low, low + 1, high - 1, high, high + 1, 0, -1, 1, (low + high) // 2, -low, -high}:
        assert bool(pattern.fullmatch(str(v))) == (low <= v <= high), (low, high, v)
    assert not pattern.fullmatch("-0") and not pattern.fullmatch("007")


def test_cli_schema_answer_is_printed_parsed_and_recorded(imp_bin, converted, photo, env, tmp_path):
    text, _ = converted("new")
    schema = tmp_path / "record.json"
    schema.write_text(json.dumps(SCHEMAS["record"]))
    args = ["ask", photo, "Describe it.", "--model", text, "--json-schema", f"@{schema}",
            "--temperature", "0.9", "--seed", "4", "-n", MAX_TOKENS]

    plain = run_imp(*args, env=env)
    record = run_imp(*args, "--json", env=env)

    assert plain.returncode == 0 and plain.stderr == "", plain.stderr
    assert record.returncode == 0, record.stderr
    value = json.loads(plain.stdout)
    validate(value, SCHEMAS["record"])
    assert json.loads(record.stdout)["answer"] == value  # the parsed object, not a string


def test_cli_grammar_answer(imp_bin, converted, photo, env, tmp_path):
    text, _ = converted("old")
    gbnf = tmp_path / "verdict.gbnf"
    gbnf.write_text(GRAMMAR)
    p = run_imp("ask", photo, "Is it red?", "--model", text, "--grammar", f"@{gbnf}",
                "--temperature", "1.2", "--seed", "11", env=env)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.endswith("\n") and GRAMMAR_RE.fullmatch(p.stdout[:-1]), p.stdout


def test_cli_unfinished_answer_is_not_printed(imp_bin, converted, photo, env):
    """--max-tokens before the grammar completes: nothing on stdout (or answer null), a warning,
    exit 1."""
    text, _ = converted("new")
    args = ["ask", photo, "Describe it.", "--model", text, "--json-schema", json.dumps(SCHEMAS["record"]), "-n", "4"]

    plain = run_imp(*args, env=env)
    record = run_imp(*args, "--json", env=env)

    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.splitlines() == ["warning: the answer reached --max-tokens before it was complete: not printed"]
    assert record.returncode == 1
    r = json.loads(record.stdout)
    assert (r["answer"], r["finish_reason"]) == (None, "length")


@pytest.mark.parametrize("option,value,phrase", [
    ("--json-schema", "{not json", "not valid JSON"),
    ("--json-schema", "[1, 2]", "must be a JSON object"),
    ("--json-schema", '{"type": "string", "format": "email"}', "format 'email'"),
    ("--json-schema", '{"type": "number", "minimum": 0.5}', "integer\" only"),
    ("--json-schema", '{"not": {"type": "string"}}', "unsupported keyword 'not'"),
    ("--json-schema", '{"type": "object", "required": ["x"]}', "required property 'x'"),
    ("--json-schema", '{"type": "integer", "minimum": 5, "maximum": 4}', "no integer"),
    ("--json-schema", '{"type": "string", "pattern": "abc"}', "Pattern must start"),
    ("--json-schema", '{"$ref": "#/$defs/missing"}', "cannot be used"),
    ("--grammar", 'root ::= "a" | b', "Undefined rule identifier 'b'"),
    ("--grammar", 'root ::= [a-z', "does not parse"),
    ("--grammar", 'answer ::= "a"', "does not contain a 'root' symbol"),
    ("--grammar", 'root ::= root "a" | "b"', "left recursion"),
    ("--grammar", 'root ::= <|endoftext|>', "no vocab"),
    ("--grammar", "@/nonexistent/g.gbnf", "not found"),
])
def test_unusable_schema_or_grammar_is_a_usage_error(imp_bin, photo, env, option, value, phrase):
    p = run_imp("ask", photo, QUESTION, "--model", "/nonexistent/model.gguf", option, value, env=env)
    assert_usage_line(p, phrase)


def test_one_constraint_at_a_time(imp_bin, photo, env):
    p = run_imp("ask", photo, QUESTION, "--choices", "a,b", "--grammar", 'root ::= "a"', env=env)
    assert_usage_line(p, "--choices and --grammar cannot be combined")


# Real schemas, as a script would write them: objects and arrays of bounded scalars (strings of at
# most 5 characters, integer ranges, booleans, null, enums, consts), nested up to two levels, with
# required fields and closed objects. Every one is bounded so that MAX_TOKENS always suffices.
_NAMES = st.sampled_from(["name", "n", "ok", "tags", "kind", "year", "x", "sub"])
_SCALAR = st.one_of(
    st.builds(lambda lo, span: {"type": "string", "minLength": lo, "maxLength": lo + span},
              st.integers(0, 2), st.integers(0, 3)),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 2000), st.integers(0, 100)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.sampled_from(["cat", "dog", "red", 1, 7, None, True]), min_size=1, max_size=4, unique=True)
    .map(lambda values: {"enum": values}),
    st.sampled_from(["yes", 3, False]).map(lambda value: {"const": value}),
)


def _array_of(items):
    return st.builds(lambda item, lo, span: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + span},
                     items, st.integers(0, 1), st.integers(0, 2))


def _object_of(values):
    def build(props: dict, required: list, closed: bool) -> dict:
        schema = {"type": "object", "properties": props, "required": [n for n in required if n in props]}
        if closed:
            schema["additionalProperties"] = False
        return schema

    return st.builds(build, st.dictionaries(_NAMES, values, min_size=1, max_size=3),
                     st.lists(_NAMES, max_size=3, unique=True), st.booleans())


_LEVEL_1 = st.one_of(_SCALAR, _array_of(_SCALAR))
REAL_SCHEMAS = st.one_of(_object_of(_LEVEL_1), _array_of(_object_of(_SCALAR)), _array_of(_SCALAR),
                         _object_of(st.one_of(_SCALAR, _object_of(_SCALAR))))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=REAL_SCHEMAS, seed=st.integers(0, 2**32 - 1))
def test_real_schemas_are_accepted_and_their_answers_validate(session, staged, schema, seed):
    """Every generated object/array schema is accepted (a grammar llama.cpp parses), and an
    answer sampled under it is complete, parses and validates against it."""
    from imp_cli.constrain import from_schema

    assert schema["type"] in ("object", "array")
    constraint = from_schema(json.dumps(schema))  # no ConstraintError: a real schema is usable
    answer = sample(session, staged, constraint, seed, temperature=1.0)
    assert answer.finish_reason == "stop", (schema, answer)
    validate(json.loads(answer.text), schema)


# What the documentation says is refused, each applied to a real schema: the refusal names it.
_REFUSALS = [
    (lambda s: {**s, "not": {"type": "string"}}, "unsupported keyword 'not'"),
    (lambda s: {**s, "format": "email"}, "format 'email'"),
    (lambda s: {**s, "required": [*s.get("required", []), "missing_field"]}
     if s["type"] == "object" else {**s, "minItems": 3, "maxItems": 2}, None),
]


@settings(max_examples=60, deadline=None)
@given(schema=REAL_SCHEMAS, refusal=st.sampled_from(range(len(_REFUSALS))))
def test_schemas_with_a_refused_keyword_are_refused_for_that_reason(schema, refusal):
    from imp_cli.constrain import ConstraintError, from_schema

    change, phrase = _REFUSALS[refusal]
    bad = change(schema)
    if phrase is None:
        phrase = "required property 'missing_field'" if schema["type"] == "object" else "minItems exceeds maxItems"
    with pytest.raises(ConstraintError) as e:
        from_schema(json.dumps(bad))
    assert phrase in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))


_KEYWORDS = ["type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
             "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "$defs", "pattern", "format",
             "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum", "description", "not"]
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 30) | st.floats(-5, 5, allow_nan=False)
    | st.sampled_from(["string", "integer", "number", "object", "array", "boolean", "null", "date",
                       "email", "^[a-z]+$", "#/$defs/a", "a", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYWORDS + ["a", "b"]), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(schema=_JSON)
def test_arbitrary_json_never_crashes_the_schema_reader(schema):
    """Any JSON at all (mostly nonsense): a grammar, or a one-line ConstraintError, never another
    exception. (That the grammars are right is the property test above.)"""
    from imp_cli.constrain import ConstraintError, from_schema

    try:
        from_schema(json.dumps(schema))
    except ConstraintError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("schema,phrase", [
    ({"type": "integer", "minimum": 0, "enum": [1, 50]}, "enum with minimum"),
    ({"type": "string", "enum": ["a", 1]}, "1 in the schema is not of type 'string'"),
    ({"anyOf": [{"type": "string"}], "maxLength": 3}, "anyOf with maxLength"),
    ({"type": ["string", "null"], "maxLength": 3}, "a list of types with maxLength"),
    ({"type": "array", "maxItems": 2}, "minItems/maxItems in the schema need items"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 2}, "minItems exceeds maxItems"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "no pattern or format"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "uri"}}}, "format 'uri' in property 'a'"),
    ({"enum": []}, "enum in the schema must be a non-empty list"),
    ({"type": "object", "properties": []}, "properties in the schema must be an object of schemas"),
])
def test_keywords_the_converter_would_ignore_are_refused(schema, phrase):
    """The converter reads one keyword of several and drops the rest: answers would then not
    validate, so such schemas are refused (exit 2 through the CLI, as tested above)."""
    from imp_cli.constrain import ConstraintError, from_schema

    with pytest.raises(ConstraintError) as e:
        from_schema(json.dumps(schema))
    assert phrase in str(e.value)
