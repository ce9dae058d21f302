"""re2 (the question read twice, one call) and moa (proposals at diverse temperatures and models, then one
aggregation): the prompts they send, composition under bon, streaming, the aggregator's model, and bad input,
against the scripted backend through the official SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ttc_proxy.strategies.moa import AGGREGATE_PROMPT
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, fake_config, sync_client, user

QUESTION = "What is 6 times 7?"


def answer_calls(backend: FakeBackend) -> list[dict[str, Any]]:
    return [r.body for r in backend.chat_requests()
            if not str(r.body["messages"][-1].get("content", "")).startswith("Echo probe")]


def stream_text(stream) -> tuple[str, str]:
    content, reasoning = [], []
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
    return "".join(content), "".join(reasoning)


# ================================================================ re2


def test_re2_states_the_question_twice_in_one_call(client, fake):
    fake.script = lambda body: FakeReply(texts=["42"])
    messages = [{"role": "system", "content": "Be brief."}, *user(QUESTION)]
    completion = client.chat.completions.create(model="re2-fake-model", messages=messages, temperature=0)
    assert completion.choices[0].message.content == "42"
    (call,) = answer_calls(fake)
    assert call["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": f"{QUESTION}\nRead the question again: {QUESTION}"}]
    assert call["temperature"] == 0


def test_re2_restates_the_last_user_message_only_and_takes_its_own_words(client, fake):
    fake.script = lambda body: FakeReply(texts=["7"])
    messages = [*user("first"), {"role": "assistant", "content": "ok"}, *user("second")]
    client.chat.completions.create(model="re2:again=Once more:-fake-model", messages=messages)
    (call,) = answer_calls(fake)
    assert [m["content"] for m in call["messages"]] == ["first", "ok", "second\nOnce more: second"]


def test_re2_streams_and_composes_under_bon(client, fake):
    fake.script = lambda body: FakeReply(texts=["The answer is 42."])
    content, reasoning = stream_text(client.chat.completions.create(model="re2-fake-model", messages=user(QUESTION),
                                                                    stream=True))
    assert content == "The answer is 42." and "reading the question twice" in reasoning
    fake.requests.clear()
    completion = client.chat.completions.create(model="bon:n=3,select=vote>re2-fake-model",
                                                messages=user(QUESTION), seed=4)
    assert completion.choices[0].message.content == "The answer is 42."
    calls = answer_calls(fake)
    assert len(calls) == 3
    assert all(c["messages"][-1]["content"].count(QUESTION) == 2 for c in calls)


def test_re2_without_a_user_message_is_a_400(proxy, fake):
    response = chat(proxy, {"model": "re2-fake-model", "messages": [{"role": "system", "content": "hi"}]})
    assert_openai_error(response, 400, code="unsupported_by_strategy")
    assert answer_calls(fake) == []


# ================================================================ moa


def test_moa_draws_n_proposals_at_spread_temperatures_then_aggregates_them_all(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "Other assistants answered" in body["messages"][-1]["content"]:
            return FakeReply(texts=["The answer is 42."])
        return FakeReply(texts=[f"I think {40 + round(body['temperature'] * 10)}."])

    fake.script = script
    completion = client.chat.completions.create(model="moa:n=3,min_temperature=0.2,max_temperature=1-fake-model",
                                                messages=user(QUESTION), temperature=0)
    assert completion.choices[0].message.content == "The answer is 42."
    calls = answer_calls(fake)
    proposals, (aggregate,) = calls[:3], calls[3:]
    assert sorted(c["temperature"] for c in proposals) == [0.2, 0.6, 1.0]
    assert all(c["messages"] == user(QUESTION) for c in proposals)
    shown = "1. I think 42.\n2. I think 46.\n3. I think 50."
    assert aggregate["messages"] == [{"role": "user", "content": AGGREGATE_PROMPT.format(question=QUESTION,
                                                                                          proposals=shown)}]
    assert aggregate["temperature"] == 0  # the request's
    details = completion.model_extra["ttc"]["details"]
    assert [(p["temperature"], p["answer"]) for p in details["proposals"]] == [(0.2, "42"), (0.6, "46"), (1.0, "50")]
    assert details["aggregated"] is True and details["answer"] == "42"


def test_moa_streams_and_composes_under_bon(client, fake):
    fake.script = lambda body: FakeReply(texts=["The answer is 42."])
    content, reasoning = stream_text(client.chat.completions.create(model="moa:n=2-fake-model",
                                                                    messages=user(QUESTION), stream=True))
    assert content == "The answer is 42."
    assert "proposal 0 at T=0.3: 42" in reasoning and "aggregating 2 proposals" in reasoning
    fake.requests.clear()
    completion = client.chat.completions.create(model="bon:n=2,select=vote>moa:n=2-fake-model",
                                                messages=user(QUESTION), seed=2)
    assert completion.choices[0].message.content == "The answer is 42."
    assert len(answer_calls(fake)) == 2 * 3  # two moa runs of two proposals and one aggregation each


@pytest.fixture()
def judge_backend() -> Iterator[FakeBackend]:
    judge = FakeBackend(slots=4).start_in_thread()
    yield judge
    judge.stop_thread()


def test_proposers_and_the_aggregator_can_be_other_models_on_other_backends(fake_backend, judge_backend):
    fake_backend.reset(lambda body: FakeReply(texts=[f"{body['model']} says 41."]))
    judge_backend.reset(lambda body: FakeReply(texts=["The answer is 42."]))
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, name="a", models=["small", "other"]),
                                                 backend_entry(judge_backend, name="b", models=["big"])])
    with ProxyServer(config) as server, sync_client(server) as sdk:
        completion = sdk.chat.completions.create(model="moa:n=3,models=small+other,aggregator_model=big-small",
                                                 messages=user(QUESTION))
    assert completion.choices[0].message.content == "The answer is 42."
    assert sorted(c["model"] for c in answer_calls(fake_backend)) == ["other", "small", "small"]
    (aggregate,) = answer_calls(judge_backend)
    assert aggregate["model"] == "big" and "small says 41." in aggregate["messages"][-1]["content"]
    details = completion.model_extra["ttc"]["details"]
    assert [p["model"] for p in details["proposals"]] == ["small", "other", "small"]
    assert details["aggregator_model"] == "big"


def test_a_failed_proposal_is_left_out(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if body.get("temperature") == 1.0:
            return FakeReply(status=500)
        return FakeReply(texts=["The answer is 42."])

    fake.script = script
    completion = client.chat.completions.create(model="moa:n=3-fake-model", messages=user(QUESTION))
    details = completion.model_extra["ttc"]["details"]
    assert [p["temperature"] for p in details["proposals"]] == [0.3, 0.65]
    assert len(details["failed_proposals"]) == 1
    aggregate = answer_calls(fake)[-1]["messages"][-1]["content"]
    assert "2. The answer is 42." in aggregate and "3." not in aggregate


def test_when_the_budget_stops_the_aggregation_the_most_common_proposal_answers(client, fake):
    fake.script = lambda body: FakeReply(texts=["The answer is 42."])
    completion = client.chat.completions.create(model="moa:n=2-fake-model", messages=user(QUESTION),
                                                extra_body={"ttc": {"budget": {"max_calls": 2}}})
    assert completion.choices[0].message.content == "The answer is 42."
    assert completion.model_extra["ttc"]["details"]["aggregated"] is False
    assert completion.model_extra["ttc"]["budget_exhausted"] is True
    assert len(answer_calls(fake)) == 2


def test_bad_moa_parameters_and_unknown_models_are_a_400(proxy, fake):
    for model, code in (("moa:n=0-fake-model", "invalid_strategy_params"),
                        ("moa:min_temperature=1.5,max_temperature=0.5-fake-model", "invalid_strategy_params"),
                        ("moa:aggregator_model=nowhere-fake-model", "model_not_found")):
        assert_openai_error(chat(proxy, {"model": model, "messages": user()}), 400, code=code)
    assert answer_calls(fake) == []
