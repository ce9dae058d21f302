"""Online pivotal-token search and pivot-guided decoding, against the scripted backend."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from ttc_proxy.strategies.pts import PivotIndex
from ttc_proxy.tools.fakebackend import FakeReply, render_template

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, sync_client, user


def entries(logprobs: dict[str, list[tuple[str, float]]]):
    return lambda choice, index, token: logprobs.get(token, [(token, 0.0)])


def completions(fake) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if r.path.endswith("/completions") and "prompt" in r.body]


UNSURE = [(" 42", math.log(0.4)), (" 41", math.log(0.35)), (" 40", math.log(0.2)), (" 7", math.log(0.01))]


def test_search_tries_the_top_alternatives_and_keeps_the_one_whose_rollouts_agree(client, fake):
    vocabulary = fake.vocabulary

    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" not in body:
            return FakeReply(texts=["The answer is 42"], logprobs_fn=entries({" 42": UNSURE}))
        last = vocabulary.pieces[body["prompt"][-1]]
        if body.get("stream"):  # the reply goes on from the kept alternative
            return FakeReply(texts=["."], logprobs_fn=entries({}))
        # rollouts: after " 42" they end at 42; after " 41" at 41; after " 40" they change their mind to 41
        return FakeReply(texts={" 42": ["!"], " 41": [""], " 40": [" no, 41"]}[last])

    fake.script = script
    completion = client.chat.completions.create(model="pts:rollouts=4,alternatives=3-fake-model", messages=user())
    # majority answer 41 (8 of 12 rollouts): " 41" and " 40" agree fully; " 41" is the likelier token
    assert completion.choices[0].message.content == "The answer is 41."
    calls = completions(fake)
    rollouts = [c for c in calls if not c.get("stream")]
    assert sorted(vocabulary.pieces[c["prompt"][-1]] for c in rollouts) == [" 40", " 41", " 42"]
    assert all(c["n"] == 4 and c["max_tokens"] == 24 for c in rollouts)
    prefix = vocabulary.encode(render_template(user())) + [vocabulary.id(t) for t in ("The", " answer", " is")]
    assert all(c["prompt"][:-1] == prefix for c in rollouts)  # exact token-id prefix, the alternative forced
    (continued,) = [c for c in calls if c.get("stream")]
    assert continued["prompt"] == prefix + [vocabulary.id(" 41")]
    (search,) = completion.model_extra["ttc"]["details"]["searches"]
    assert search["alternatives"] == {" 42": 0.0, " 41": 1.0, " 40": 1.0} and search["kept"] == " 41"


def test_search_that_keeps_the_streamed_token_costs_no_cut(client, fake):
    vocabulary = fake.vocabulary

    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" not in body:
            return FakeReply(texts=["The answer is 42"], logprobs_fn=entries({" 42": UNSURE}))
        last = vocabulary.pieces[body["prompt"][-1]]
        return FakeReply(texts={" 42": [""], " 41": [" or 42"], " 40": [" or 42"]}[last])

    fake.script = script
    completion = client.chat.completions.create(model="pts-fake-model", messages=user())
    assert completion.choices[0].message.content == "The answer is 42"
    assert not [c for c in completions(fake) if c.get("stream")]  # the first stream ran on
    assert completion.model_extra["ttc"]["details"]["interventions"] == []


def test_confident_positions_are_not_searched(client, fake):
    fake.script = lambda body: FakeReply(texts=["The answer is 42"], logprobs_fn=entries({}))
    completion = client.chat.completions.create(model="pts-fake-model", messages=user())
    assert completions(fake) == []
    assert completion.model_extra["ttc"]["details"]["searches"] == []


def test_searches_are_bounded_per_reply(client, fake):
    vocabulary = fake.vocabulary
    unsure = lambda choice, index, token: [(token, math.log(0.3)), (" x", math.log(0.3))]  # noqa: E731

    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" not in body:
            return FakeReply(texts=["a b c d e"], logprobs_fn=unsure)
        return FakeReply(texts=[""])

    fake.script = script
    completion = client.chat.completions.create(model="pts:max_searches=2,rollouts=2-fake-model", messages=user())
    assert len(completion.model_extra["ttc"]["details"]["searches"]) == 2
    assert len(completions(fake)) == 4  # 2 searches x 2 alternatives, kept the streamed token both times
    assert vocabulary.id(" x") >= 0


def write_pivots(path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def pivot(context: str, token: str, delta: float, **extra: Any) -> dict[str, Any]:
    return {"model_id": "fake-model", "query": "q", "pivot_context": context, "pivot_token": token,
            "pivot_token_id": None, "prob_before": 0.5, "prob_after": 0.5 + delta, "prob_delta": delta,
            "is_positive": delta > 0, "task_type": "arith", "dataset_id": "d", "dataset_item_id": "1",
            "timestamp": "2026-11-29T00:00:00", **extra}


def test_pivot_index_matches_the_end_of_the_context_longest_first():
    index = PivotIndex([pivot("What is 2+2? The answer is", " 4", 0.5),
                        pivot("answer is", " 5", -0.4),
                        pivot("is", " 9", 0.1),  # below min_delta: ignored
                        pivot("", " 1", 0.9)], match_chars=9, min_delta=0.2)
    assert len(index) == 3
    found = index.matching("So the answer is")
    assert {p.token for p in found} == {" 4", " 5"}  # both end in the same 9 characters
    assert index.matching("So the reply is") == []
    assert index.matching("") == []  # an empty context never matches


def test_pivots_bias_the_next_token_where_a_stored_context_matches(fake_backend, fake, tmp_path):
    vocabulary = fake.vocabulary
    path = write_pivots(tmp_path / "p.jsonl", [pivot("The answer is", " 41", 0.5), pivot("The answer is", " 42",
                                                                                           -0.3)])
    config = fake_config(fake_backend, pivots={"arith": {"path": path}})

    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" not in body:
            return FakeReply(texts=["The answer is 42"], logprobs_fn=entries({}))
        if body.get("max_tokens") == 1:  # the biased draw
            return FakeReply(texts=[" 41"], logprobs_fn=entries({}))
        return FakeReply(texts=["."], logprobs_fn=entries({}))

    fake.script = script
    with ProxyServer(config) as server, sync_client(server) as client:
        completion = client.chat.completions.create(model="pts:pivots=arith,search=false,match_chars=13-fake-model",
                                                    messages=user())
    assert completion.choices[0].message.content == "The answer is 41."
    draw = next(c for c in completions(fake) if c.get("max_tokens") == 1)
    assert draw["logit_bias"] == {str(vocabulary.id(" 41")): 10.0, str(vocabulary.id(" 42")): -10.0}
    details = completion.model_extra["ttc"]["details"]
    assert details["pivots_applied"] == 1 and details["pivot_set"] == {"name": "arith", "pivots": 2}
    assert details["interventions"][0]["action"] == "pivot"


def test_pivots_cost_nothing_where_the_stream_already_agrees(fake_backend, fake, tmp_path):
    path = write_pivots(tmp_path / "p.jsonl", [pivot("The answer is", " 42", 0.5)])
    config = fake_config(fake_backend, pivots={"arith": {"path": path}})
    fake.script = lambda body: FakeReply(texts=["The answer is 42"], logprobs_fn=entries({}))
    with ProxyServer(config) as server, sync_client(server) as client:
        completion = client.chat.completions.create(model="pts:pivots=arith,search=false-fake-model",
                                                    messages=user())
    assert completion.choices[0].message.content == "The answer is 42"
    assert completions(fake) == []


def test_unknown_pivot_set_and_pointless_parameters_are_400s(fake_backend, fake, tmp_path):
    path = write_pivots(tmp_path / "p.jsonl", [pivot("x", " y", 0.5)])
    config = fake_config(fake_backend, pivots={"arith": {"path": path}})
    with ProxyServer(config) as server:
        error = assert_openai_error(chat(server, {"model": "pts:pivots=nope-fake-model", "messages": user()}), 400,
                                    code="unknown_pivots")
        assert "arith" in error["message"]
        assert_openai_error(chat(server, {"model": "pts:search=false-fake-model", "messages": user()}), 400)
        capped = fake_config(fake_backend, pivots={"arith": {"path": path}},
                             backends=[backend_entry(fake_backend, capabilities={"logit_bias": False})])
    with ProxyServer(capped) as server:
        error = assert_openai_error(chat(server, {"model": "pts:pivots=arith-fake-model", "messages": user()}), 400,
                                    code="backend_capability_missing")
        assert "logit_bias" in error["message"]
    assert [r for r in fake.requests if not r.path.endswith(("/props", "/models"))] == []


def test_a_pivot_file_that_is_not_pivotal_tokens_is_a_config_error(tmp_path):
    from ttc_proxy.proxy.config import ConfigError, load_config

    (tmp_path / "p.jsonl").write_text('{"question": "q"}\n')
    (tmp_path / "c.yaml").write_text("backends: [{name: b, base_url: 'http://127.0.0.1:9'}]\n"
                                     "pivots: {arith: {path: p.jsonl}}\n")
    with pytest.raises(ConfigError, match="pivot_context"):
        load_config(tmp_path / "c.yaml")


def test_a_search_the_budget_refuses_leaves_the_stream_to_finish_the_reply(client, fake):
    # max_calls=1: the stream is the one call, so the rollouts at the unsure position are refused. The reply is the
    # stream's (already paid for), not cut at that position; at the first position it is not a failed request.
    for text, unsure in (("The answer is 42 indeed", " 42"), ("Maybe 42", "Maybe")):
        fake.script = lambda body, text=text, unsure=unsure: FakeReply(
            texts=[text], logprobs_fn=entries({unsure: [(unsure, math.log(0.4)), (" 41", math.log(0.35))]}))
        completion = client.chat.completions.create(model="pts-fake-model", messages=user(),
                                                    extra_body={"ttc": {"budget": {"max_calls": 1}}})
        assert completion.choices[0].message.content == text
        assert completion.model_extra["ttc"]["budget_exhausted"] is True
        assert completion.model_extra["ttc"]["details"]["searches"] == []
