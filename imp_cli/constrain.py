"""Answers a script can trust: `--choices` (score a fixed set of answers, print the likeliest) and
`--json-schema` / `--grammar` (generation only through tokens a GBNF grammar allows).

Everything a user gives here is checked before any model is loaded: a bad choice list, schema
or grammar is a usage error (ConstraintError -> exit 2). The schema is turned into GBNF by
llama-cpp-python's own converter; keywords it would silently ignore are refused rather than
producing answers that do not validate, and two gaps are filled (integer ranges; no raw control
characters inside strings, which strict JSON forbids).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


class ConstraintError(ValueError):
    """A --choices/--json-schema/--grammar value that cannot be used: a usage error."""


def from_options(choices: str | None, json_schema: str | None, grammar: str | None):
    """The `imp ask` options -> (choice list or None, Constraint or None); at most one given."""
    given = [name for name, v in (("--choices", choices), ("--json-schema", json_schema), ("--grammar", grammar))
             if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"{' and '.join(given)} cannot be combined: give one")
    if choices is not None:
        return parse_choices(choices), None
    if json_schema is not None:
        return None, from_schema(json_schema)
    return None, from_grammar(grammar) if grammar is not None else None


# -- --choices ------------------------------------------------------------------------------------
def parse_choices(spec: str) -> list[str]:
    """`A,B,...` or `@file` (one choice per line; blank lines skipped); blanks around each choice
    are dropped. Empty or duplicate choices are refused."""
    if spec.startswith("@"):
        text = _read(spec[1:], "choices file")
        choices = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        choices = [c.strip() for c in spec.split(",")]
    if not any(choices):
        raise ConstraintError(f"--choices: no choices in {spec!r}")
    return check_choices(choices, f" in {spec!r}")


def check_choices(choices: list[str], where: str = "", option: str = "--choices") -> list[str]:
    """At least two choices, none empty, none twice (`where` ends the empty-choice message)."""
    if not all(choices):
        raise ConstraintError(f"{option}: an empty choice{where}")
    seen = set()
    for c in choices:
        if c in seen:
            raise ConstraintError(f"{option}: {c!r} is given twice")
        seen.add(c)
    if len(choices) < 2:
        raise ConstraintError(f"{option}: give at least two choices")
    return choices


@dataclass
class Decision:
    text: str  # the chosen answer
    probabilities: dict[str, float]  # normalised over the choices, in the order given
    logprobs: list[float]
    timings: dict
    cache: str
    finish_reason: str = "stop"


def decide(session, staged, question: str, choices: list[str], system: str | None = None) -> Decision:
    """The likeliest of `choices` as the model's whole answer; probabilities are the softmax of
    the choices' summed log-likelihoods. Ties go to the first given."""
    scores = session.score(staged, question, choices, system=system)
    top = max(scores.logprobs)
    weights = [math.exp(lp - top) for lp in scores.logprobs]
    total = sum(weights)
    best = max(range(len(choices)), key=lambda i: (scores.logprobs[i], -i))
    return Decision(choices[best], {c: w / total for c, w in zip(choices, weights)}, scores.logprobs,
                    scores.timings, scores.cache)


# -- --json-schema / --grammar --------------------------------------------------------------------
@dataclass(frozen=True)
class Constraint:
    grammar: str  # GBNF, root rule `root`
    schema: dict | None = field(default=None)  # with --json-schema: answers are JSON values

    def parse(self, text: str) -> Any:
        """The answer as the record carries it: the parsed JSON value under a schema, else text."""
        if self.schema is None:
            return text
        try:
            return json.loads(text)
        except ValueError as e:  # the grammar should make this impossible: say so if it happens
            from .errors import ImpError

            raise ImpError(f"the answer is not valid JSON ({e})") from None


def from_schema(spec: str, option: str = "--json-schema") -> Constraint:
    """--json-schema: inline JSON or @file.json -> a checked grammar (errors name `option`)."""
    text = _read(spec[1:], "schema file") if spec.startswith("@") else spec
    try:
        schema = json.loads(text)
    except ValueError as e:
        if not spec.startswith("@") and _names_a_file(spec, ".json"):
            raise ConstraintError(f"{option} {spec}: the value is the schema itself; to read it from "
                                  f"the file, write {option} @{spec}") from None
        raise ConstraintError(f"{option} is not valid JSON: {e}") from None
    except RecursionError:
        raise ConstraintError(f"{option} is nested too deeply") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"{option} must be a JSON object (a schema)")
    return schema_constraint(schema, option)


