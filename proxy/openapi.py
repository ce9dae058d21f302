"""The proxy's OpenAPI document (GET /openapi.json): the routes it serves with the request models it validates
(proxy/protocol.py), the `ttc` object routing reads, and the OpenAI error shape every failure has."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic.json_schema import models_json_schema

from ttc_proxy.strategies.framework import Strategy

from .catalogue import STRATEGY_LIST_SCHEMAS
from .wire.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    OpenAIModel,
    TokenizeRequest,
    TokenizeResponse,
)

_REF = "#/components/schemas/{model}"
_MODELS: tuple[type[OpenAIModel], ...] = (
    ChatCompletionRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest,
    ChatCompletionResponse, ChatCompletionChunk, TokenizeResponse, DetokenizeResponse,
)

_ERROR_RESPONSE = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

_MODEL_DESCRIPTION = (
    "A served model name, or a strategy prefix and a model: `<spec>[><spec>...]-<model>` with "
    "`<spec>` = `<strategy>[:<key>=<value>[,<key>=<value>...]]`, e.g. `bon:n=4>cot-smollm2`.")


def _ttc_schemas(strategies: list[str]) -> dict[str, Any]:
    """What routing accepts as `ttc` (proxy/routing.py): a strategy, its params, the strategy it runs over
    (nested the same way) and a budget at most the configured one."""
    slug = {"type": "string", "enum": strategies} if strategies else {"type": "string"}
    return {
        "TtcSpec": {
            "type": "object", "additionalProperties": False, "required": ["strategy"],
            "properties": {"strategy": slug, "params": {"type": "object"},
                           "over": {"$ref": _REF.format(model="TtcSpec")}},
        },
        "TtcBudget": {
            "type": "object", "additionalProperties": False,
            "properties": {"max_total_tokens": {"type": "integer", "minimum": 1},
                           "max_calls": {"type": "integer", "minimum": 1},
                           "max_seconds": {"type": "number", "exclusiveMinimum": 0}},
        },
        "Ttc": {
            "type": "object", "additionalProperties": False,
            "description": "Test-time compute for this request: says what a model-name prefix says, and more.",
            "properties": {"strategy": slug, "params": {"type": "object"},
                           "over": {"$ref": _REF.format(model="TtcSpec")},
                           "budget": {"$ref": _REF.format(model="TtcBudget")}},
        },
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


def _operation(summary: str, ok: dict[str, Any], body: str | None = None, *, stream: bool = False,
               parameters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    content = dict(ok["content"])
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string", "description": "server-sent events of "
                                                   "ChatCompletionChunk (or an error object), then [DONE]"}}
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK", "content": content},
                      "default": {"description": "An OpenAI-style error", **_json(_ref("ErrorResponse"))}},
    }
    if body is not None:
        operation["requestBody"] = {"required": True, **_json(_ref(body))}
    if parameters:
        operation["parameters"] = parameters
    return operation


def openapi_document(strategies: Mapping[str, type[Strategy]]) -> dict[str, Any]:
    """The document for a proxy serving `strategies` (slug -> class). Each strategy's parameters are published as
    the schema `Params_<slug>`, from its `Params` model: the same field descriptions the docs' tables show."""
    slugs = sorted(strategies)
    _, defs = models_json_schema([(m, "validation") for m in _MODELS], ref_template=_REF)
    schemas: dict[str, Any] = {**defs.get("$defs", {}), **_ttc_schemas(slugs), **STRATEGY_LIST_SCHEMAS,
                               "ErrorResponse": _ERROR_RESPONSE}
    for slug in slugs:
        params = strategies[slug].Params.model_json_schema(ref_template=_REF)
        schemas.update(params.pop("$defs", {}))
        schemas[f"Params_{slug}"] = params
    chat = schemas["ChatCompletionRequest"]
    chat["properties"]["model"]["description"] = _MODEL_DESCRIPTION
    chat["properties"]["ttc"] = _ref("Ttc")
    tokenize = _operation("Token ids of a prompt or a conversation (vLLM's shape)", _json(_ref("TokenizeResponse")),
                          "TokenizeRequest")
    detokenize = _operation("Text of token ids (vLLM's shape)", _json(_ref("DetokenizeResponse")),
                            "DetokenizeRequest")
    listing = {"type": "object", "required": ["object", "data"],
               "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {"type": "object"}}}}
    health = {"type": "object", "required": ["status"],
              "properties": {"status": {"type": "string"}, "backends": {"type": "object"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ttc-proxy", "version": "1",
                 "description": "An OpenAI-compatible proxy that runs test-time-compute strategies chosen by a "
                                "model-name prefix or a `ttc` object."},
        "paths": {
            "/v1/chat/completions": {"post": _operation("Chat completion, passed through or run by a strategy",
                                                        _json(_ref("ChatCompletionResponse")),
                                                        "ChatCompletionRequest", stream=True)},
            "/v1/completions": {"post": _operation("Text completion, passed through", _json({"type": "object"}),
                                                   "CompletionRequest", stream=True)},
            "/v1/models": {"get": _operation("Served models, and each with every strategy prefix", _json(listing))},
            "/v1/strategies": {"get": _operation("The strategies served: purpose, capabilities needed, parameters",
                                                 _json(_ref("StrategyList")))},
            "/v1/traces/{trace_id}": {"get": _operation(
                "A strategy run's trace", _json({"type": "object"}),
                parameters=[{"name": "trace_id", "in": "path", "required": True, "schema": {"type": "string"}}])},
            "/health": {"get": _operation("Liveness; backends and their load for key holders", _json(health))},
            **{f"{prefix}/tokenize": {"post": tokenize} for prefix in ("", "/v1")},
            **{f"{prefix}/detokenize": {"post": detokenize} for prefix in ("", "/v1")},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "needed when server.api_keys are set"}},
        },
        "security": [{}, {"bearer": []}],
    }
