"""The self-consistency strategy: voting, sampling, splitting across requests, and the parameters it forwards."""

from __future__ import annotations

import openai
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from ttc_proxy.strategies.answers import tally
from ttc_proxy.strategies.sc import leader_is_decided, leader_keeps_probability, majority_settled_probability

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, chat, sync_client, user

# By seed offset: which full text sample i says. Answer 12 has the majority (4 of 8), 7 has 3.
TEXTS_BY_OFFSET = [
    "First I add 3 and 4, so the answer is 7.",
    "Twelve: 3 times 4 is 12. The answer is 12.",
    "3 + 4 = 7",
    "Let me think. 4 * 3 gives \\boxed{12}",
    "#### 12",
    "I am not sure; maybe 9.",
    "answer: 7",
    "The answer is 12.",
]


@pytest.fixture(scope="module")
def three_slots():
    backend = FakeBackend(slots=3).start_in_thread()
    yield backend
    backend.stop_thread()


@pytest.fixture(scope="module")
def three_slot_proxy(three_slots):
    with ProxyServer(fake_config(three_slots)) as server:
        yield server


def by_seed(base: int):
    return lambda body: FakeReply(texts=[TEXTS_BY_OFFSET[body["seed"] - base]])


def test_majority_vote_returns_full_text_of_a_winner(client, fake):
    fake.script = by_seed(100)
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user(), seed=100)
    # The first sample (in seed order) whose extracted answer is the majority one, verbatim.
    assert completion.choices[0].message.content == TEXTS_BY_OFFSET[1]
    details = completion.ttc["details"]
    assert details["answer"] == "12"
    assert details["votes"] == {"12": 4, "7": 3, "9": 1}
    assert details["samples"] == 8


def test_majority_vote_across_choices_of_one_request(client, fake):
    # Without a seed, choices come from n=4 requests; each request's choices say A, B, B, C.
    fake.script = lambda body: FakeReply(texts=["It is 5.", "So the result: 6", "6 for sure", "7"])
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user())
    assert completion.choices[0].message.content == "So the result: 6"
    assert completion.ttc["details"]["votes"] == {"6": 4, "5": 2, "7": 2}


def test_minority_text_is_never_returned(client, fake):
    fake.script = lambda body: FakeReply(texts=["The answer is 1.", "The answer is 2.", "The answer is 2."])
    completion = client.chat.completions.create(model="sc:n=3-fake-model", messages=user())
    assert completion.choices[0].message.content == "The answer is 2."


def test_n_is_split_by_the_learned_cap(client, fake):
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user())
    requests = fake.chat_requests()
    assert [r.body.get("n") for r in requests] == [4, 4]  # /props said 4 slots
    assert all("seed" not in r.body for r in requests)
    assert completion.ttc["backend_calls"] == 2 and completion.ttc["details"]["samples"] == 8


def test_cap_is_learned_from_props(three_slot_proxy, three_slots):
    three_slots.reset()
    completion = sync_client(three_slot_proxy).chat.completions.create(model="sc:n=8-fake-model", messages=user())
    assert sorted((r.body.get("n") or 1) for r in three_slots.chat_requests()) == [2, 3, 3]
    assert completion.ttc["details"]["samples"] == 8
    assert completion.ttc["backend_calls"] == 3


def test_generic_backend_is_recognised_and_its_cap_learned(fake_backend, fake):
    # kind "generic" (the default for --backend URL): /v1/models says llamacpp, so /props is asked for slots.
    config = fake_config(fake_backend, backends=[{"name": "g", "kind": "generic", "base_url": fake_backend.base_url}])
    with ProxyServer(config) as server:
        completion = sync_client(server).chat.completions.create(model="sc:n=8-fake-model", messages=user())
    assert [r.body.get("n") for r in fake.chat_requests()] == [4, 4]
    assert completion.usage.completion_tokens == 32  # counted per choice, as for llama-server


def test_small_n_is_one_request(client, fake):
    client.chat.completions.create(model="sc:n=3-fake-model", messages=user())
    assert [r.body.get("n") for r in fake.chat_requests()] == [3]
    client.chat.completions.create(model="sc:n=1-fake-model", messages=user())
    assert "n" not in fake.chat_requests()[1].body  # a single sample is a plain request


