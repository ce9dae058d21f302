"""What a reply must look like: a regular expression, a JSON schema (a small subset of JSON Schema, validated here
so the proxy needs no `jsonschema` at runtime), an OpenAI `response_format`. Pure functions, usable offline.

Supported keywords: type, enum, const, properties, required, additionalProperties, items, minItems, maxItems,
uniqueItems, minLength, maxLength, pattern, minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf,
minProperties, maxProperties, anyOf, allOf, oneOf, not; annotations (title, description, default, examples,
$schema, $id, $comment, format) are accepted and ignored. Anything else (notably $ref) is refused up front by
`check_schema`, so a schema never silently means less than it says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "format"})
_SCHEMA_VALUED = frozenset({"items", "not"})
_SCHEMA_LISTS = frozenset({"anyOf", "allOf", "oneOf"})
_NUMBERS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_COUNTS = frozenset({"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"})
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
SUPPORTED_KEYWORDS = frozenset(
    {"type", "enum", "const", "properties", "required", "additionalProperties", "uniqueItems", "pattern"}
    | _SCHEMA_VALUED | _SCHEMA_LISTS | _NUMBERS | _COUNTS
)


def check_schema(schema: Any, path: str = "#") -> None:
    """Raise ValueError (naming the place) unless `schema` uses only the supported subset, well-formed."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, Mapping):
        raise ValueError(f"{path}: a schema is an object or a boolean")
    for key, value in schema.items():
        where = f"{path}/{key}"
        if key in _ANNOTATIONS:
            continue
        if key not in SUPPORTED_KEYWORDS:
            raise ValueError(f"{where}: keyword {key!r} is not supported; supported: "
                             f"{', '.join(sorted(SUPPORTED_KEYWORDS))}")
        if key == "type":
            names = value if isinstance(value, list) else [value]
            if not names or not all(isinstance(t, str) and t in _TYPES for t in names):
                raise ValueError(f"{where}: type must be one of {', '.join(sorted(_TYPES))} (or a list of them)")
        elif key == "enum":
            if not isinstance(value, list):
                raise ValueError(f"{where}: enum must be a list")
        elif key == "properties":
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: properties must be an object")
            for name, sub in value.items():
                check_schema(sub, f"{where}/{name}")
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{where}: required must be a list of strings")
        elif key == "additionalProperties" or key in _SCHEMA_VALUED:
            check_schema(value, where)
        elif key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise ValueError(f"{where}: {key} must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                check_schema(sub, f"{where}/{i}")
        elif key in _NUMBERS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: {key} must be a number")
            if key == "multipleOf" and value <= 0:
                raise ValueError(f"{where}: multipleOf must be above 0")
        elif key in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {key} must be a non-negative integer")
        elif key == "uniqueItems":
            if not isinstance(value, bool):
                raise ValueError(f"{where}: uniqueItems must be true or false")
        elif key == "pattern":
            if not isinstance(value, str):
                raise ValueError(f"{where}: pattern must be a string")
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{where}: pattern is not a valid regular expression: {exc}") from exc


def _is_type(value: Any, name: str) -> bool:
    if name == "object":
        return isinstance(value, dict)
    if name == "array":
        return isinstance(value, list)
    if name == "string":
        return isinstance(value, str)
    if name == "boolean":
        return isinstance(value, bool)
    if name == "null":
        return value is None
    if isinstance(value, bool):
        return False
    if name == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float))  # number


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def schema_errors(value: Any, schema: Any, path: str = "$") -> list[str]:
    """Why `value` does not satisfy `schema` (already checked by `check_schema`); empty when it does."""
    if schema is True or schema == {}:
        return []
    if schema is False:
        return [f"{path}: no value is allowed here"]
    errors: list[str] = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, t) for t in names):
            return [f"{path}: expected {' or '.join(names)}"]
    if "enum" in schema and not any(_equal(value, option) for option in schema["enum"]):
        errors.append(f"{path}: not one of {json.dumps(schema['enum'])}")
    if "const" in schema and not _equal(value, schema["const"]):
        errors.append(f"{path}: must be {json.dumps(schema['const'])}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match {schema['pattern']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: above {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: not above {schema['exclusiveMinimum']}")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            errors.append(f"{path}: not below {schema['exclusiveMaximum']}")
        if "multipleOf" in schema:
            quotient = value / schema["multipleOf"]
            if abs(quotient - round(quotient)) > 1e-9:
                errors.append(f"{path}: not a multiple of {schema['multipleOf']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if schema.get("uniqueItems") and any(_equal(value[i], value[j]) for i in range(len(value))
                                             for j in range(i + 1, len(value))):
            errors.append(f"{path}: items are not unique")
        if "items" in schema:
            for i, item in enumerate(value):
                errors.extend(schema_errors(item, schema["items"], f"{path}[{i}]"))
    if isinstance(value, dict):
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            errors.append(f"{path}: fewer than {schema['minProperties']} properties")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            errors.append(f"{path}: more than {schema['maxProperties']} properties")
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}: missing required property {name!r}")
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                errors.extend(schema_errors(item, properties[name], f"{path}.{name}"))
            elif "additionalProperties" in schema:
                errors.extend(schema_errors(item, schema["additionalProperties"], f"{path}.{name}"))
    for sub in schema.get("allOf", []):
        errors.extend(schema_errors(value, sub, path))
    if "anyOf" in schema and not any(not schema_errors(value, sub, path) for sub in schema["anyOf"]):
        errors.append(f"{path}: matches none of anyOf")
    if "oneOf" in schema:
        matching = sum(1 for sub in schema["oneOf"] if not schema_errors(value, sub, path))
        if matching != 1:
            errors.append(f"{path}: matches {matching} of oneOf, not exactly one")
    if "not" in schema and not schema_errors(value, schema["not"], path):
        errors.append(f"{path}: matches the schema under 'not'")
    return errors