def schema_constraint(schema: dict, option: str = "--json-schema") -> Constraint:
    """A parsed JSON schema -> a checked grammar: the one way for `imp ask --json-schema`, imp
    serve's response_format and the Python API's schema=. Every refusal names `option`, the
    place the user gave the schema."""
    try:
        check_schema(schema)
        grammar = schema_to_gbnf(schema)
    except RecursionError:
        raise ConstraintError(f"{option} is nested too deeply") from None
    except ConstraintError as e:  # check_schema's: what the converter would ignore
        raise ConstraintError(f"{option}: {e}") from None
    except (AssertionError, KeyError, ValueError, TypeError, AttributeError) as e:
        # The converter's own complaints (a $ref it cannot resolve, a pattern it cannot read).
        raise ConstraintError(f"{option} cannot be used: {e or type(e).__name__}") from None
    _check_gbnf(grammar, option)
    return Constraint(grammar, schema)


def from_grammar(spec: str) -> Constraint:
    """--grammar @file.gbnf (or the grammar inline) -> a checked grammar."""
    if not spec.startswith("@") and _names_a_file(spec, ".gbnf"):
        raise ConstraintError(f"--grammar {spec}: the value is the grammar itself; to read it from the "
                              f"file, write --grammar @{spec}")
    grammar = _read(spec[1:], "grammar file") if spec.startswith("@") else spec
    if not grammar.strip():
        raise ConstraintError("--grammar: the grammar is empty")
    _check_gbnf(grammar, "--grammar")
    return Constraint(grammar)


def _check_gbnf(grammar: str, option: str) -> None:
    from .engine import check_grammar

    problem = check_grammar(grammar)
    if problem:
        raise ConstraintError(f"{option}: the grammar does not parse: {problem}")


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _dict_of_dicts(v) -> bool:
    return isinstance(v, dict) and all(isinstance(x, dict) for x in v.values())


# What each keyword's value must be (a malformed schema is a usage error, not a traceback).
_SHAPES = {
    "type": (lambda v: isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(t, str) for t in v)),
             "a type name or a non-empty list of them"),
    "properties": (_dict_of_dicts, "an object of schemas"),
    "$defs": (_dict_of_dicts, "an object of schemas"),
    "definitions": (_dict_of_dicts, "an object of schemas"),
    "required": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names"),
    "additionalProperties": (lambda v: isinstance(v, (bool, dict)), "true, false or a schema"),
    "items": (lambda v: isinstance(v, dict) or (isinstance(v, list) and all(isinstance(x, dict) for x in v)),
              "a schema or a list of schemas"),
    "prefixItems": (lambda v: isinstance(v, list) and v and all(isinstance(x, dict) for x in v),
                    "a non-empty list of schemas"),
    "anyOf": (lambda v: isinstance(v, list) and v and all(isinstance(x, dict) for x in v),
              "a non-empty list of schemas"),
    "enum": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list"),
    "$ref": (lambda v: isinstance(v, str), "a string"),
    "pattern": (lambda v: isinstance(v, str), "a string"),
    "format": (lambda v: isinstance(v, str), "a string"),
    **{k: (_count, "a non-negative integer") for k in ("minItems", "maxItems", "minLength", "maxLength")},
}

# Keywords the converter honours (or we add), and annotations that constrain nothing.
_ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples",
                "deprecated", "readOnly", "writeOnly"}
