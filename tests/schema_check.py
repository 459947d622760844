"""A small JSON Schema validator for the keywords imp's own schemas use (imp_cli/schema/*.json
and the schemas the tests give to --json-schema / response_format), so that the suite needs no
`jsonschema` package: type (one or a list), enum, const, properties, required,
additionalProperties (false or a schema), patternProperties, items, minItems/maxItems,
minLength/maxLength, pattern, minimum/maximum (and exclusive), oneOf, anyOf, $ref to #/$defs/...
A keyword it does not know is an error (KeyError), never silently passed.

errors(value, schema) -> list of "path: problem" strings (empty: valid).
"""

from __future__ import annotations

import re

KNOWN = {"$schema", "$id", "title", "description", "type", "enum", "const", "properties", "required",
         "additionalProperties", "patternProperties", "items", "minItems", "maxItems", "minLength",
         "maxLength", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "oneOf",
         "anyOf", "$ref", "$defs", "default", "examples"}

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def errors(value, schema: dict, root: dict | None = None, path: str = "$") -> list[str]:
    root = root if root is not None else schema
    unknown = set(schema) - KNOWN
    if unknown:
        raise KeyError(f"schema_check does not know {sorted(unknown)} (at {path})")
    out: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        out += errors(value, root["$defs"][ref.split("/")[-1]], root, path)
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[k](value) for k in kinds):
            return out + [f"{path}: {value!r} is not of type {'/'.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: {value!r} is not {schema['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok in (("minimum", lambda b: value >= b), ("maximum", lambda b: value <= b),
                        ("exclusiveMinimum", lambda b: value > b), ("exclusiveMaximum", lambda b: value < b)):
            if key in schema and not ok(schema[key]):
                out.append(f"{path}: {value!r} fails {key} {schema[key]}")
    if isinstance(value, str):
        out += _length(value, schema, path, "Length", "shorter than {}", "longer than {}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        out += _length(value, schema, path, "Items", "fewer than {} items", "more than {} items")
        if "items" in schema:
            for i, item in enumerate(value):
                out += errors(item, schema["items"], root, f"{path}[{i}]")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                out.append(f"{path}: {name!r} is required")
        props, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
        for name, item in value.items():
            matched = False
            if name in props:
                matched = True
                out += errors(item, props[name], root, f"{path}.{name}")
            for pattern, sub in patterns.items():
                if re.search(pattern, name):
                    matched = True
                    out += errors(item, sub, root, f"{path}.{name}")
            extra = schema.get("additionalProperties", True)
            if not matched and extra is False:
                out.append(f"{path}: unexpected field {name!r}")
            elif not matched and isinstance(extra, dict):
                out += errors(item, extra, root, f"{path}.{name}")
    if "oneOf" in schema:
        passing = [s for s in schema["oneOf"] if not errors(value, s, root, path)]
        if len(passing) != 1:
            out.append(f"{path}: matches {len(passing)} of oneOf's {len(schema['oneOf'])} schemas, not exactly 1")
    if "anyOf" in schema and not any(not errors(value, s, root, path) for s in schema["anyOf"]):
        out.append(f"{path}: matches none of anyOf's schemas")
    return out


def _length(value, schema: dict, path: str, keyword: str, too_few: str, too_many: str) -> list[str]:
    """minLength/maxLength (keyword "Length") or minItems/maxItems ("Items") on len(value)."""
    out = []
    low, high = schema.get("min" + keyword), schema.get("max" + keyword)
    if low is not None and len(value) < low:
        out.append(f"{path}: {too_few.format(low)}")
    if high is not None and len(value) > high:
        out.append(f"{path}: {too_many.format(high)}")
    return out


def record_schema() -> dict:
    from imp_cli.record import schema

    return schema()


def check_record(obj) -> None:
    """AssertionError naming every problem if `obj` is not a valid answer record."""
    problems = errors(obj, record_schema())
    assert not problems, "not a valid imp record:\n  " + "\n  ".join(problems) + f"\n{obj}"


# The commands whose --json lines are answer records.
RECORD_COMMANDS = ("ask", "chat")
checked = {"records": 0}  # how many lines the suite has validated (the schema test says > 0)


def check_stdout(args: tuple, stdout: str) -> None:
    """Validate every record line of `imp ARGS`'s stdout against the record schema."""
    import json

    args = [str(a) for a in args]
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in RECORD_COMMANDS or "--json" not in args:
        return
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if "error" in obj and "answer" not in obj:  # a batch's line for an image that failed
            continue
        check_record(obj)
        checked["records"] += 1
