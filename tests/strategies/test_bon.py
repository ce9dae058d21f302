"""Best-of-n: the pure selectors (offline-usable), and the strategy over HTTP with the official SDK."""

from __future__ import annotations

import math
import re
import time

import openai
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply, _tokens
from ttc_proxy.strategies.bon import BestOfNParams, resolve_fallback
from ttc_proxy.strategies.formats import check_all, check_schema, extract_json, schema_errors
from ttc_proxy.strategies.framework import Candidate, Token
from ttc_proxy.strategies.scoring import ConfidenceSpec, judge_messages, judge_probability, token_confidence, trace_confidence
from ttc_proxy.strategies.selection import (
    Pool,
    answer_scores,
    select,
    select_by_answer_scores,
    select_verified,
    tournament,
)

from ttc_proxy.proxy.config import ProxyConfig
from ttc_proxy.proxy.runs.sampling import derive_seed

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, sync_client, tok, user

# ================================================================ pure functions


def entry(top: list[float], token: str = "t") -> Token:
    return tok(token, top[0], tuple((f"{token}{i}", lp) for i, lp in enumerate(top)))


def test_token_confidence_is_high_for_a_peaked_distribution():
    peaked = entry([-0.01, -6.0, -7.0, -8.0, -9.0])
    flat = entry([-1.5, -1.6, -1.6, -1.7, -1.7])
    assert token_confidence(peaked, 5) == pytest.approx(6.002)
    assert token_confidence(peaked, 5) > token_confidence(flat, 5)
    assert token_confidence(peaked, 2) == pytest.approx(3.005)  # only the top-k count
    # Without alternatives the sampled token stands in; -inf values are skipped.
    assert token_confidence(tok("x", -0.5), 5) == 0.5
    assert token_confidence(entry([-1.0, -math.inf]), 5) == 1.0


def test_trace_confidence_variants():
    trace = [5.0, 5.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0]
    assert trace_confidence(trace, "mean", 2) == pytest.approx(4.0)
    assert trace_confidence(trace, "tail", 2) == 5.0
    assert trace_confidence(trace, "tail", 3) == 5.0
    assert trace_confidence(trace, "lowest_group", 2) == 1.0
    assert trace_confidence(trace, "lowest_group", 4) == pytest.approx(3.0)  # [5,1,1,5] or [1,1,5,5]
    # A trace shorter than the window is one group: all variants are the mean.
    short = [2.0, 4.0]
    assert {trace_confidence(short, v, 16) for v in ("mean", "tail", "lowest_group")} == {3.0}
    assert trace_confidence([], "mean", 4) is None


def candidate(text: str, levels: list[float] | None = None) -> Candidate:
    """A candidate whose token i has top alternatives at -0.01, -L, -L-1, ... (confidence grows with L)."""
    logprobs = None
    if levels is not None:
        logprobs = tuple(entry([-0.01] + [-level - j for j in range(19)]) for level in levels)
    return Candidate(text, "stop", len(_tokens(text)), logprobs)


def test_pool_of_candidates_and_rescoring_offline():
    cands = [candidate("The answer is 7.", [4, 4, 4]), candidate("#### 12", [6, 6, 0.1, 6])]
    mean = Pool.of(cands, ConfidenceSpec("mean", 2, 5))
    low = Pool.of(cands, ConfidenceSpec("lowest_group", 2, 5))
    assert mean.answers == low.answers == ("7", "12")
    assert select(mean, "confidence").answer == "12"  # high on average...
    assert select(low, "confidence").answer == "7"  # ...but with a dip
    assert Pool.of(cands, None).confidences == (None, None)


def test_candidates_cut_off_by_max_tokens_compete_only_when_none_finished():
    # Two replies were cut off while still quoting an operand (12); the one finished reply says 5.
    pool = Pool(("12", "12", "5"), (9.0, 9.0, 1.0), (False, False, True))
    assert pool.counted() == [2]
    for selector in ("vote", "confidence", "weighted"):
        assert select(pool, selector).answer == "5"
    assert select_verified(pool, [True, True, True], "vote")[0].answer == "5"
    assert select(Pool(("12", "12", "5"), (9.0, 9.0, 1.0), (False, False, False)), "vote").answer == "12"
    cut = Candidate("So 12 + 12", "length", 5)
    done = candidate("It is 5.")
    assert Pool.of([cut, done], None).finished == (False, True)
    assert Pool.of([cut, done], None, count_truncated=True).finished == (True, True)


def test_vote_majority_and_tie_breaks():
    pool = Pool(("1", "2", "2", "3"), (9.0, 1.0, 1.0, 8.0))
    chosen = select(pool, "vote")
    assert (chosen.answer, chosen.index, chosen.tied) == ("2", 1, ())
    assert chosen.scores == {"2": 2.0, "1": 1.0, "3": 1.0}
    tie = Pool(("1", "2", "2", "1"), (1.0, 2.0, 3.0, 1.5))
    by_weight = select(tie, "vote", fallback="weighted")
    assert (by_weight.answer, by_weight.index, by_weight.tied, by_weight.broken_by) == ("2", 2, ("1", "2"), "weighted")
    first = select(tie, "vote")
    assert (first.answer, first.broken_by) == ("1", "first")
    # A confidence tie-breaker without confidences becomes a vote, then the first answer.
    assert select(Pool(("1", "2")), "vote", fallback="confidence").answer == "1"


