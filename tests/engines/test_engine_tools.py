"""Tools through strategies on the real engine (issue 21): the embedded llama-server (its Jinja chat templates on,
`--jinja`, which parses tool calls out of the model's output) + SmolLM2-135M, through the official SDK, sync, async
and streaming. The small model's choice of call is whatever it is: these tests hold the round trip to the
OpenAI shape (a tool-call message whose arguments are JSON, or a text answer), not the model's judgement."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from ttc_proxy.proxy.config import BackendConfig, EmbeddedEngine, ProxyConfig

from tests.helpers import ProxyServer

pytestmark = pytest.mark.engine

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_proxy() -> Iterator[ProxyServer]:
    engine = EmbeddedEngine(slots=4, context=8192, extra_args=["--jinja"])
    with ProxyServer(ProxyConfig(backends=[BackendConfig(name="local", kind="llama_cpp", embedded=engine)])) as server:
        yield server


def assert_openai_answer(choice: object) -> None:
    """A tool-call message with JSON arguments naming an offered function, or a text answer."""
    if choice.finish_reason == "tool_calls":
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id and call.type == "function" and call.function.name == "get_weather"
            json.loads(call.function.arguments)
    else:
        assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)


def ask_for_a_call(proxy: ProxyServer, model: str) -> object:
    """The SDK's tool-calling request (a call required), its answer checked for the OpenAI shape."""
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
        completion = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS,
                                                    tool_choice="required", max_tokens=64, temperature=0.7)
    choice = completion.choices[0]
    print(f"\n{model}: {choice.finish_reason} {choice.message.tool_calls or choice.message.content!r}")
    assert_openai_answer(choice)
    return completion


@pytest.mark.parametrize("model", ["sc:n=3-smollm2", "bon:n=3,select=verifier-smollm2", "bon:n=2-smollm2"])
def test_tool_request_round_trips_through_strategies(tools_proxy, model):
    completion = ask_for_a_call(tools_proxy, model)
    assert completion.model_extra["ttc"]["backend_calls"] >= 1


def test_auto_runs_its_stages_as_ones_that_compare_tool_calls(tools_proxy):
    completion = ask_for_a_call(tools_proxy, "auto-smollm2")
    (stage,) = completion.model_extra["ttc"]["details"]["stages"]  # the built-in default: one `cot` stage
    assert stage["stage"] == "cot" and stage["ran"] == "sc:n=5,adaptive=True,first_wave=3"
    assert "agreement" in stage["signals"]


async def test_tool_request_round_trips_async_and_streamed(tools_proxy):
    async with openai.AsyncOpenAI(base_url=tools_proxy.url + "/v1", api_key="x", max_retries=0,
                                  timeout=300) as client:
        stream = await client.chat.completions.create(model="sc:n=2-smollm2", messages=QUESTION, tools=TOOLS,
                                                      tool_choice="required", max_tokens=64, stream=True)
        content, arguments, names, finish = "", {}, {}, None
        async for chunk in stream:
            for choice in chunk.choices:
                content += choice.delta.content or ""
                for call in choice.delta.tool_calls or ():
                    names[call.index] = names.get(call.index, "") + (call.function.name or "")
                    arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
                finish = choice.finish_reason or finish
    print(f"\nstreamed: {finish} {names or content!r} {arguments}")
    if finish == "tool_calls":
        assert names and all(n == "get_weather" for n in names.values())
        for text in arguments.values():
            json.loads(text)
    else:
        assert finish in ("stop", "length") and content


def test_the_engine_itself_with_tools(tools_proxy):
    """Pass-through: what llama-server makes of the tools with this model (the strategies' samples get the same)."""
    ask_for_a_call(tools_proxy, "smollm2")


def test_multi_turn_with_a_tool_result_round_trips(tools_proxy):
    conversation = [*QUESTION,
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    with openai.OpenAI(base_url=tools_proxy.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
        completion = client.chat.completions.create(model="sc:n=2-smollm2", messages=conversation, tools=TOOLS,
                                                    max_tokens=48)
    print(f"\nafter the tool result: {completion.choices[0].message.content!r}")
    assert_openai_answer(completion.choices[0])
