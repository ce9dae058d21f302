"""Reference tables for the docs site, generated from the pydantic models themselves: each strategy's `Params`
(the same field descriptions /openapi.json publishes) and the config models (config.yaml's shape).

Used as a mkdocs hook (mkdocs.yml `hooks:`): a page line `<!-- params: SLUG -->` becomes that strategy's parameter
table, `<!-- config: SECTION -->` the table of a config section (`server`, `backends`, `strategies`, `aliases`,
`verifiers`, `pivots`), nested models included.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"^<!-- (params|config): ([a-z0-9_]+) -->$", re.MULTILINE)


class ReferenceTableError(Exception):
    """A docs page asks for a reference table that does not exist, or a field has no description."""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or null" if type(None) in args else "")
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return f"map of {_type_name(args[1])}" if len(args) == 2 else "map"
    if isinstance(annotation, type):
        return {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _range(info: FieldInfo) -> str:
    bounds = []
    for item in info.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥"),
                             ("max_length", "length ≤"), ("pattern", "matches")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{symbol} `{value}`" if attr == "pattern" else f"{symbol} {value}")
    return ", ".join(bounds)


def _literal(value: Any) -> str:
    try:
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    except TypeError:
        return f"`{value!r}`"


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return "(below)"
        return _literal(value) if value not in ([], {}) else "empty"
    if info.default is PydanticUndefined:
        return "required"
    if info.default is None:
        return "none"
    return _literal(info.default)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in typing.get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def field_rows(model: type[BaseModel], prefix: str = "", nested: bool = False) -> Iterator[list[str]]:
    """One row per field: name, type, default, range/choices, description; with `nested`, a field whose type is
    a model is followed by its own fields as `field.sub`. A field without a description is an error."""
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        if not info.description:
            raise ReferenceTableError(f"{model.__module__}.{model.__qualname__}.{name} has no description")
        inner = _nested_model(info.annotation) if nested else None
        type_name = f"object ({inner.__name__})" if inner else _type_name(info.annotation)
        yield [f"`{prefix}{name}`", _cell(type_name), _cell(_default(info)), _cell(_range(info)),
               _cell(info.description)]
        if inner is not None:
            sub = "[]." if typing.get_origin(info.annotation) is list else (
                ".NAME." if typing.get_origin(info.annotation) is dict else ".")
            yield from field_rows(inner, f"{prefix}{name}{sub}", nested=True)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| name | type | default | range | description |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def params_table(slug: str) -> str:
    from ttc_proxy.proxy.registry import load_registry

    registry = load_registry()[0]
    if slug not in registry:
        raise ReferenceTableError(f"no strategy {slug!r} (registered: {sorted(registry)})")
    return markdown_table(list(field_rows(registry[slug].Params)))


def config_table(section: str) -> str:
    from ttc_proxy.proxy.config import ProxyConfig

    fields = ProxyConfig.model_fields
    if section not in fields:
        raise ReferenceTableError(f"no config section {section!r} (sections: {sorted(fields)})")
    model = _nested_model(fields[section].annotation)
    if model is None:
        raise ReferenceTableError(f"config section {section!r} is not a model")
    return markdown_table(list(field_rows(model, nested=True)))


def expand(markdown: str) -> str:
    """Every marker line replaced by its table."""
    def table(match: re.Match[str]) -> str:
        kind, name = match.groups()
        return params_table(name) if kind == "params" else config_table(name)

    return MARKER.sub(table, markdown)


def on_page_markdown(markdown: str, **_: Any) -> str:
    """The mkdocs hook."""
    return expand(markdown)