def test_seed_makes_one_request_per_sample(client, fake):
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user(), seed=40)
    requests = fake.chat_requests()
    assert sorted(r.body["seed"] for r in requests) == list(range(40, 48))
    assert all("n" not in r.body for r in requests)
    assert completion.ttc["backend_calls"] == 8


@pytest.mark.parametrize(("asked", "used"), [(0.3, 0.3), (1.5, 1.5), (0.0, 0.8), (None, 0.8)])
def test_temperature(client, fake, asked, used):
    kwargs = {} if asked is None else {"temperature": asked}
    completion = client.chat.completions.create(model="sc:n=4-fake-model", messages=user(), **kwargs)
    assert [r.body["temperature"] for r in fake.chat_requests()] == [used]
    assert completion.ttc["details"]["temperature"] == used


def test_temperature_param_is_the_fallback(client, fake):
    completion = client.chat.completions.create(model="sc:n=2,temperature=1.2-fake-model", messages=user())
    assert fake.chat_requests()[0].body["temperature"] == 1.2
    assert completion.ttc["details"]["temperature"] == 1.2
    # A request temperature above 0 is still the request's own.
    completion = client.chat.completions.create(model="sc:n=2,temperature=1.2-fake-model", messages=user(),
                                                temperature=0.5)
    assert fake.chat_requests()[1].body["temperature"] == 0.5
    assert completion.ttc["details"]["temperature"] == 0.5


def test_sampling_fields_reach_every_call(client, fake):
    client.chat.completions.create(
        model="sc:n=4-fake-model", messages=user(), max_tokens=33, top_p=0.9, stop=["\n\n", "END"], seed=7,
        presence_penalty=0.5, extra_body={"top_k": 20, "min_p": 0.1, "cache_prompt": True},
    )
    requests = fake.chat_requests()
    assert len(requests) == 4
    for request in requests:
        body = request.body
        assert body["max_tokens"] == 33 and body["top_p"] == 0.9 and body["stop"] == ["\n\n", "END"]
        assert body["top_k"] == 20 and body["min_p"] == 0.1 and body["cache_prompt"] is True
        assert body["presence_penalty"] == 0.5
        assert body["messages"] == user() and body["model"] == "fake-model"
        assert "ttc" not in body and "stream" not in body
    assert sorted(r.body["seed"] for r in requests) == [7, 8, 9, 10]


def test_sampling_fields_reach_every_split_call(client, fake):
    client.chat.completions.create(model="sc:n=8-fake-model", messages=user(), max_tokens=21, top_p=0.5,
                                   stop="\n", extra_body={"top_k": 3})
    requests = fake.chat_requests()
    assert len(requests) == 2
    for request in requests:
        assert (request.body["max_tokens"], request.body["top_p"], request.body["stop"], request.body["top_k"]) == \
            (21, 0.5, "\n", 3)


def test_max_completion_tokens_is_used(client, fake):
    client.chat.completions.create(model="sc:n=2-fake-model", messages=user(), max_completion_tokens=44)
    assert fake.chat_requests()[0].body["max_tokens"] == 44


def test_default_max_tokens_from_config(fake_backend, fake):
    with ProxyServer(fake_config(fake_backend, strategies={"default_max_tokens": 77})) as server:
        sync_client(server).chat.completions.create(model="sc:n=8-fake-model", messages=user())
    requests = fake.chat_requests()
    assert len(requests) == 2 and all(r.body["max_tokens"] == 77 for r in requests)


def test_configured_strategy_defaults(fake_backend, fake):
    with ProxyServer(fake_config(fake_backend, strategies={"defaults": {"sc": {"n": 3}}})) as server:
        completion = sync_client(server).chat.completions.create(model="sc-fake-model", messages=user())
    assert completion.ttc["params"]["n"] == 3
    assert [r.body.get("n") for r in fake.chat_requests()] == [3]


