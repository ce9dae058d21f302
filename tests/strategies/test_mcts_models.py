"""AB-MCTS over several models (`models`): each model a treequest action chosen per node by Thompson sampling,
each model's calls sent to the backend that serves it, every node marked with its model; against two scripted
backends, one always right."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, fake_config, sync_client, user


@pytest.fixture(scope="module")
def other_backend() -> Iterator[FakeBackend]:
    other = FakeBackend(slots=4).start_in_thread()
    yield other
    other.stop_thread()


@pytest.fixture()
def two_models(fake_backend: FakeBackend, other_backend: FakeBackend) -> Iterator[ProxyServer]:
    """`right` on the shared fake (always answers 42), `wrong` on another (always 41)."""
    fake_backend.reset(lambda body: FakeReply(texts=["The answer is 42."]))
    other_backend.reset(lambda body: FakeReply(texts=["The answer is 41."]))
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, name="a", models=["right"]),
                                                 backend_entry(other_backend, name="b", models=["wrong"])])
    with ProxyServer(config) as server:
        yield server


def answer_calls(backend: FakeBackend) -> list[dict[str, Any]]:
    return [r.body for r in backend.chat_requests()
            if not str(r.body["messages"][-1].get("content", "")).startswith("Echo probe")]


SEARCH = {"models": ["wrong", "right"], "score": "verifier", "regex": "42", "iterations": 8, "batch": 2,
          "max_depth": 2}


def test_the_search_shifts_its_expansions_to_the_model_that_is_right(two_models, fake_backend, other_backend):
    with sync_client(two_models) as sdk:
        completion = sdk.chat.completions.create(model="mcts-right", messages=user(), seed=1,
                                                 extra_body={"ttc": {"params": SEARCH}})
    assert completion.choices[0].message.content == "The answer is 42."
    details = completion.model_extra["ttc"]["details"]
    made = [n for n in details["tree"] if n["action"] != "refused"]
    assert {n["model"] for n in made} == {"right", "wrong"}  # both were tried
    assert all(n["answer"] == ("42" if n["model"] == "right" else "41") for n in made)
    first, last = made[:4], made[-8:]
    # Thompson sampling learns which model scores: the last 8 expansions are (almost all) the right model's
    assert sum(n["model"] == "right" for n in last) >= 7, [n["model"] for n in made]
    assert sum(n["model"] == "right" for n in last) > sum(n["model"] == "right" for n in first)
    assert details["models"]["right"]["mean_score"] == 1.0 and details["models"]["wrong"]["mean_score"] == 0.0
    assert details["models"]["right"]["nodes"] > details["models"]["wrong"]["nodes"]
    # each model's calls went to the backend that serves it, under its own name
    assert {b["model"] for b in answer_calls(fake_backend)} == {"right"}
    assert {b["model"] for b in answer_calls(other_backend)} == {"wrong"}
    assert len(answer_calls(other_backend)) == details["models"]["wrong"]["nodes"]


def test_models_in_the_prefix_are_joined_by_plus_and_the_trace_and_progress_name_each_nodes_model(
        two_models, fake_backend, other_backend):
    with sync_client(two_models) as sdk:
        stream = sdk.chat.completions.create(model="mcts:models=right+wrong,iterations=2,batch=2-right",
                                             messages=user(), seed=3, stream=True)
        reasoning, trace_id = [], None
        for chunk in stream:
            trace_id = trace_id or (chunk.model_extra or {}).get("ttc", {}).get("trace_id")
            if chunk.choices:
                reasoning.append((chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or "")
    progress = "".join(reasoning)
    assert "expanded by one of right, wrong" in progress
    assert " by right)" in progress or " by wrong)" in progress
    assert trace_id is not None
    trace = httpx.get(f"{two_models.url}/v1/traces/{trace_id}").json()
    text = json.dumps(trace)
    assert '"models": ["right", "wrong"]' in text  # the parameters as parsed from `right+wrong`
    assert '"model": "right"' in text or '"model": "wrong"' in text


def test_an_unknown_model_in_models_is_a_400_before_any_call(two_models, fake_backend, other_backend):
    for model in ("mcts:models=right+nowhere-right", "mcts:models=right+right-right", "mcts:models=-right"):
        response = chat(two_models, {"model": model, "messages": user()})
        assert response.status_code == 400, response.text
    error = assert_openai_error(chat(two_models, {"model": "mcts:models=right+nowhere-right", "messages": user()}),
                                400, code="model_not_found")
    assert "nowhere" in error["message"]
    assert answer_calls(fake_backend) == [] and answer_calls(other_backend) == []


def test_a_model_whose_backend_lacks_what_the_scorer_needs_is_a_400(fake_backend, other_backend):
    config = fake_config(fake_backend, backends=[
        backend_entry(fake_backend, name="a", models=["right"]),
        backend_entry(other_backend, name="b", models=["wrong"], capabilities={"logprobs": False})])
    fake_backend.reset()
    other_backend.reset()
    with ProxyServer(config) as server:
        error = assert_openai_error(chat(server, {"model": "mcts:models=right+wrong-right", "messages": user()}),
                                    400, code="unsupported_by_strategy")
    assert "'wrong'" in error["message"] and "logprobs" in error["message"]
    assert answer_calls(fake_backend) == [] and answer_calls(other_backend) == []