def test_representative_is_the_most_confident_sample_of_the_answer():
    pool = Pool(("5", "5", "5", "6"), (1.0, 4.0, 2.0, 3.0))
    assert select(pool, "vote").index == 1
    assert select(Pool(("5", "5", "6")), "vote").index == 0  # no confidences: the first


def test_confidence_picks_the_most_confident_candidate():
    pool = Pool(("7", "7", "7", "12"), (2.0, 2.5, 2.2, 6.0))
    chosen = select(pool, "confidence")
    assert (chosen.answer, chosen.index) == ("12", 3)
    # Equal best confidence but one answer: no tie.
    assert select(Pool(("4", "4"), (1.0, 1.0)), "confidence").tied == ()
    # Equal best confidence, two answers: the fallback decides among them.
    tie = select(Pool(("4", "5", "5", "6"), (3.0, 3.0, 1.0, 0.5)), "confidence", fallback="vote")
    assert (tie.answer, tie.tied, tie.broken_by) == ("5", ("4", "5"), "vote")
    with pytest.raises(ValueError, match="confidences"):
        select(Pool(("1",)), "confidence")


def test_weighted_vote_sums_confidence_per_answer():
    pool = Pool(("7", "7", "7", "12", "12"), (1.0, 1.0, 1.0, 2.0, 2.5))
    chosen = select(pool, "weighted")
    assert chosen.answer == "12" and chosen.index == 4  # 4.5 > 3.0, its most confident sample
    assert chosen.scores == {"12": 4.5, "7": 3.0}
    assert select(pool, "vote").answer == "7"
    # Missing confidences weigh nothing.
    assert select(Pool(("1", "2", "2"), (1.0, None, None)), "weighted").answer == "1"


def test_answer_scores_rank_offline():
    pool = Pool(("a", "b", "b"), (5.0, 1.0, 1.0))
    assert list(answer_scores(pool, "vote")) == ["b", "a"]
    assert list(answer_scores(pool, "confidence")) == ["a", "b"]
    assert list(answer_scores(pool, "first")) == ["a", "b"]
    with pytest.raises(ValueError, match="valid"):
        answer_scores(pool, "nope")


def test_select_by_answer_scores_and_ties():
    pool = Pool(("1", "2", "2", "3"), (1.0, 1.0, 1.0, 9.0))
    assert select_by_answer_scores(pool, {"1": 0.2, "2": 0.3, "3": 0.9}, "judge").answer == "3"
    tie = select_by_answer_scores(pool, {"1": 0.9, "2": 0.9, "3": 0.1}, "judge", fallback="vote")
    assert (tie.answer, tie.tied, tie.broken_by) == ("2", ("1", "2"), "vote")
    # Answers without a score never win.
    assert select_by_answer_scores(pool, {"1": 0.0}, "judge").answer == "1"


def test_select_verified():
    pool = Pool(("1", "2", "2", "3"), (1.0, 1.0, 1.0, 9.0))
    chosen, over_all = select_verified(pool, [False, True, True, True], "weighted")
    assert (chosen.answer, chosen.index, over_all) == ("3", 3, False)
    assert chosen.scores == {"2": 2.0, "3": 1.0} and chosen.broken_by == "weighted"
    chosen, _ = select_verified(pool, [False, True, True, True], "vote")
    assert chosen.answer == "2"
    chosen, over_all = select_verified(pool, [True, False, False, False], "weighted")
    assert (chosen.answer, chosen.tied, over_all) == ("1", (), False)
    chosen, over_all = select_verified(pool, [False] * 4, "vote")
    assert (chosen.answer, over_all) == ("2", True)


def test_judge_probability():
    first = tok("Yes", math.log(0.5), (("Yes", math.log(0.5)), (" yes", math.log(0.1)),
                                                ("No", math.log(0.2)), (" NO", math.log(0.1)), ("Maybe", -1.0)))
    assert judge_probability(first, "Yes") == pytest.approx(0.6 / 0.9)
    ab = tok("B", math.log(0.75), (("B", math.log(0.75)), ("A", math.log(0.25))))
    assert judge_probability(ab, "B", "a", "b") == pytest.approx(0.25)
    # No yes/no among the logprobs, or none at all: the sampled text decides.
    assert judge_probability(tok("Sure", -0.1, (("Sure", -0.1),)), "Sure") is None
    assert judge_probability(None, "Yes.") == 1.0
    assert judge_probability(None, " no") == 0.0
    assert judge_probability(None, "") is None


async def test_tournament_seeds_byes_and_ties():
    strength = {"a": 1, "b": 4, "c": 2, "d": 3, "e": 0}
    calls: list[tuple[str, str]] = []

    async def compare(x: str, y: str) -> float:
        calls.append((x, y))
        return 0.5 if strength[x] == strength[y] else (0.9 if strength[x] > strength[y] else 0.1)

    winner, matches = await tournament(["a", "b", "c", "d", "e"], compare)
    assert winner == "b"
    assert calls[:2] == [("b", "e"), ("c", "d")]  # round 1: "a" (best seed) has a bye; best vs worst
    assert len(matches) == 4 and matches[-1].winner == "b"

    async def even(x: str, y: str) -> float:
        return 0.5

    assert (await tournament(["x", "y", "z"], even))[0] == "x"  # ties go to the better seed
    assert (await tournament(["only"], even)) == ("only", [])


