"""What a strategy request must be before it runs (the request's fields against the strategies of its
composition), and the sampling its calls inherit from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ttc_proxy.strategies.framework import Sampling, Strategy
from ttc_proxy.strategies.toolcalls import asks_for_tools

from ..config import StrategySettings
from ..errors import InvalidRequest
from ..wire.protocol import ChatCompletionRequest
from .sampling import SEED_SPACE

# The tool-calling fields: a strategy that compares tool calls (Strategy.tool_calls) passes them to its samples.
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
# Request fields that a strategy's backend calls never inherit as-is: the context sets them per call.
_NOT_FORWARDED_TO_STRATEGY_CALLS = frozenset({
    "model", "messages", "stream", "stream_options", "n", "ttc", "logprobs", "top_logprobs", "temperature",
    "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "user", "store", "metadata", "response_format",
    *TOOL_FIELDS,
})
_LEGACY_FUNCTION_FIELDS = ("functions", "function_call")


def check_tool_fields(raw: Mapping[str, Any]) -> None:
    """`tools`, `tool_choice` and `parallel_tool_calls` in OpenAI's shapes: a strategy reads them (to compare and
    check calls), so a malformed one is the client's 400 here, not an engine's error in the middle of a run."""
    tools = raw.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise InvalidRequest("'tools' must be a list of {type: function, function: {name, parameters}}",
                                 param="tools", code="invalid_type")
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)
                    and isinstance(function.get("name"), str) and function["name"]
                    and isinstance(function.get("parameters", {}), dict)):
                raise InvalidRequest(f"tools[{i}] must be {{type: function, function: {{name: string, parameters: "
                                     f"object}}}}", param=f"tools[{i}]", code="invalid_value")
            names.append(function["name"])
    choice = raw.get("tool_choice")
    if choice is not None:
        named = choice.get("function", {}).get("name") if isinstance(choice, dict) and \
            isinstance(choice.get("function"), dict) else None
        if choice not in ("none", "auto", "required") and not (isinstance(named, str) and
                                                               choice.get("type") == "function"):
            raise InvalidRequest("'tool_choice' must be none, auto, required or {type: function, function: {name}}",
                                 param="tool_choice", code="invalid_value")
        if named is not None and named not in names:
            raise InvalidRequest(f"'tool_choice' names function {named!r}, which is not in 'tools'",
                                 param="tool_choice", code="invalid_value")
        if choice in ("required",) and not names:
            raise InvalidRequest("'tool_choice' is required but there are no 'tools'", param="tool_choice",
                                 code="invalid_value")
    parallel = raw.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls",
                             code="invalid_type")


def check_strategy_request(strategy: type[Strategy], request: ChatCompletionRequest, raw: Mapping[str, Any],
                           chain: Sequence[type[Strategy]] = (),
                           registry: Mapping[str, type[Strategy]] | None = None) -> None:
    """The request fits the strategy (and every strategy of its composition, `chain`, outermost first)."""
    for feature in _LEGACY_FUNCTION_FIELDS:
        if raw.get(feature) not in (None, False, [], 0):
            raise InvalidRequest(
                f"strategy {strategy.slug!r} does not take the legacy {feature!r}; send the functions as 'tools' "
                f"(sc, bon and auto compare tool calls), or send it without a strategy prefix",
                param=feature, code="unsupported_by_strategy")
    check_tool_fields(raw)
    if asks_for_tools(raw):
        refusing = [s.slug for s in (chain or [strategy]) if not s.tool_calls]
        if refusing:
            feature = "tools" if raw.get("tools") not in (None, []) else "tool_choice"
            taking = sorted(slug for slug, s in (registry or {}).items() if s.tool_calls)
            raise InvalidRequest(
                f"strategy {', '.join(repr(s) for s in refusing)} does not take {feature!r}: it builds or reworks "
                f"one text reply, where a tool call has no place. Strategies that compare tool calls: "
                f"{', '.join(taking) or 'none registered'}; or send the request without a strategy prefix",
                param=feature, code="unsupported_by_strategy")
    if (request.n or 1) > 1 and not strategy.multiple_choices:
        raise InvalidRequest(
            f"strategy {strategy.slug!r} returns one choice; n={request.n} is not supported "
            f"(the strategy's own sample count is a parameter, e.g. ttc params)",
            param="n",
            code="unsupported_by_strategy",
        )
    response_format = raw.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
        if kind not in ("text", "json_object", "json_schema") or (
                kind == "json_schema" and not (isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict))):
            raise InvalidRequest("response_format must be {type: text | json_object} or {type: json_schema, "
                                 "json_schema: {name, schema: {...}}}", param="response_format", code="invalid_value")
        if kind != "text" and not strategy.structured_output:
            raise InvalidRequest(f"strategy {strategy.slug!r} continues its reply from raw token ids, where the "
                                 f"engine applies no grammar: a {kind} response_format is not supported",
                                 param="response_format", code="unsupported_by_strategy")


def sampling_of(request: ChatCompletionRequest, raw: Mapping[str, Any], settings: StrategySettings) -> Sampling:
    return Sampling(
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=request.max_tokens or request.max_completion_tokens or settings.default_max_tokens,
        stop=request.stop,
        seed=request.seed % SEED_SPACE if request.seed is not None else None,
        extra={k: v for k, v in raw.items() if k not in _NOT_FORWARDED_TO_STRATEGY_CALLS},
        response_format=raw.get("response_format") if isinstance(raw.get("response_format"), dict) else None,
        top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        tools={k: raw[k] for k in TOOL_FIELDS if raw.get(k) is not None},
    )