_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)
_NOTHING = object()


def extract_json(text: str) -> Any:
    """The JSON value a reply gives: the whole reply if it is JSON, else the last fenced code block that is,
    else the last top-level object or array in the text. Raises ValueError when there is none."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    for block in reversed(_FENCE.findall(text)):
        try:
            return json.loads(block)
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    found: Any = _NOTHING
    position = 0
    while position < len(text):
        starts = [p for p in (text.find("{", position), text.find("[", position)) if p >= 0]
        if not starts:
            break
        start = min(starts)
        try:
            found, end = decoder.raw_decode(text, start)
            position = end
        except ValueError:
            position = start + 1
    if found is _NOTHING:
        raise ValueError("the reply contains no JSON object or array")
    return found


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    reason: str = ""  # why it failed


def run_checks(text: str, regex: re.Pattern[str] | str | None = None,
               json_schema: Mapping[str, Any] | bool | None = None) -> CheckResult:
    """A candidate passes when the regex matches somewhere in its text and its JSON satisfies the schema."""
    if regex is not None and not re.search(regex, text):
        return CheckResult(False, "regex does not match")
    if json_schema is not None:
        try:
            value = extract_json(text)
        except ValueError as exc:
            return CheckResult(False, str(exc))
        errors = schema_errors(value, json_schema)
        if errors:
            return CheckResult(False, "; ".join(errors[:3]))
    return CheckResult(True)


def check_all(texts: Sequence[str], regex: str | None = None,
              json_schema: Mapping[str, Any] | bool | None = None) -> list[CheckResult]:
    compiled = re.compile(regex) if regex is not None else None
    return [run_checks(t, compiled, json_schema) for t in texts]


def parses_as(text: str, response_format: Mapping[str, Any]) -> bool:
    """Whether a reply satisfies an OpenAI `response_format`: `json_object` — the reply is a JSON object;
    `json_schema` — it is JSON and, where the schema stays within the subset above, satisfies it (a schema beyond
    the subset is checked for JSON only); `text` or anything else — always."""
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        return True
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if kind == "json_object":
        return isinstance(value, dict)
    schema = (response_format.get("json_schema") or {}).get("schema")
    if schema is None:
        return True
    try:
        check_schema(schema)
    except ValueError:
        return True
    return not schema_errors(value, schema)