def test_resolve_fallback():
    assert resolve_fallback("confidence", "auto", True) == "weighted"
    assert resolve_fallback("weighted", "auto", True) == "vote"
    assert resolve_fallback("judge", "auto", False) == "vote"
    assert resolve_fallback("vote", "auto", False) == "first"
    assert resolve_fallback("vote", "vote", True) == "first"


def test_judge_messages_keep_the_conversation_and_quote_the_question():
    turns = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": [{"type": "text", "text": "3+3?"}]}]
    built = judge_messages(turns, lambda q: f"Q={q}")
    assert built[:3] == turns[:3] and built[3] == {"role": "user", "content": "Q=3+3?"}


# ---------------------------------------------------------------- checks


def test_json_schema_subset():
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "minLength": 1}, "age": {"type": "integer", "minimum": 0},
                             "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True}}}
    check_schema(schema)
    assert schema_errors({"name": "x", "age": 3, "tags": ["a"]}, schema) == []
    assert schema_errors({"name": "x", "age": 3.0}, schema) == []  # 3.0 is an integer in JSON Schema
    assert schema_errors({"name": "x", "age": True}, schema)  # booleans are not numbers
    assert any("required" in e for e in schema_errors({"name": "x"}, schema))
    assert schema_errors({"name": "x", "age": 1, "extra": 1}, schema)
    assert schema_errors({"name": "x", "age": 1, "tags": ["a", "a"]}, schema)
    assert schema_errors({"name": "x", "age": -1}, schema)
    assert schema_errors(5, {"anyOf": [{"type": "string"}, {"type": "integer"}]}) == []
    assert schema_errors(5, {"oneOf": [{"type": "number"}, {"type": "integer"}]})  # matches both
    assert schema_errors("ab", {"not": {"pattern": "^a"}})
    for bad in ({"$ref": "#/x"}, {"type": "text"}, {"properties": {"a": {"minimum": "1"}}}, {"pattern": "("}):
        with pytest.raises(ValueError):
            check_schema(bad)


def test_extract_json():
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Here:\n```json\n{"a": 2}\n```\ndone') == {"a": 2}
    assert extract_json('first {"a": 1} then {"b": [1, {"c": 2}]} end') == {"b": [1, {"c": 2}]}
    with pytest.raises(ValueError):
        extract_json("no json {here")


def test_check_all():
    texts = ['{"answer": 12}', '{"answer": "twelve"}', "The answer is 12", 'so {"answer": 7}']
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
    assert [r.passed for r in check_all(texts, json_schema=schema)] == [True, False, False, True]
    assert [r.passed for r in check_all(texts, regex=r"\b12\b")] == [True, False, True, False]
    assert [r.passed for r in check_all(texts, regex=r"\b12\b", json_schema=schema)] == [True, False, False, False]
    assert "no JSON" in check_all(["nothing"], json_schema=schema)[0].reason


def test_params():
    assert BestOfNParams().select == "confidence" and BestOfNParams().n == 8
    assert BestOfNParams().confidence == "logprob"  # the best measured (issue 17)
    assert BestOfNParams.model_validate({"json_schema": '{"type": "object"}', "select": "verifier"}).json_schema == \
        {"type": "object"}
    for bad in ({"select": "verifier"}, {"regex": "("}, {"json_schema": {"$ref": "#"}}, {"top_k": 1},
                {"generator": "sc"}):
        with pytest.raises(ValueError):
            BestOfNParams.model_validate(bad)


# ================================================================ over HTTP

# Confidence levels for the fake's top logprobs: each token's alternatives are -0.01, -L, -L-1, ...; the DeepConf
# token confidence (top-5) is (0.01 + 4L + 6) / 5, so it grows with L.
HIGH, LOW = 8.0, 1.0


def alternatives(token: str, level: float) -> list[tuple[str, float]]:
    return [(token, -0.01)] + [(f"alt{j}", -level - j) for j in range(19)]


def pool_reply(samples: list[tuple[str, float | list[float]]]) -> FakeReply:
    """Choice i says samples[i]'s text, with token confidence level(s) samples[i][1] (per token if a list)."""

    def logprobs(choice: int, index: int, token: str) -> list[tuple[str, float]]:
        level = samples[choice % len(samples)][1]
        return alternatives(token, level[index % len(level)] if isinstance(level, list) else level)

    return FakeReply(texts=[text for text, _ in samples], logprobs_fn=logprobs)


def is_judge(body: dict) -> bool:
    return body.get("max_tokens") == 1 and str(body["messages"][-1]["content"]).startswith("Question:")


def yes_no(p_yes: float, text: str | None = None) -> FakeReply:
    """A judge reply whose first token's top logprobs give P(yes) = p_yes (spread over case variants)."""
    pairs = [("Yes", math.log(p_yes * 0.8)), (" yes", math.log(p_yes * 0.2)),
             ("No", math.log((1 - p_yes) * 0.9)), ("no", math.log((1 - p_yes) * 0.1)), ("The", math.log(0.01))]
    pairs.sort(key=lambda p: -p[1])
    return FakeReply(texts=[text or pairs[0][0].strip()], logprobs_fn=lambda c, i, t: pairs)


def judged_answer(body: dict) -> str:
    return re.search(r"Proposed answer: (.*)\n", body["messages"][-1]["content"]).group(1)


