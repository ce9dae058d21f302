"""`auto` with tools (issue 21): a stage runs only what compares tool calls (a policy's `cot` becomes self-consistency
over the calls, `bon:n=4>cot` becomes `bon:n=4` sampling calls directly), `ttc.details` says what ran instead and
why, the stop signals read tool-call candidates (agreement on name + canonical arguments, the chosen call's
logprob), and the answer is a tool-call message, plain and streamed, over multi-turn conversations."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from ttc_proxy.strategies.auto import TOOL_STAGE_SPEC, stage_for_tools
from ttc_proxy.strategies.policy import SpecModel, Stage, StopRule
from ttc_proxy.strategies.stages import STAGE_STRATEGIES
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import user

WEATHER = {"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER]
QUESTION = user("What is the weather in Paris?")
LP = {"select": "confidence", "confidence": "logprob"}
TOOL_STAGE = "sc:n=5,adaptive=True,first_wave=3"


def policy(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "fake-model", "points": [{"budget": 100.0, "stages": list(stages)}]}


COT = {"name": "cot", "spec": {"strategy": "cot"}, "stop": {"signal": "agreement", "threshold": 0.8}}
BON4_OVER_COT = {"name": "bon:n=4>cot", "spec": {"strategy": "bon", "params": {"n": 4, **LP},
                                                  "over": {"strategy": "cot"}}}


def in_turn(*replies: FakeReply) -> Any:
    """Answers the engine calls in order (a wave of samples is one call with `n` choices)."""
    queue = list(replies)
    return lambda body: queue.pop(0)


def city(name: str) -> list[tuple[str, str]]:
    return [("get_weather", json.dumps({"city": name}))]


def weather(*cities: str, logprobs: tuple[float, ...] = ()) -> FakeReply:
    """One call's choices, each calling get_weather for a city; choice i's tokens have logprob logprobs[i]."""
    return FakeReply(tool_calls=[city(c) for c in cities],
                     logprobs_fn=(lambda choice, i, token: [(token, logprobs[choice])]) if logprobs else None)


def choices(fake: FakeBackend) -> int:
    return sum(int(r.body.get("n", 1)) for r in fake.chat_requests())


def ask(client: openai.OpenAI, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    return client.chat.completions.create(model="auto-fake-model", messages=kwargs.pop("messages", QUESTION),
                                          tools=TOOLS, extra_body={"ttc": {"params": params or {}}}, **kwargs)


# ---------------------------------------------------------------- which stage runs with tools (pure)


def stage(spec: dict[str, Any]) -> Stage:
    return Stage(name="x", spec=SpecModel.model_validate(spec), stop=StopRule(signal="logprob", threshold=0.5))


@pytest.mark.parametrize("spec, runs", [
    ({"strategy": "cot"}, TOOL_STAGE),
    ({"strategy": "mcts"}, TOOL_STAGE),
    ({"strategy": "bon", "params": {"n": 8, **LP}, "over": {"strategy": "cot"}},
     "bon:n=8,select=confidence,confidence=logprob"),
    ({"strategy": "sc", "params": {"n": 3}, "over": {"strategy": "bon", "params": {"n": 2},
                                                     "over": {"strategy": "think"}}}, "sc:n=3>bon:n=2"),
    ({"strategy": "my_plugin"}, TOOL_STAGE),
])
def test_a_stage_keeps_what_compares_tool_calls_and_its_stop_rule(spec: dict[str, Any], runs: str) -> None:
    original = stage(spec)
    replaced, why = stage_for_tools(original, STAGE_STRATEGIES)
    assert replaced.name == runs == replaced.spec.spec().describe()
    assert replaced.stop == original.stop
    assert why is not None and why.endswith(f"tool calls are compared by {runs}")
    assert ("is not a built-in" in why) == (spec["strategy"] == "my_plugin")


def test_a_stage_that_compares_tool_calls_runs_as_it_is() -> None:
    original = stage({"strategy": "bon", "params": {"n": 4, **LP}})
    assert stage_for_tools(original, STAGE_STRATEGIES) == (original, None)
    assert TOOL_STAGE_SPEC.spec().describe() == TOOL_STAGE


# ---------------------------------------------------------------- through the SDK


def test_the_default_cascade_votes_on_tool_calls_and_ends_when_three_agree(client: openai.OpenAI,
                                                                           fake: FakeBackend) -> None:
    fake.script = lambda body: weather("Paris")
    completion = ask(client)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id and call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choices(fake) == 3  # the first wave agreed: the other two samples were never drawn
    assert all(r.body["tools"] == TOOLS for r in fake.chat_requests())
    details = completion.model_extra["ttc"]["details"]
    (record,) = details["stages"]
    assert record["stage"] == "cot" and record["ran"] == TOOL_STAGE
    assert record["replaced"] == f"cot does not take tools; tool calls are compared by {TOOL_STAGE}"
    assert record["answer"] == details["answer"] == 'get_weather({"city":"Paris"})'
    assert record["signals"]["agreement"] == 1.0
    assert details["operating_point"]["chosen_by"] == "the policy's default"


def test_agreeing_calls_stop_the_cascade_at_stage_one(client: openai.OpenAI, fake: FakeBackend) -> None:
    # arguments written differently are one call: they agree
    fake.script = in_turn(FakeReply(tool_calls=[city("Paris"), [("get_weather", '{ "city":"Paris" }')],
                                                city("Paris")]))
    completion = ask(client, {"policy": policy(COT, BON4_OVER_COT)})
    stages = completion.model_extra["ttc"]["details"]["stages"]
    assert [s["decision"] for s in stages] == ["stop"]
    assert stages[0]["signals"]["agreement"] == 1.0 and choices(fake) == 3
    assert json.loads(completion.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_disagreeing_calls_go_on_and_stage_two_picks_the_surest_call(client: openai.OpenAI,
                                                                      fake: FakeBackend) -> None:
    # stage 1: a wave of three and one of two split 3-2 (agreement 0.6 < 0.8); stage 2 (bon:n=4 by logprob)
    # samples calls itself and keeps the surest
    fake.script = in_turn(weather("Paris", "Lyon", "Paris"), weather("Lyon", "Paris"),
                          weather("Nice", "Rome", "Lyon", "Nice", logprobs=(-2.0, -0.05, -1.0, -2.0)))
    completion = ask(client, {"policy": policy(COT, BON4_OVER_COT)})
    details = completion.model_extra["ttc"]["details"]
    first, second = details["stages"]
    assert first["decision"] == "continue" and first["signals"]["agreement"] == 0.6 and first["calls"] == 2
    assert second["stage"] == "bon:n=4>cot" and second["ran"] == "bon:n=4,select=confidence,confidence=logprob"
    assert second["replaced"].startswith("cot does not take tools") and second["calls"] == 1
    assert second["signals"]["logprob"] == pytest.approx(0.951229, abs=1e-6)
    assert json.loads(completion.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    assert choices(fake) == 9 and all(r.body["tools"] == TOOLS for r in fake.chat_requests())


def test_a_stage_that_would_run_as_an_earlier_one_with_tools_is_skipped(client: openai.OpenAI,
                                                                          fake: FakeBackend) -> None:
    # cot and mcts both run as the same tool vote: running it again with new samples is no escalation
    mcts = {"name": "mcts", "spec": {"strategy": "mcts"}}
    fake.script = in_turn(weather("Paris", "Lyon", "Paris"), weather("Lyon", "Paris"))
    completion = ask(client, {"policy": policy(COT, mcts)})
    details = completion.model_extra["ttc"]["details"]
    first, second = details["stages"]
    assert details["stopped"] == "stage 2 would repeat stage 1 with tools"
    assert first["decision"] == "continue" and first["signals"]["agreement"] == 0.6
    assert second["ran"] == TOOL_STAGE and second["skipped"] == f"with tools it runs as stage 1 did ({TOOL_STAGE})"
    assert "decision" not in second and choices(fake) == 5
    assert json.loads(completion.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


def test_a_text_majority_answers_in_text(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = lambda body: FakeReply(texts=["I cannot look up the weather."])
    completion = ask(client)
    assert completion.choices[0].finish_reason == "stop" and completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == "I cannot look up the weather."


def test_streamed_the_sdk_assembles_the_call_and_the_progress_says_what_ran(client: openai.OpenAI,
                                                                           fake: FakeBackend) -> None:
    fake.script = lambda body: weather("Paris")
    stream = client.chat.completions.create(model="auto-fake-model", messages=QUESTION, tools=TOOLS, stream=True,
                                            tool_choice="required")
    progress, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            progress += getattr(choice.delta, "reasoning_content", None) or ""
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or ():
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": ""})
                entry["id"] += delta.id or ""
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls.values()) == [{"name": "get_weather", "arguments": '{"city": "Paris"}', "id": calls[0]["id"]}]
    assert calls[0]["id"]
    assert f"stage 1/1: {TOOL_STAGE} (in place of cot: cot does not take tools" in progress
    assert all(r.body["tool_choice"] == "required" for r in fake.chat_requests())


def test_multi_turn_with_a_tool_message(client: openai.OpenAI, fake: FakeBackend) -> None:
    conversation = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    fake.script = lambda body: FakeReply(texts=["It is 18 degrees and sunny in Paris."])
    completion = ask(client, messages=conversation)
    assert completion.choices[0].message.content == "It is 18 degrees and sunny in Paris."
    assert completion.choices[0].finish_reason == "stop"
    sent = [{k: v for k, v in m.items() if v is not None} for m in conversation]
    assert fake.chat_requests() and all(r.body["messages"] == sent for r in fake.chat_requests())


def test_without_tools_the_policy_runs_as_written(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = lambda body: FakeReply(texts=["<output>7</output>"])
    completion = client.chat.completions.create(model="auto-fake-model", messages=user("What is 3 + 4?"))
    (record,) = completion.model_extra["ttc"]["details"]["stages"]
    assert record["stage"] == "cot" and "ran" not in record and "replaced" not in record
    assert completion.choices[0].message.content == "7"