_HONOURED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems",
             "minItems", "maxItems", "enum", "const", "anyOf", "$ref", "$defs", "definitions",
             "pattern", "format", "minLength", "maxLength",
             "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_TYPES = {"string", "number", "integer", "boolean", "null", "object", "array"}
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def check_schema(schema: Any, where: str = "the schema") -> None:
    """Refuse what the converter would ignore, so that every answer validates."""
    if not isinstance(schema, dict):
        raise ConstraintError(f"{where} must be an object")
    for key in schema:
        if key not in _HONOURED and key not in _ANNOTATIONS:
            raise ConstraintError(f"unsupported keyword {key!r} in {where}")
        shape = _SHAPES.get(key)
        if shape and not shape[0](schema[key]):
            raise ConstraintError(f"{key} in {where} must be {shape[1]}")
    kind = schema.get("type")
    for t in kind if isinstance(kind, list) else [kind] if kind is not None else []:
        if t not in _TYPES:
            raise ConstraintError(f"unknown type {t!r} in {where}")
    _check_precedence(schema, where)
    fmt = schema.get("format")
    if fmt is not None and fmt not in _FORMATS:
        raise ConstraintError(f"format {fmt!r} in {where} cannot be enforced "
                              f"(supported: {', '.join(sorted(_FORMATS))})")
    if ("minLength" in schema or "maxLength" in schema) and (kind != "string" or "pattern" in schema or fmt):
        raise ConstraintError(f"minLength/maxLength in {where} need \"type\": \"string\" "
                              "and no pattern or format")
    if any(b in schema for b in _BOUNDS):
        if kind != "integer":
            raise ConstraintError(f"minimum/maximum in {where} are enforced for "
                                  "\"type\": \"integer\" only")
        integer_bounds(schema, where)
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if schema.get(low, 0) > schema.get(high, math.inf):
            raise ConstraintError(f"{low} exceeds {high} in {where}")
    if ("minItems" in schema or "maxItems" in schema) and "items" not in schema:
        raise ConstraintError(f"minItems/maxItems in {where} need items")
    if "prefixItems" in schema and any(k in schema for k in ("items", "minItems", "maxItems")):
        raise ConstraintError(f"prefixItems with items/minItems/maxItems in {where}")
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in props:
            raise ConstraintError(f"required property {name!r} in {where} is not "
                                  "described under properties")
    for name, sub in props.items():
        check_schema(sub, f"property {name!r}")
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        check_schema(extra, f"additionalProperties of {where}")
    items = schema.get("items")
    for i, sub in enumerate(items if isinstance(items, list) else [items] if items is not None else []):
        check_schema(sub, f"items of {where}")
    for i, sub in enumerate(schema.get("prefixItems", [])):
        check_schema(sub, f"prefixItems[{i}] of {where}")
    for i, sub in enumerate(schema.get("anyOf", [])):
        check_schema(sub, f"anyOf[{i}] of {where}")
    for defs in ("$defs", "definitions"):
        for name, sub in schema.get(defs, {}).items():
            check_schema(sub, f"{defs}/{name}")


def _check_precedence(schema: dict, where: str) -> None:
    """The converter reads one keyword and ignores its siblings, in this order: $ref, anyOf, a
    list of types, const, enum. Siblings that would constrain something are refused."""
    quiet = _ANNOTATIONS | {"$defs", "definitions"}
    for key, allowed in (("$ref", set()), ("anyOf", set()), ("const", {"type"}), ("enum", {"type"})):
        if key in schema:
            ignored = sorted(set(schema) - quiet - allowed - {key})
            if ignored:
                raise ConstraintError(f"{key} with {', '.join(ignored)} in {where}: "
                                      f"only {key} would be enforced")
    if isinstance(schema.get("type"), list):
        ignored = sorted(set(schema) - quiet - {"type"})
        if ignored:
            raise ConstraintError(f"a list of types with {', '.join(ignored)} in {where}: "
                                  "use anyOf with one schema per type")
    kind = schema.get("type")
    for value in schema.get("enum", []) + ([schema["const"]] if "const" in schema else []):
        if isinstance(kind, str) and not _json_type_is(value, kind):
            raise ConstraintError(f"{value!r} in {where} is not of type {kind!r}")


def _json_type_is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "null": type(None), "object": dict,
                              "array": list}[kind])


# An integer bound left open is capped: JSON numbers past 2**53 lose precision in most readers.
_INT_LIMIT = 10**15 - 1