def test_confidence_picks_the_confident_minority(client, fake):
    fake.script = lambda body: pool_reply([("The answer is 7.", LOW), ("The answer is 7, surely.", LOW),
                                           ("I get 12.", HIGH), ("So 7", LOW)])
    completion = client.chat.completions.create(model="bon:n=4,confidence=lowest_group-fake-model", messages=user())
    assert completion.choices[0].message.content == "I get 12."
    details = completion.ttc["details"]
    assert details["selector"] == "confidence" and details["answer"] == "12"
    assert details["winner"]["index"] == 2
    assert [c["answer"] for c in details["candidates"]] == ["7", "7", "12", "7"]
    confidences = [c["confidence"] for c in details["candidates"]]
    assert confidences[2] == pytest.approx((0.01 + 4 * HIGH + 6) / 5) and max(confidences) == confidences[2]
    assert details["confidence"] == {"variant": "lowest_group", "window": 16, "top_k": 5}
    (request,) = fake.chat_requests()
    assert request.body["n"] == 4 and request.body["logprobs"] is True and request.body["top_logprobs"] == 5
    reasoning = completion.choices[0].message.model_extra["reasoning_content"]
    # progress shows scores on one [0, 1] scale: DeepConf's 7.6 as 7.6 / (7.6 + ln 5)
    assert "sample 3/4 → 12 (score 0.825)" in reasoning
    assert "winner: 12 (sample 3, score 0.825)" in reasoning


def test_confidence_variants_disagree_on_a_dip(client, fake):
    # Sample 1 is very confident except for one token; sample 2 is moderately confident throughout.
    samples = [("one two three four five six seven eight, answer 1", [HIGH, HIGH, HIGH, 0.0, HIGH, HIGH, HIGH]),
               ("one two three four five six seven eight, answer 2", 4.5)]
    fake.script = lambda body: pool_reply(samples)
    by_mean = client.chat.completions.create(model="bon:n=2,confidence=mean-fake-model", messages=user())
    by_group = client.chat.completions.create(model="bon:n=2,confidence=lowest_group,window=2-fake-model",
                                              messages=user())
    by_tail = client.chat.completions.create(model="bon:n=2,confidence=tail,window=3-fake-model", messages=user())
    assert by_mean.ttc["details"]["answer"] == "1"
    assert by_group.ttc["details"]["answer"] == "2"
    assert by_tail.ttc["details"]["answer"] == "1"


def test_weighted_vote(client, fake):
    # 7 has three low-confidence votes, 12 two high-confidence ones: the weighted vote picks 12, a vote picks 7.
    samples = [("It is 7.", LOW), ("Answer: 12", HIGH), ("7!", LOW), ("12, clearly", HIGH - 1), ("7 I think", LOW)]
    # Seeded: one request per sample (each its choice 0), so the script picks the sample by seed.
    fake.script = lambda body: pool_reply([samples[body["seed"] - 1]])
    weighted = client.chat.completions.create(model="bon:n=5,select=weighted,confidence=lowest_group-fake-model",
                                              messages=user(), seed=1)
    assert weighted.choices[0].message.content == "Answer: 12"  # the more confident sample of 12
    details = weighted.ttc["details"]
    assert details["answer"] == "12" and details["scores"]["12"] > details["scores"]["7"]
    share = details["scores"]["12"] / sum(details["scores"].values())
    assert (f"winner: 12, {share:.0%} of the confidence-weighted vote (2 of 5 votes)"
            in weighted.choices[0].message.model_extra["reasoning_content"])
    voted = client.chat.completions.create(model="bon:n=5,select=vote-fake-model", messages=user(), seed=1)
    assert voted.choices[0].message.content == "It is 7."
    assert voted.ttc["details"]["scores"] == {"7": 3, "12": 2}


def test_candidates_cut_off_by_max_tokens_do_not_compete(client, fake):
    # Seeds 1 and 2 are confident but cut off mid-sum (their last number is an operand); seed 3 finished.
    def script(body: dict) -> FakeReply:
        finished = body["seed"] == 3
        return FakeReply(texts=["It is 5." if finished else "So 12 + 12"], finish_reason="stop" if finished else "length",
                         logprobs_fn=lambda c, i, t: alternatives(t, 1.0 if finished else HIGH))

    fake.script = script
    completion = client.chat.completions.create(model="bon:n=3-fake-model", messages=user(), seed=1, max_tokens=4)
    details = completion.ttc["details"]
    assert details["answer"] == "5" and completion.choices[0].message.content == "It is 5."
    assert [c["counted"] for c in details["candidates"]] == [False, False, True]
    reasoning = completion.choices[0].message.model_extra["reasoning_content"]
    assert "sample 1/3 → 12 (cut off by max_tokens: not counted" in reasoning
    counted_all = client.chat.completions.create(model="bon:n=3,count_truncated=true-fake-model", messages=user(),
                                                 seed=1, max_tokens=4)
    assert counted_all.ttc["details"]["answer"] == "12"


def test_prefix_params_vote(client, fake):
    fake.script = lambda body: FakeReply(texts=["It is 5.", "So the result: 6", "6 for sure", "7"])
    completion = client.chat.completions.create(model="bon:n=4,select=vote-fake-model", messages=user())
    assert completion.ttc["strategy"] == "bon"
    assert completion.ttc["params"]["n"] == 4 and completion.ttc["params"]["select"] == "vote"
    assert completion.ttc["details"]["answer"] == "6"
    assert "winner: 6, 2 of 4 votes" in completion.choices[0].message.model_extra["reasoning_content"]