def test_client_n_above_one_is_refused(client, fake):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="sc-fake-model", messages=user(), n=2)
    assert info.value.body["param"] == "n"
    assert fake.requests == []
    client.chat.completions.create(model="sc:n=2-fake-model", messages=user(), n=1)  # n=1 is fine


@pytest.mark.parametrize("feature", [
    {"functions": [{"name": "f", "parameters": {"type": "object"}}]},
    {"function_call": "auto"},
])
def test_legacy_function_fields_are_refused(proxy, fake, feature):
    (name,) = feature
    response = chat(proxy, {"model": "sc-fake-model", "messages": user(), **feature})
    error = assert_openai_error(response, 400, param=name, code="unsupported_by_strategy")
    assert name in error["message"]
    assert fake.requests == []


def test_strategy_gets_conversation_unflattened(client, fake):
    turns = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    client.chat.completions.create(model="sc:n=2-fake-model", messages=turns)
    assert fake.chat_requests()[0].body["messages"] == turns



# ---- adaptive self-consistency ----


def test_beta_rule_settles_four_unanimous_votes_but_not_three():
    assert majority_settled_probability(tally("aaaa")) == pytest.approx(1 - 1 / 32)
    assert majority_settled_probability(tally("aaa")) == pytest.approx(1 - 1 / 16)
    assert majority_settled_probability(tally("aaab")) < 0.95
    assert majority_settled_probability(tally("aabb")) == pytest.approx(0.5)


def test_leader_is_decided_only_when_the_rest_cannot_overtake():
    assert leader_is_decided(tally("aaab"), remaining=1)
    assert not leader_is_decided(tally("aaab"), remaining=2)


def test_adaptive_stops_after_the_first_wave_when_unanimous(proxy, fake):
    fake.script = lambda body: FakeReply(texts=["It is 42."])
    body = chat(proxy, {"model": "sc:n=16,adaptive=true-fake-model", "messages": user(), "seed": 3}).json()
    assert body["ttc"]["details"]["samples"] == 4
    assert len(fake.chat_requests()) == 4
    assert "settled after 4 samples" in body["choices"][0]["message"]["reasoning_content"]


def test_adaptive_keeps_sampling_while_answers_disagree(proxy, fake):
    fake.script = lambda body: FakeReply(texts=[f"It is {int(body['seed']) % 2}."])
    body = chat(proxy, {"model": "sc:n=10,adaptive=true,wave=3-fake-model", "messages": user(), "seed": 0}).json()
    assert body["ttc"]["details"]["samples"] == 10  # 4 + 3 + 3: never settled
    assert sorted(r.body["seed"] for r in fake.chat_requests()) == list(range(10))


def test_predictive_rule_gives_ties_to_the_answer_seen_first():
    # Votes a, b and one sample to come: b wins only if that sample is b (weight 1 of 1 + 1 + 1 new-answer
    # weight); a new answer ties a at one vote and loses the tie, so a keeps the lead with probability 2/3.
    assert leader_keeps_probability(tally("ab"), total=3, new_answer_weight=1.0) == pytest.approx(2 / 3, abs=0.03)
    # With no new-answer weight to speak of, the next sample is a or b with equal odds.
    assert leader_keeps_probability(tally("ab"), total=3, new_answer_weight=1e-9) == pytest.approx(0.5, abs=0.03)


def test_predictive_rule_grows_with_agreement_and_is_reproducible():
    scattered = leader_keeps_probability(tally("abc"), total=8, new_answer_weight=1.0)
    split = leader_keeps_probability(tally("ab"), total=8, new_answer_weight=1.0)
    leaning = leader_keeps_probability(tally("aab"), total=8, new_answer_weight=1.0)
    agreed = leader_keeps_probability(tally("aa"), total=8, new_answer_weight=1.0)
    assert scattered < split < leaning < agreed < 1
    assert leader_keeps_probability(tally("aaaa"), total=8, new_answer_weight=1.0) > 0.99
    assert leader_keeps_probability(tally("aab"), total=3, new_answer_weight=1.0) == 1.0  # nothing left to draw
    assert leader_keeps_probability(tally("aab"), total=8, new_answer_weight=1.0) == leaning


PREDICTIVE = "sc:n=8,adaptive=true,stop_rule=predictive,first_wave=2,wave=1,stop_confidence=0.9-fake-model"