def integer_bounds(schema: dict, where: str = "the schema") -> tuple[int, int]:
    """The inclusive [low, high] an integer schema allows."""
    def bound(key: str) -> float | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConstraintError(f"{key} in {where} must be a number")
        return value

    lows = [math.ceil(v) for v in [bound("minimum")] if v is not None]
    lows += [math.floor(v) + 1 for v in [bound("exclusiveMinimum")] if v is not None]
    highs = [math.floor(v) for v in [bound("maximum")] if v is not None]
    highs += [math.ceil(v) - 1 for v in [bound("exclusiveMaximum")] if v is not None]
    low, high = max(lows, default=-_INT_LIMIT), min(highs, default=_INT_LIMIT)
    if low > high:
        raise ConstraintError(f"no integer lies within the bounds of {where}")
    if max(abs(low), abs(high)) > _INT_LIMIT:
        raise ConstraintError(f"integer bounds in {where} exceed ±{_INT_LIMIT}")
    return low, high


def integer_range_rule(low: int, high: int) -> str:
    """A GBNF expression matching exactly the decimal integers in [low, high] (no leading zeros,
    no -0)."""
    alternatives = []
    if high >= 0:
        alternatives.append(_natural_range(max(low, 0), high))
    if low < 0:
        alternatives.append('"-" (' + _natural_range(max(-high, 1), -low) + ")")
    return "(" + " | ".join(alternatives) + ")"


def _natural_range(low: int, high: int) -> str:
    """Non-negative integers in [low, high], split by number of digits."""
    parts = []
    for n in range(len(str(low)), len(str(high)) + 1):
        a, b = max(low, 10 ** (n - 1) if n > 1 else 0), min(high, 10**n - 1)
        if a <= b:
            parts.append(_same_length(str(a), str(b)))
    return " | ".join(f"({p})" for p in parts)


def _same_length(x: str, y: str) -> str:
    """Digit strings of len(x) == len(y) between x and y inclusive."""
    n = len(x)
    if n == 0:
        return ""
    rest = " [0-9]" * (n - 1)
    if x[1:] == "0" * (n - 1) and y[1:] == "9" * (n - 1):
        return f"[{x[0]}-{y[0]}]{rest}"
    if x[0] == y[0]:
        return f'"{x[0]}" ({_same_length(x[1:], y[1:])})'
    parts = [f'"{x[0]}" ({_same_length(x[1:], "9" * (n - 1))})']
    if int(y[0]) - int(x[0]) > 1:
        parts.append(f"[{int(x[0]) + 1}-{int(y[0]) - 1}]{rest}")
    parts.append(f'"{y[0]}" ({_same_length("0" * (n - 1), y[1:])})')
    return " | ".join(parts)


# The converter's string character admits raw control characters, which strict JSON (and
# Python's json.loads) refuse inside strings: exclude them as llama.cpp's own converter does.
_LOOSE_CHAR = r'char ::= [^"\\] |'
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def schema_to_gbnf(schema: dict) -> str:
    """llama-cpp-python's SchemaConverter (as its json_schema_to_gbnf drives it), with integer
    ranges added."""
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):
        def visit(self, schema, name):
            if isinstance(schema, dict) and schema.get("type") == "integer" and any(b in schema for b in _BOUNDS):
                rule_name = (name + "-" if name in RESERVED_NAMES else name) or "root"
                low, high = integer_bounds(schema)
                return self._add_rule(rule_name, integer_range_rule(low, high) + " space")
            return super().visit(schema, name)

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "schema"), "")
    grammar = converter.format_grammar()
    if "\nchar ::=" in "\n" + grammar:
        if _LOOSE_CHAR not in grammar:
            raise ConstraintError("the installed llama-cpp-python writes JSON strings in a way imp does not know")
        grammar = grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)
    return grammar


def _names_a_file(spec: str, suffix: str) -> bool:
    """A value meant as a file name (given without its @): an existing file, or a one-line name
    ending in the usual suffix."""
    import os

    one_line = "\n" not in spec and len(spec) < 4096
    return one_line and (os.path.isfile(spec) or spec.strip().lower().endswith(suffix))


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConstraintError(f"{what} '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConstraintError(f"cannot read {what} '{path}': {getattr(e, 'strerror', None) or e}") from None
