"""What strategies a proxy serves, for `GET /v1/strategies` (and `ttc-proxy strategies`): each slug with its
one-line purpose, the capabilities it needs with its default parameters, and each parameter's type, default,
range or choices and description, read from its `Params` model (the source /openapi.json and the docs share)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from ttc_proxy.strategies.framework import Strategy

# JSON Schema bounds as the catalogue names them.
_BOUNDS = {"minimum": "minimum", "maximum": "maximum", "exclusiveMinimum": "exclusive_minimum",
           "exclusiveMaximum": "exclusive_maximum", "minLength": "min_length", "maxLength": "max_length"}

_PARAMETER_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["name", "type", "nullable", "default", "choices", "description"],
    "properties": {
        "name": {"type": "string"},
        "type": {"type": "string", "description": "the JSON type: integer, number, string, boolean, object"},
        "nullable": {"type": "boolean", "description": "null (unset) is accepted"},
        "default": {"description": "the value used when the request does not set it (config defaults aside)"},
        "choices": {"type": ["array", "null"], "description": "the values it takes, when it is one of a list"},
        "description": {"type": "string"},
        "limit": {"type": "string", "enum": ["samples", "iterations"],
                  "description": "also bounded by the proxy's strategies.max_samples or max_iterations"},
        **{name: {"type": "integer" if name.endswith("_length") else "number"} for name in _BOUNDS.values()},
    },
}

STRATEGY_LIST_SCHEMAS: dict[str, Any] = {
    "StrategyParameter": _PARAMETER_SCHEMA,
    "StrategyCapability": {
        "type": "object", "additionalProperties": False, "required": ["name", "why"],
        "properties": {"name": {"type": "string"}, "why": {"type": "string"}},
    },
    "Strategy": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "object", "description", "capabilities", "composable", "multiple_choices", "parameters"],
        "properties": {
            "id": {"type": "string", "description": "the slug: the model-name prefix (`<slug>-<model>`)"},
            "object": {"type": "string", "enum": ["strategy"]},
            "description": {"type": "string", "description": "its one-line purpose"},
            "capabilities": {"type": "array", "items": {"$ref": "#/components/schemas/StrategyCapability"},
                             "description": "what the backend must offer with the default parameters"},
            "composable": {"type": "boolean", "description": "may run over another strategy (`bon>cot`)"},
            "multiple_choices": {"type": "boolean", "description": "a request may ask for n > 1"},
            "parameters": {"type": "array", "items": {"$ref": "#/components/schemas/StrategyParameter"}},
        },
    },
    "StrategyList": {
        "type": "object", "additionalProperties": False, "required": ["object", "data"],
        "properties": {"object": {"type": "string", "enum": ["list"]},
                       "data": {"type": "array", "items": {"$ref": "#/components/schemas/Strategy"}}},
    },
}


def strategy_list(registry: Mapping[str, type[Strategy]]) -> dict[str, Any]:
    """The catalogue of every strategy in `registry`, by slug (the StrategyList schema)."""
    return {"object": "list", "data": [describe_strategy(registry[slug]) for slug in sorted(registry)]}


def describe_strategy(strategy: type[Strategy]) -> dict[str, Any]:
    try:
        needed = dict(strategy.requirements(strategy.Params()))
    except ValidationError:  # a plugin whose parameters have no valid defaults: its static needs
        needed = {capability: "" for capability in strategy.requires}
    return {
        "id": strategy.slug,
        "object": "strategy",
        "description": strategy.description,
        "capabilities": [{"name": name, "why": why} for name, why in sorted(needed.items())],
        "composable": strategy.composable,
        "multiple_choices": strategy.multiple_choices,
        "parameters": describe_parameters(strategy.Params),
    }


def describe_parameters(params: type[BaseModel]) -> list[dict[str, Any]]:
    """Each field of a Params model: its JSON type, whether null is accepted, default, choices, bounds and
    description (from the model's JSON schema, as /openapi.json publishes it)."""
    properties = params.model_json_schema(mode="validation").get("properties", {})
    limits: Mapping[str, str] = getattr(params, "limits", {})
    described = []
    for name, field in params.model_fields.items():
        schema = properties.get(field.alias or name, {})
        variants = [v for v in schema.get("anyOf", [schema]) if v.get("type") != "null"]
        nullable = len(variants) < len(schema.get("anyOf", [schema]))
        main = variants[0] if variants else {}
        entry: dict[str, Any] = {
            "name": name,
            "type": main.get("type", "string" if "enum" in main else "object"),
            "nullable": nullable,
            "default": to_jsonable_python(field.get_default(call_default_factory=True)),
            "choices": main.get("enum"),
            "description": field.description or "",
        }
        entry.update({ours: main[theirs] for theirs, ours in _BOUNDS.items() if theirs in main})
        if name in limits:
            entry["limit"] = limits[name]
        described.append(entry)
    return described