def test_body_params(client, fake):
    fake.script = lambda body: pool_reply([("It is 5.", LOW), ("6", HIGH)])
    completion = client.chat.completions.create(
        model="fake-model", messages=user(),
        extra_body={"ttc": {"strategy": "bon", "params": {"n": 2, "select": "confidence", "top_k": 3,
                                                          "confidence": "lowest_group"}}},
    )
    assert completion.choices[0].message.content == "6"
    assert fake.chat_requests()[0].body["top_logprobs"] == 3


def test_vote_tie_is_broken_by_weighted(client, fake):
    fake.script = lambda body: pool_reply([("5", LOW), ("6", HIGH), ("5", LOW), ("6", LOW)])
    completion = client.chat.completions.create(model="bon:n=4,select=vote,confidence=lowest_group-fake-model",
                                                messages=user())
    details = completion.ttc["details"]
    assert details["answer"] == "6" and details["tie"] == {"answers": ["5", "6"], "broken_by": "weighted"}
    assert "tied: 5, 6 → weighted picks" in completion.choices[0].message.model_extra["reasoning_content"]
    first = client.chat.completions.create(model="bon:n=4,select=vote,fallback=first-fake-model", messages=user())
    assert first.ttc["details"]["answer"] == "5"


@pytest.mark.parametrize(("asked", "used"), [(0.3, 0.3), (0.0, 0.8), (None, 0.8)])
def test_temperature(client, fake, asked, used):
    kwargs = {} if asked is None else {"temperature": asked}
    completion = client.chat.completions.create(model="bon:n=2-fake-model", messages=user(), **kwargs)
    assert [r.body["temperature"] for r in fake.chat_requests()] == [used]
    assert completion.ttc["details"]["temperature"] == used


def judge_script(p_yes_by_answer: dict[str, float], samples: list[str]):
    def script(body: dict) -> FakeReply:
        if is_judge(body):
            return yes_no(p_yes_by_answer[judged_answer(body)])
        return FakeReply(texts=[samples[body["seed"] - 100]])

    return script


SAMPLES = ["The answer is 7.", "So 7.", "I get 12.", "#### 7", "It is 9", "7"]


def test_judge_pointwise_picks_the_answer_with_the_highest_p_yes(client, fake):
    fake.script = judge_script({"7": 0.3, "12": 0.9, "9": 0.6}, SAMPLES)
    completion = client.chat.completions.create(model="bon:n=6,select=judge-fake-model", messages=user(), seed=100)
    assert completion.choices[0].message.content == "I get 12."
    details = completion.ttc["details"]
    assert details["judge"]["mode"] == "pointwise" and details["judge"]["calls"] == 3
    assert details["judge"]["scores"] == pytest.approx({"7": 0.3, "12": 0.9, "9": 0.6})
    assert [c["p_yes"] for c in details["candidates"]] == pytest.approx([0.3, 0.3, 0.9, 0.3, 0.6, 0.3])
    judge_calls = [r for r in fake.chat_requests() if is_judge(r.body)]
    assert len(judge_calls) == 3 and len(fake.chat_requests()) == 9
    for call in judge_calls:
        body = call.body
        assert (body["temperature"], body["max_tokens"], body["logprobs"], body["top_logprobs"]) == (0.0, 1, True, 20)
        prompt = body["messages"][-1]["content"]
        assert prompt.startswith("Question: What is 6 times 7?\nProposed answer: ")
        assert prompt.endswith("\nIs the proposed answer correct? Answer yes or no.")
    assert sorted(judged_answer(r.body) for r in judge_calls) == ["12", "7", "9"]  # each distinct answer once
    reasoning = completion.choices[0].message.model_extra["reasoning_content"]
    assert "judge: 12 → P(yes) 0.9" in reasoning and "winner: 12, P(yes) 0.9" in reasoning


def test_judge_tie_goes_to_the_fallback(client, fake):
    fake.script = judge_script({"7": 0.8, "12": 0.8, "9": 0.1}, SAMPLES)
    completion = client.chat.completions.create(
        model="bon:n=6,select=judge,fallback=vote-fake-model", messages=user(), seed=100)
    details = completion.ttc["details"]
    assert details["answer"] == "7" and details["tie"] == {"answers": ["7", "12"], "broken_by": "vote"}
    assert completion.choices[0].message.content == "The answer is 7."


def test_judge_one_distinct_answer_needs_no_judge_call(client, fake):
    fake.script = lambda body: FakeReply(texts=["42"])
    completion = client.chat.completions.create(model="bon:n=3,select=judge-fake-model", messages=user())
    assert completion.ttc["details"]["judge"]["calls"] == 0
    assert not any(is_judge(r.body) for r in fake.chat_requests())


def test_judge_without_logprobs_parses_the_text(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities={"logprobs": False})])

    def script(body: dict) -> FakeReply:
        assert "logprobs" not in body and "top_logprobs" not in body
        if is_judge(body):
            return FakeReply(texts=["Yes" if judged_answer(body) == "12" else "No"])
        return FakeReply(texts=[SAMPLES[body["seed"] - 100]])

    fake.script = script
    with ProxyServer(config) as server:
        completion = sync_client(server).chat.completions.create(model="bon:n=6,select=judge-fake-model",
                                                                 messages=user(), seed=100)
    details = completion.ttc["details"]
    assert details["answer"] == "12" and details["fallback"] == "vote"
    assert details["judge"]["scores"] == {"7": 0.0, "12": 1.0, "9": 0.0}


