"""Tools through strategies (issue 21): sc and bon compare candidates by their tool calls, answer with an OpenAI
tool-call message (streamed as tool-call deltas), take multi-turn conversations with `tool` messages; bon's
verifier checks calls against the tools' parameter schemas; strategies that build one text reply refuse tools."""

from __future__ import annotations

import json

import httpx

import openai
import pytest

from ttc_proxy.strategies.answers import candidate_answer
from ttc_proxy.strategies.framework import Candidate
from ttc_proxy.strategies.toolcalls import ToolCall, check_tool_calls, tool_calls_key, tool_calls_of
from ttc_proxy.tools.fakebackend import FakeReply

from tests.helpers import assert_openai_error, async_client, chat, sse_lines, sse_payloads, user, validate_schema

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER]
QUESTION = user("What is the weather in Paris?")


def by_seed(replies: dict[int, FakeReply]):
    """A script answering each seeded sample (one call each) by its seed offset from 100."""
    return lambda body: replies[int(body.get("seed", 100)) - 100]


def calls(*pairs: tuple[str, str]) -> FakeReply:
    return FakeReply(tool_calls=[list(pairs)])


# ---------------------------------------------------------------- pure: reading and comparing calls


def test_equal_arguments_written_differently_are_one_group():
    a = ToolCall("get_weather", '{"city": "Paris", "unit": "c"}')
    b = ToolCall("get_weather", '{"unit":"c","city":"Paris"}')
    c = ToolCall("get_weather", '{"city": "London"}')
    assert tool_calls_key([a]) == tool_calls_key([b]) != tool_calls_key([c])
    # parallel calls in another order are the same action
    assert tool_calls_key([a, c]) == tool_calls_key([c, b])


def test_a_text_reply_is_its_own_group():
    text = Candidate(text="42")
    acting = Candidate(text="42", tool_calls=(ToolCall("f", "{}"),))
    assert candidate_answer(text) == "42"
    assert candidate_answer(acting) != candidate_answer(text)