def test_predictive_rule_stops_after_two_agreeing_samples(proxy, fake):
    fake.script = lambda body: FakeReply(texts=["It is 42."])
    body = chat(proxy, {"model": PREDICTIVE, "messages": user(), "seed": 3}).json()
    assert body["ttc"]["details"]["samples"] == 2
    assert len(fake.chat_requests()) == 2
    assert body["ttc"]["details"]["settled_probability"] >= 0.9


def test_predictive_rule_samples_one_at_a_time_while_answers_disagree(proxy, fake):
    # Seeds 0..7 say 0, 1, 2, 2, 2, 2, ...: after 0, 1, 2 the leader is unsettled; 2 then pulls ahead.
    fake.script = lambda body: FakeReply(texts=[f"It is {min(int(body['seed']), 2)}."])
    body = chat(proxy, {"model": PREDICTIVE, "messages": user(), "seed": 0}).json()
    samples = body["ttc"]["details"]["samples"]
    assert 4 <= samples < 8
    assert body["ttc"]["details"]["answer"] == "2"
    assert sorted(r.body["seed"] for r in fake.chat_requests()) == list(range(samples))


def cut_off_unless(finished: set[int], finished_text: str = "It is 5.") -> object:
    """Seeds in `finished` say `finished_text`; the others are cut off by max_tokens mid-sum, last number 12."""
    def script(body: dict) -> FakeReply:
        done = int(body["seed"]) in finished
        return FakeReply(texts=[finished_text if done else "So 12 + 12"], finish_reason="stop" if done else "length")
    return script


def test_samples_cut_off_by_max_tokens_do_not_vote(client, fake):
    # Four samples are cut off (their "answer" is an operand, 12); the two that finished say 5.
    fake.script = cut_off_unless({102, 105})
    completion = client.chat.completions.create(model="sc:n=6-fake-model", messages=user(), seed=100)
    details = completion.ttc["details"]
    assert details["answer"] == "5" and completion.choices[0].message.content == "It is 5."
    assert details["votes"] == {"5": 2} and details["not_counted"] == 4
    assert [(c["answer"], c["finish_reason"], c["counted"]) for c in details["candidates"]] == [
        ("12", "length", False), ("12", "length", False), ("5", "stop", True),
        ("12", "length", False), ("12", "length", False), ("5", "stop", True)]
    assert "sample 1/6 → 12 (cut off by max_tokens: no vote)" in completion.choices[0].message.model_extra[
        "reasoning_content"]
    counted_all = client.chat.completions.create(model="sc:n=6,count_truncated=true-fake-model", messages=user(),
                                                 seed=100)
    assert counted_all.ttc["details"]["answer"] == "12" and counted_all.ttc["details"]["not_counted"] == 0


def test_when_no_sample_finished_every_sample_votes(client, fake):
    fake.script = cut_off_unless(set())
    completion = client.chat.completions.create(model="sc:n=3-fake-model", messages=user(), seed=100)
    assert completion.ttc["details"]["votes"] == {"12": 3}


def test_adaptive_stop_waits_for_two_finished_votes(proxy, fake):
    # Seed 0 is cut off; seeds 1 and 2 agree: one vote settles nothing, two do.
    fake.script = cut_off_unless({1, 2, 3, 4, 5, 6, 7}, "It is 42.")
    body = chat(proxy, {"model": PREDICTIVE, "messages": user(), "seed": 0}).json()
    assert body["ttc"]["details"]["samples"] == 3 and body["ttc"]["details"]["answer"] == "42"


def test_a_single_finished_vote_never_settles(proxy, fake):
    # Only seed 0 finishes. Its lone vote would pass a 0.7 bar (it wins every tie), but agrees with nothing.
    fake.script = cut_off_unless({0}, "It is 42.")
    model = PREDICTIVE.replace("stop_confidence=0.9", "stop_confidence=0.7")
    body = chat(proxy, {"model": model, "messages": user(), "seed": 0}).json()
    assert body["ttc"]["details"]["samples"] == 8 and body["ttc"]["details"]["answer"] == "42"