def test_judge_pairwise_knockout(client, fake):
    correct = "12"

    def script(body: dict) -> FakeReply:
        content = str(body["messages"][-1]["content"])
        if body.get("max_tokens") == 1:
            first = re.search(r"Answer A: (.*)\n", content).group(1)
            second = re.search(r"Answer B: (.*)\n", content).group(1)
            p_a = 0.85 if first == correct else 0.15 if second == correct else 0.5
            pairs = sorted([("A", math.log(p_a)), ("B", math.log(1 - p_a))], key=lambda p: -p[1])
            return FakeReply(texts=[pairs[0][0]], logprobs_fn=lambda c, i, t: pairs)
        return FakeReply(texts=[SAMPLES[body["seed"] - 100]])

    fake.script = script
    completion = client.chat.completions.create(
        model="bon:n=6,select=judge,judge_mode=pairwise,fallback=vote-fake-model", messages=user(), seed=100)
    details = completion.ttc["details"]
    assert details["answer"] == "12" and completion.choices[0].message.content == "I get 12."
    judge = details["judge"]
    assert judge["mode"] == "pairwise" and judge["seeds"] == ["7", "12", "9"]  # seeded by vote
    # Round 1: 7 has a bye, 12 beats 9; round 2: 12 beats 7. Each match asked in both orders.
    assert [(m["a"], m["b"], m["winner"]) for m in judge["matches"]] == [("12", "9", "12"), ("7", "12", "12")]
    assert judge["matches"][0]["p_a"] == pytest.approx(0.85)
    assert judge["calls"] == 4 == sum(1 for r in fake.chat_requests() if r.body.get("max_tokens") == 1)
    prompts = [r.body["messages"][-1]["content"] for r in fake.chat_requests() if r.body.get("max_tokens") == 1]
    assert all(p.endswith("Which answer is correct, A or B? Answer A or B.") for p in prompts)


def test_usage_counts_every_sample_and_judge_call(client, fake):
    fake.script = judge_script({"7": 0.3, "12": 0.9, "9": 0.6}, SAMPLES)
    completion = client.chat.completions.create(model="bon:n=6,select=judge-fake-model", messages=user(), seed=100)
    requests = fake.chat_requests()
    sample_tokens = sum(len(_tokens(t)) for t in SAMPLES)
    judge_tokens = sum(1 for r in requests if is_judge(r.body))  # each judge reply is one token
    prompt_tokens = sum(FakeBackend._prompt_tokens(r.body) for r in requests)
    usage = completion.usage
    assert usage.completion_tokens == sample_tokens + judge_tokens
    assert usage.prompt_tokens == prompt_tokens
    assert usage.total_tokens == prompt_tokens + sample_tokens + judge_tokens
    # Everything but the returned sample is reasoning.
    assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens - len(_tokens("I get 12."))
    assert completion.ttc["backend_calls"] == 9


def test_usage_counts_every_choice_of_split_requests(client, fake):
    fake.script = lambda body: pool_reply([("a b c", LOW), ("d e", HIGH), ("f", LOW), ("g h i j", LOW)])
    completion = client.chat.completions.create(model="bon:n=8,confidence=lowest_group-fake-model", messages=user())
    assert [r.body["n"] for r in fake.chat_requests()] == [4, 4]
    assert completion.usage.completion_tokens == 2 * (3 + 2 + 1 + 4)
    assert completion.usage.completion_tokens_details.reasoning_tokens == 20 - 2
    assert completion.choices[0].message.content == "d e"


def test_verifier_regex_keeps_matching_candidates(client, fake):
    fake.script = lambda body: pool_reply([("It is 7.", HIGH), ("FINAL: 12", LOW), ("7", HIGH), ("FINAL: 9", 2.0)])
    completion = client.chat.completions.create(
        model="fake-model", messages=user(),
        extra_body={"ttc": {"strategy": "bon", "params": {"n": 4, "select": "verifier", "regex": r"^FINAL: \d+$",
                                                          "confidence": "lowest_group"}}},
    )
    details = completion.ttc["details"]
    assert completion.choices[0].message.content == "FINAL: 9"  # among the two that pass, the weightier
    assert details["verifier"]["passed"] == 2 and details["verifier"]["fallback_over_all"] is False
    assert [c["passed"] for c in details["candidates"]] == [False, True, False, True]
    assert details["tie"] == {"answers": ["12", "9"], "broken_by": "weighted"}
    reasoning = completion.choices[0].message.model_extra["reasoning_content"]
    assert "sample 1/4 → 7 (score" in reasoning and "fails the check: regex does not match" in reasoning
    assert "winner: 9, 2 of 4 candidates pass the check" in reasoning


def test_verifier_json_schema_and_fallback_over_all(client, fake):
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "integer"}}}
    fake.script = lambda body: FakeReply(texts=['{"answer": "seven"}', 'Sure: {"answer": 12}', "12", "no json"])
    params = {"n": 4, "select": "verifier", "json_schema": schema, "fallback": "vote"}
    completion = client.chat.completions.create(model="fake-model", messages=user(),
                                                extra_body={"ttc": {"strategy": "bon", "params": params}})
    assert completion.choices[0].message.content == 'Sure: {"answer": 12}'
    assert completion.ttc["details"]["verifier"]["passed"] == 1

    fake.script = lambda body: FakeReply(texts=["7", "no json", "7", "8"])
    completion = client.chat.completions.create(model="fake-model", messages=user(),
                                                extra_body={"ttc": {"strategy": "bon", "params": params}})
    details = completion.ttc["details"]
    assert details["verifier"] == {"passed": 0, "fallback_over_all": True, "json_schema": True}
    assert details["answer"] == "7"
    assert "no candidate passes the check; vote picks over all 4" in \
        completion.choices[0].message.model_extra["reasoning_content"]