def test_tool_calls_of_reads_tool_calls_and_the_legacy_function_call():
    message = {"tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}
    assert tool_calls_of(message) == (ToolCall("f", '{"a": 1}', "x"),)
    assert tool_calls_of({"function_call": {"name": "g", "arguments": "{}"}}) == (ToolCall("g", "{}"),)
    assert tool_calls_of({"content": "hi"}) == ()


def test_check_tool_calls_against_the_parameter_schema():
    assert check_tool_calls([ToolCall("get_weather", '{"city": "Paris"}')], TOOLS).passed
    assert "not an offered function" in check_tool_calls([ToolCall("get_time", "{}")], TOOLS).reason
    assert "not JSON" in check_tool_calls([ToolCall("get_weather", "{city: Paris")], TOOLS).reason
    missing = check_tool_calls([ToolCall("get_weather", '{"unit": "c"}')], TOOLS)
    assert not missing.passed and "city" in missing.reason
    assert not check_tool_calls([ToolCall("get_weather", '{"city": 7}')], TOOLS).passed
    assert check_tool_calls([], TOOLS).reason == "no tool call"


# ---------------------------------------------------------------- sc over tool calls, through the SDK


def test_sc_votes_on_tool_calls_and_answers_with_a_tool_call_message(client, fake):
    fake.script = by_seed({
        0: calls(("get_weather", '{"city": "London"}')),
        1: calls(("get_weather", '{"city": "Paris", "unit": "c"}')),
        2: calls(("get_weather", '{"unit":"c",  "city":"Paris"}')),
        3: FakeReply(texts=["I cannot check the weather."]),
        4: calls(("get_weather", '{"city":"Paris","unit":"c"}')),
    })
    completion = client.chat.completions.create(model="sc:n=5-fake-model", messages=QUESTION, tools=TOOLS,
                                                tool_choice="auto", parallel_tool_calls=False, seed=100)
    validate_schema({k: v for k, v in completion.model_dump(exclude_unset=True).items() if k != "ttc"},
                    "CreateChatCompletionResponse")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    details = completion.model_extra["ttc"]["details"]
    assert details["votes"][tool_calls_key([ToolCall("get_weather", '{"city":"Paris","unit":"c"}')])] == 3
    # every sample was asked with the request's tools, tool_choice and parallel_tool_calls
    for request in fake.chat_requests():
        assert request.body["tools"] == TOOLS
        assert request.body["tool_choice"] == "auto" and request.body["parallel_tool_calls"] is False


def test_sc_text_majority_beats_a_tool_call_minority(client, fake):
    fake.script = by_seed({0: calls(("get_weather", '{"city": "Paris"}')), 1: FakeReply(texts=["It is 42."]),
                           2: FakeReply(texts=["The answer is 42"]), 3: calls(("get_weather", '{"city": "Paris"}')),
                           4: FakeReply(texts=["42"])})
    completion = client.chat.completions.create(model="sc:n=5-fake-model", messages=QUESTION, tools=TOOLS, seed=100)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == "It is 42."


def test_sc_streams_tool_calls_the_sdk_assembles(client, fake):
    fake.script = lambda body: calls(("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}'))
    stream = client.chat.completions.create(model="sc:n=3-fake-model", messages=QUESTION, tools=TOOLS, stream=True)
    assembled: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                entry = assembled.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += delta.id or ""
                entry["name"] += (delta.function.name or "") if delta.function else ""
                entry["arguments"] += (delta.function.arguments or "") if delta.function else ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [json.loads(assembled[i]["arguments"]) for i in sorted(assembled)] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(e["id"] and e["name"] == "get_weather" for e in assembled.values())


async def test_async_sdk_stream_and_plain_tool_calls(proxy, fake):
    fake.script = lambda body: calls(("get_weather", '{"city": "Paris"}'))
    async with async_client(proxy) as sdk:
        completion = await sdk.chat.completions.create(model="bon:n=2-fake-model", messages=QUESTION, tools=TOOLS)
        assert completion.choices[0].message.tool_calls[0].function.name == "get_weather"
        async with sdk.beta.chat.completions.stream(model="sc:n=2-fake-model", messages=QUESTION,
                                                    tools=TOOLS) as stream:
            final = await stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert json.loads(final.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_streamed_events_are_valid_chunks(proxy, fake):
    fake.script = lambda body: calls(("get_weather", '{"city": "Paris"}'))
    response = chat(proxy, {"model": "sc:n=2-fake-model", "messages": QUESTION, "tools": TOOLS, "stream": True})
    payloads = [p for p in sse_payloads(sse_lines(response)) if isinstance(p, dict)]
    for payload in payloads:
        validate_schema({k: v for k, v in payload.items() if k != "ttc"}, "CreateChatCompletionStreamResponse")
    deltas = [c["delta"] for p in payloads for c in p["choices"] if c["delta"].get("tool_calls")]
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_multi_turn_with_tool_messages(client, fake):
    conversation = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    fake.script = lambda body: FakeReply(texts=["It is 18 degrees and sunny in Paris."])
    completion = client.chat.completions.create(model="sc:n=3-fake-model", messages=conversation, tools=TOOLS)
    assert completion.choices[0].message.content == "It is 18 degrees and sunny in Paris."
    assert completion.choices[0].finish_reason == "stop"
    sent = [{k: v for k, v in m.items() if v is not None} for m in conversation]  # a null content is left out
    for request in fake.chat_requests():
        assert request.body["messages"] == sent


# ---------------------------------------------------------------- bon


def test_a_wrong_schema_tool_call_loses_to_a_valid_one_under_the_verifier(client, fake):
    # The majority calls with a number for `city` or an unknown function; the one valid call wins.
    fake.script = by_seed({0: calls(("get_weather", '{"city": 75001}')), 1: calls(("get_weather", '{"city": 75001}')),
                           2: calls(("get_weather", '{"city": "Paris"}')), 3: calls(("get_forecast", '{"city": "x"}')),
                           4: calls(("get_weather", '{"city": 75001}'))})
    completion = client.chat.completions.create(model="bon:n=5,select=verifier-fake-model", messages=QUESTION,
                                                tools=TOOLS, seed=100)
    (call,) = completion.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    details = completion.model_extra["ttc"]["details"]
    assert details["verifier"]["passed"] == 1
    reasons = [c.get("reason") for c in details["candidates"]]
    assert "get_weather: $.city: expected string" in reasons and "'get_forecast' is not an offered function" in reasons
    # without the verifier the (wrong) majority wins a vote: the verifier is what decided
    vote = client.chat.completions.create(model="bon:n=5,select=vote-fake-model", messages=QUESTION, tools=TOOLS,
                                          seed=100)
    assert json.loads(vote.choices[0].message.tool_calls[0].function.arguments) == {"city": 75001}


def test_bon_logprob_selects_among_tool_calls(client, fake):
    fake.script = by_seed({0: FakeReply(tool_calls=[[("get_weather", '{"city": "Lyon"}')]], token_logprob=-2.0),
                           1: FakeReply(tool_calls=[[("get_weather", '{"city": "Paris"}')]], token_logprob=-0.1),
                           2: FakeReply(tool_calls=[[("get_weather", '{"city": "Nice"}')]], token_logprob=-1.0)})
    completion = client.chat.completions.create(model="bon:n=3,select=confidence,confidence=logprob-fake-model",
                                                messages=QUESTION, tools=TOOLS, seed=100)
    assert json.loads(completion.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_verifier_without_a_check_or_tools_is_a_400_before_any_call(proxy, fake, stream):
    response = chat(proxy, {"model": "bon:n=2,select=verifier-fake-model", "messages": user(), "stream": stream})
    error = assert_openai_error(response, 400, param="ttc.params", code="invalid_strategy_params")
    assert "the request's tools" in error["message"]
    assert fake.requests == []


# ---------------------------------------------------------------- strategies that refuse tools


@pytest.mark.parametrize("model, named", [("cot-fake-model", "'cot'"), ("bon:n=2>cot-fake-model", "'cot'"),
                                          ("think-fake-model", "'think'"), ("mcts-fake-model", "'mcts'")])
def test_strategies_that_build_one_reply_refuse_tools_naming_themselves(proxy, fake, model, named):
    response = chat(proxy, {"model": model, "messages": QUESTION, "tools": TOOLS})
    error = assert_openai_error(response, 400, param="tools", code="unsupported_by_strategy")
    assert named in error["message"] and "bon, sc" in error["message"]
    assert fake.requests == []


def test_tool_choice_none_is_no_tool_use(client, fake):
    completion = client.chat.completions.create(model="cot-fake-model", messages=user(), tool_choice="none")
    assert completion.choices[0].finish_reason == "stop"


def test_sdk_error_type_for_refused_tools(client, fake):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="cot-fake-model", messages=QUESTION, tools=TOOLS)
    assert info.value.body["param"] == "tools"


@pytest.mark.parametrize("fields, param", [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_malformed_tool_fields_are_400s_before_any_call(proxy, fake, fields, param):
    response = chat(proxy, {"model": "sc:n=2-fake-model", "messages": QUESTION, **fields})
    assert_openai_error(response, 400, param=param)
    assert fake.requests == []


def test_a_named_tool_choice_is_forwarded(client, fake):
    fake.script = lambda body: calls(("get_weather", '{"city": "Paris"}'))
    choice = {"type": "function", "function": {"name": "get_weather"}}
    client.chat.completions.create(model="sc:n=2-fake-model", messages=QUESTION, tools=TOOLS, tool_choice=choice)
    assert all(r.body["tool_choice"] == choice for r in fake.chat_requests())


def test_the_trace_shows_each_sample_s_tool_calls(client, proxy, fake):
    fake.script = lambda body: calls(("get_weather", '{"city": "Paris"}'))
    completion = client.chat.completions.create(model="sc:n=2-fake-model", messages=QUESTION, tools=TOOLS)
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.model_extra['ttc']['trace_id']}", timeout=10).json()
    outputs = [o for node in trace["nodes"] for o in node.get("outputs", [])]
    assert outputs and all(o == 'get_weather({"city":"Paris"})' for o in outputs)
