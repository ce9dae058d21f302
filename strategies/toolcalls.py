"""Tool calls in a reply: reading them from an engine's message, comparing them, checking them against the tools.

Pure functions over data, usable offline (an evaluator, another strategy such as `auto`):

  tool_calls_of(message)        the calls an OpenAI assistant message (or stream-assembled one) carries
  tool_calls_key(calls)         what two replies must share to be "the same action": each call's function name
                                and canonical JSON arguments, as a set (the order of parallel calls does not matter)
  check_tool_calls(calls, tools) whether every call names an offered function and its arguments satisfy that
                                function's parameter schema (the JSON-schema subset of strategies.formats)
  asks_for_tools(fields)        whether a request's tool fields ask for tool use at all

A reply with no tool calls is compared on its text answer instead (strategies.answers.candidate_answer).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .formats import CheckResult, check_schema, schema_errors

TOOL_KEY_PREFIX = "tool_calls:"


@dataclass(frozen=True)
class ToolCall:
    """One function call as the model wrote it: `arguments` is its JSON text, unparsed."""

    name: str
    arguments: str = "{}"
    id: str | None = None

    def parsed_arguments(self) -> Any:
        """The arguments as JSON data; raises ValueError when they are not JSON."""
        return json.loads(self.arguments or "{}")

    def canonical_arguments(self) -> str:
        """The arguments with keys sorted and no spacing, so equal arguments compare equal however written; text
        that is not JSON is compared as written (stripped)."""
        try:
            value = self.parsed_arguments()
        except ValueError:
            return self.arguments.strip()
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def asks_for_tools(fields: Mapping[str, Any]) -> bool:
    """Whether a request's `tools` / `tool_choice` ask for tool use: offered tools (whatever the choice) or a
    choice other than "none". `tool_choice: "none"` alone is no tool use."""
    return any(fields.get(f) not in (None, False, [], 0, "none") for f in ("tools", "tool_choice"))


def tool_calls_of(message: Mapping[str, Any]) -> tuple[ToolCall, ...]:
    """The function calls in an assistant message (`tool_calls`, or the legacy single `function_call`)."""
    calls: list[ToolCall] = []
    raw = message.get("tool_calls")
    if isinstance(raw, list):
        for entry in raw:
            if not isinstance(entry, Mapping):
                continue
            function = entry.get("function")
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                continue
            calls.append(ToolCall(function["name"], _arguments_text(function.get("arguments")),
                                  entry.get("id") if isinstance(entry.get("id"), str) else None))
    legacy = message.get("function_call")
    if not calls and isinstance(legacy, Mapping) and isinstance(legacy.get("name"), str):
        calls.append(ToolCall(legacy["name"], _arguments_text(legacy.get("arguments"))))
    return tuple(calls)


def _arguments_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "{}"
    return json.dumps(value)  # some engines send the arguments as an object


def tool_calls_key(calls: Sequence[ToolCall]) -> str:
    """The answer a tool-calling reply votes with: its calls' names and canonical arguments, order-free."""
    pairs = sorted([call.name, call.canonical_arguments()] for call in calls)
    return TOOL_KEY_PREFIX + json.dumps(pairs, separators=(",", ":"), ensure_ascii=False)


def describe_tool_calls(calls: Sequence[ToolCall]) -> str:
    """A short readable form for progress lines: `get_weather({"city":"Paris"})`."""
    return ", ".join(f"{call.name}({call.canonical_arguments()})" for call in calls)


def offered_functions(tools: Any) -> dict[str, Any]:
    """The request's `tools` as function name -> parameter schema (True when the tool gives none)."""
    functions: dict[str, Any] = {}
    if not isinstance(tools, list):
        return functions
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            functions[function["name"]] = function.get("parameters", True)
    return functions


def check_tool_calls(calls: Sequence[ToolCall], tools: Any) -> CheckResult:
    """Passes when every call names a function the request offers and its arguments are JSON that satisfies
    that function's parameter schema. A parameter schema beyond the supported subset is checked for JSON only.
    A reply without tool calls fails: it did not act."""
    if not calls:
        return CheckResult(False, "no tool call")
    functions = offered_functions(tools)
    for call in calls:
        if call.name not in functions:
            return CheckResult(False, f"{call.name!r} is not an offered function")
        try:
            arguments = call.parsed_arguments()
        except ValueError:
            return CheckResult(False, f"{call.name}: the arguments are not JSON")
        schema = functions[call.name]
        try:
            check_schema(schema)
        except ValueError:
            continue
        errors = schema_errors(arguments, schema)
        if errors:
            return CheckResult(False, f"{call.name}: {'; '.join(errors[:3])}")
    return CheckResult(True)