def test_bad_select_is_a_400_listing_the_valid_ones(proxy, fake):
    response = chat(proxy, {"model": "bon:select=best-fake-model", "messages": user()})
    error = assert_openai_error(response, 400, code="invalid_strategy_params")
    for name in ("vote", "confidence", "weighted", "judge", "verifier"):
        assert f"'{name}'" in error["message"]
    assert fake.requests == []


@pytest.mark.parametrize("params", [
    {"select": "verifier"},
    {"select": "verifier", "json_schema": {"$ref": "#/defs/x"}},
    {"select": "verifier", "regex": "(unclosed"},
    {"top_k": 1},
    {"generator": "sc"},
])
def test_bad_params_are_400(proxy, fake, params):
    response = chat(proxy, {"model": "fake-model", "messages": user(), "ttc": {"strategy": "bon", "params": params}})
    assert_openai_error(response, 400, param="ttc.params", code="invalid_strategy_params")
    assert fake.requests == []


def test_confidence_without_logprobs_is_a_400_before_any_call(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities={"logprobs": False})])
    with ProxyServer(config) as server:
        for stream in (False, True):
            response = chat(server, {"model": "bon-fake-model", "messages": user(), "stream": stream})
            error = assert_openai_error(response, 400, param="ttc.params", code="backend_capability_missing")
            assert "logprobs" in error["message"] and "select=confidence" in error["message"]
        # A composition (bon over bon) is checked level by level, before any call.
        response = chat(server, {"model": "fake-model", "messages": user(),
                                 "ttc": {"strategy": "bon", "params": {"n": 2, "select": "vote"},
                                         "over": {"strategy": "bon", "params": {"n": 2}}}})
        assert_openai_error(response, 400, code="backend_capability_missing")
        assert fake.requests == []
        # Selectors that need no logprobs work there (with vote as the tie-breaker).
        fake.script = lambda body: FakeReply(texts=["1", "2", "2"])
        completion = sync_client(server).chat.completions.create(model="bon:n=3,select=vote-fake-model",
                                                                 messages=user())
    assert completion.ttc["details"]["fallback"] == "first" and completion.ttc["details"]["answer"] == "2"
    assert all("logprobs" not in r.body for r in fake.chat_requests())


def test_bon_over_sc_runs_it_n_times_with_derived_seeds(client, fake):
    # Each sc run (n=3) samples with seeds derived from (seed, its path, i): siblings differ, reruns repeat.
    seeds = {derive_seed(5, (f"sc#{run}",), k): (run, k) for run in range(3) for k in range(3)}

    def script(body: dict) -> FakeReply:
        run, k = seeds[body["seed"]]
        return FakeReply(texts=[["The answer is 4.", "It is 4", "9"][k] if run != 1 else "So 8 it is"])

    fake.script = script
    completion = client.chat.completions.create(
        model="bon:n=3,select=vote>sc:n=3-fake-model", messages=user(), seed=5)
    details = completion.ttc["details"]
    assert details["source"] == "sc:n=3" and details["samples"] == 3 and completion.ttc["over"] == "sc:n=3"
    assert [c["answer"] for c in details["candidates"]] == ["4", "8", "4"]
    assert details["answer"] == "4" and completion.choices[0].message.content == "The answer is 4."
    assert sorted(r.body["seed"] for r in fake.chat_requests()) == sorted(seeds)
    assert completion.usage.completion_tokens == 2 * (4 + 3 + 1) + 3 * 4
    assert completion.ttc["backend_calls"] == 9
    again = client.chat.completions.create(model="bon:n=3,select=vote>sc:n=3-fake-model", messages=user(), seed=5)
    assert again.choices[0].message.content == completion.choices[0].message.content


def test_composition_must_name_strategies(proxy, fake):
    response = chat(proxy, {"model": "fake-model", "messages": user(),
                            "ttc": {"strategy": "bon", "params": {"select": "vote"}, "over": {"strategy": "nope"}}})
    error = assert_openai_error(response, 400, code="unknown_strategy")
    assert "nope" in error["message"] and fake.requests == []


def test_streamed_progress(client, fake):
    fake.script = lambda body: pool_reply([("7", LOW), ("12", HIGH)])
    stream = client.chat.completions.create(model="bon:n=2,confidence=lowest_group-fake-model", messages=user(),
                                            stream=True)
    chunks = list(stream)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks
                        if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "12"
    assert reasoning.splitlines()[1:] == ["sample 1/2 → 7 (score 0.554)", "sample 2/2 → 12 (score 0.825)",
                                          "winner: 12 (sample 2, score 0.825)"]


def test_bad_request_does_not_reach_the_backend_with_the_sdk(client, fake):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="bon:n=2,select=nope-fake-model", messages=user())
    assert "verifier" in info.value.body["message"]
    assert fake.requests == []


def test_judge_calls_run_concurrently(client, fake):
    started: list[float] = []

    def script(body: dict) -> FakeReply:
        if is_judge(body):
            started.append(time.monotonic())
            reply = yes_no(0.9 if judged_answer(body) == "12" else 0.2)
            reply.delay = 0.3
            return reply
        return FakeReply(texts=[SAMPLES[body["seed"] - 100]])

    fake.script = script
    client.chat.completions.create(model="bon:n=6,select=judge-fake-model", messages=user(), seed=100)
    assert len(started) == 3 and max(started) - min(started) < 0.2  # one after another would be 0.3 s apart


def test_requirements_depend_on_params():
    from ttc_proxy.strategies.bon import BestOfN

    assert dict(BestOfN.requirements(BestOfNParams(select="vote", fallback="vote"))) == {}
    assert "select=confidence" in BestOfN.requirements(BestOfNParams())["logprobs"]
    assert "fallback=weighted" in BestOfN.requirements(BestOfNParams(select="judge", fallback="weighted"))["logprobs"]
    assert BestOfN.requirements(BestOfNParams(select="judge")) == {}  # the auto fallback adapts to the backend


def test_logprob_variant_scores_by_the_sampled_tokens_own_probability():
    likely = (tok("5", -0.1, (("5", -0.1), ("6", -0.2))), tok("6", -0.1, (("6", -0.1), ("7", -0.3))))
    unlikely = (tok("5", -2.0, (("5", -2.0), ("6", -9.0))),)
    spec = ConfidenceSpec("logprob")
    assert spec.score(likely) == pytest.approx(math.exp(-0.1))
    assert spec.score(unlikely) == pytest.approx(math.exp(-2.0))
    # DeepConf's confidence prefers the peaked-but-unlikely trace; the logprob variant does not.
    assert ConfidenceSpec("mean").score(unlikely) > ConfidenceSpec("mean").score(likely)


def test_judge_model_on_another_backend(fake):
    judge_engine = FakeBackend(slots=4, model="judge-model").start_in_thread()
    try:
        judge_engine.script = judge_script({"7": 0.2, "12": 0.95, "9": 0.4}, SAMPLES)
        fake.script = judge_script({"7": 0.99, "12": 0.0, "9": 0.0}, SAMPLES)  # would pick 7 if asked
        config = ProxyConfig.model_validate({"backends": [
            backend_entry(fake, models=["fake-model"]),
            {"name": "judge", "kind": "llama_cpp", "base_url": judge_engine.base_url, "models": ["judge-model"]},
        ]})
        with ProxyServer(config) as server, sync_client(server) as client:
            completion = client.chat.completions.create(  # a value with '-' goes in the body, not the prefix
                model="bon:n=6,select=judge-fake-model", messages=user(), seed=100,
                extra_body={"ttc": {"params": {"judge_model": "judge-model"}}})
            before = len(fake.chat_requests())
            unknown = chat(server, {"model": "fake-model", "messages": user(), "seed": 100,
                                    "ttc": {"strategy": "bon", "params": {"n": 6, "select": "judge",
                                                                          "judge_model": "nowhere"}}})
            assert len(fake.chat_requests()) == before  # refused before any sample is paid for
    finally:
        judge_engine.stop_thread()
    assert completion.choices[0].message.content == "I get 12."
    assert completion.ttc["details"]["judge"]["model"] == "judge-model"
    assert not any(is_judge(r.body) for r in fake.chat_requests())
    judge_calls = judge_engine.chat_requests()
    assert len(judge_calls) == 3 and all(r.body["model"] == "judge-model" for r in judge_calls)
    # The judge's tokens are part of the request's usage.
    assert completion.usage.completion_tokens >= 6 + 3
    assert unknown.status_code == 400 and "nowhere" in unknown.json()["error"]["message"]
    assert unknown.json()["error"]["code"] == "model_not_found"


class HttpVerifier:
    """A verifier service on loopback: passes answer "12" only, records what it was asked."""

    def __init__(self) -> None:
        import threading

        from aiohttp import web

        self.asked: list[dict] = []
        self.port = 0
        ready = threading.Event()

        async def check(request: web.Request) -> web.Response:
            payload = await request.json()
            self.asked.append(payload)
            return web.json_response({"pass": payload["answer"] == "12"})

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/check", check)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            import asyncio

            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    def stop(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_http_verifier_from_config_keeps_the_answers_it_passes(fake):
    verifier = HttpVerifier()
    try:
        fake.script = lambda body: FakeReply(texts=[SAMPLES[body["seed"] - 100]])
        config = ProxyConfig.model_validate({
            "backends": [backend_entry(fake)],
            "verifiers": {"arith": {"url": f"http://127.0.0.1:{verifier.port}/check"}},
        })
        with ProxyServer(config) as server, sync_client(server) as client:
            completion = client.chat.completions.create(
                model="bon:n=6,select=verifier,http_verifier=arith-fake-model", messages=user(), seed=100)
            before = len(fake.chat_requests())
            unknown = chat(server, {"model": "bon:n=2,select=verifier,http_verifier=nope-fake-model",
                                    "messages": user(), "seed": 100})
            assert len(fake.chat_requests()) == before  # refused before any sample is paid for
    finally:
        verifier.stop()
    assert completion.choices[0].message.content == "I get 12."
    details = completion.ttc["details"]
    assert details["verifier"]["passed"] == 1 and details["verifier"]["http_verifier"] == "arith"
    assert sorted(a["answer"] for a in verifier.asked) == ["12", "7", "9"]  # each distinct answer once
    assert verifier.asked[0]["question"] == "What is 6 times 7?"
    assert unknown.status_code == 400 and "arith" in unknown.json()["error"]["message"]
