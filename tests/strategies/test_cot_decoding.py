"""cot_decoding: the margin over the answer's tokens, the choice (single path or aggregated), and the branching from
exact first-token ids against the scripted backend (sync and streamed, through the official SDK)."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest

from ttc_proxy.strategies.answers import locate_answer
from ttc_proxy.strategies.cot_decoding import answer_margin, choose, token_margin, Path
from ttc_proxy.strategies.framework import Candidate, TokenAlternative
from ttc_proxy.tools.fakebackend import FakeReply, render_template

from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, fake_config, tok, user

LN = math.log


# ================================================================ margins and the choice


def test_margin_is_the_token_probability_minus_its_strongest_rival():
    assert token_margin(tok(" 42", LN(0.7), ((" 42", LN(0.7)), (" 24", LN(0.2)), (" 4", LN(0.1))))) == \
        pytest.approx(0.5)
    # a forced token the model did not prefer has a negative margin
    assert token_margin(tok(" 24", LN(0.2), ((" 42", LN(0.7)), (" 24", LN(0.2))))) == pytest.approx(-0.5)
    assert token_margin(tok("x", LN(0.9), (("x", LN(0.9)),))) == pytest.approx(0.9)  # no rival listed
    assert token_margin(tok("x", LN(0.9))) is None  # nothing listed


def test_answer_margin_is_measured_on_the_answer_tokens_only():
    text = "So 6 times 7 is 42."
    pieces = ["So", " 6", " times", " 7", " is", " 42", "."]
    tokens, offset = [], 0
    for piece in pieces:
        sure = LN(0.99) if piece != " 42" else LN(0.6)
        tokens.append(tok(piece, sure, ((piece, sure), ("?", LN(0.01 if piece != " 42" else 0.3))), offset))
        offset += len(piece)
    answer, margin, measured = answer_margin(Candidate(text, tokens=tuple(tokens)))
    assert (answer, measured) == ("42", 1)
    assert margin == pytest.approx(0.3)
    assert text[locate_answer(text).start:locate_answer(text).end] == "42"


def _path(answer: str, margin: float, finish: str = "stop") -> Path:
    return Path(TokenAlternative("x", 0.0), Candidate(answer, finish), answer, margin, 1, finish != "length")


def test_the_surest_finished_path_wins_or_with_aggregate_the_answer_with_the_highest_summed_margin():
    paths = [_path("41", 0.05), _path("42", 0.6), _path("41", 0.2), _path("41", 0.45), _path("7", 0.9, "length")]
    assert choose(paths, aggregate=False) == (1, {})
    chosen, sums = choose(paths, aggregate=True)
    assert chosen == 3 and sums == pytest.approx({"41": 0.7, "42": 0.6})  # the cut-off path is not counted
    assert choose([_path("7", 0.1, "length"), _path("8", 0.3, "length")], aggregate=False)[0] == 1


# ================================================================ the strategy, against the scripted backend

FIRST = [("The", LN(0.4)), ("Let", LN(0.3)), ("I", LN(0.2)), ("So", LN(0.1))]
# forced first token -> (its continuation, the answer token's alternatives)
PATHS = {
    "Let": (" us see: 6 times 7 is 42.", [(" 42.", LN(0.8)), (" 24.", LN(0.2))]),  # margin .6
    "I": (" think 41.", [(" 41.", LN(0.5)), (" 42.", LN(0.3))]),  # .2
    "So": (" it is 41.", [(" 41.", LN(0.7)), (" 42.", LN(0.25))]),  # .45
}
GREEDY = ("The answer is 41.", [(" 41.", LN(0.4)), (" 42.", LN(0.35))])  # .05


def script_for(fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:
            text, answer = PATHS[fake.vocabulary.decode([body["prompt"][-1]])]
        else:
            text, answer = GREEDY

        def logprobs(choice: int, index: int, token: str) -> list[tuple[str, float]]:
            if "prompt" not in body and index == 0:
                return FIRST
            return answer if token == answer[0][0] else [(token, LN(0.99)), ("?", LN(0.01))]

        return FakeReply(texts=[text], logprobs_fn=logprobs)

    return script


def completions(fake) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if "prompt" in r.body]


def test_each_first_token_is_continued_greedily_from_its_id_and_the_surest_answer_wins(client, fake):
    fake.script = script_for(fake)
    completion = client.chat.completions.create(model="cot_decoding:k=4-fake-model", messages=user(),
                                                max_tokens=20, temperature=0.7)
    assert completion.choices[0].message.content == "Let us see: 6 times 7 is 42."
    branches = completions(fake)
    assert len(branches) == 3  # the greedy reply is the first path: no call repeats it
    prompt = fake.vocabulary.encode(render_template(user()))
    assert sorted(b["prompt"][-1] for b in branches) == sorted(fake.vocabulary.id(t) for t in ("Let", "I", "So"))
    for branch in branches:
        assert branch["prompt"][:-1] == prompt  # the conversation's ids, then the forced first token's
        assert branch["temperature"] == 0 and branch["max_tokens"] == 19 and branch["logprobs"] == 2
    (greedy,) = [r.body for r in fake.requests if r.path.endswith("/chat/completions")]
    assert greedy["temperature"] == 0 and greedy["top_logprobs"] == 4
    details = completion.model_extra["ttc"]["details"]
    assert [(p["first_token"], p["answer"], p["margin"]) for p in details["paths"]] == \
        [("The", "41", pytest.approx(0.05)), ("Let", "42", pytest.approx(0.6)), ("I", "41", pytest.approx(0.2)),
         ("So", "41", pytest.approx(0.45))]
    assert details["chosen"] == 1 and details["answer"] == "42"


def test_aggregate_answers_with_the_highest_summed_margin(client, fake):
    fake.script = script_for(fake)
    completion = client.chat.completions.create(model="cot_decoding:k=4,aggregate=true-fake-model",
                                                messages=user(), max_tokens=20)
    assert completion.choices[0].message.content == "So it is 41."  # 41's best path
    details = completion.model_extra["ttc"]["details"]
    assert details["answer_margins"] == {"41": pytest.approx(0.7), "42": pytest.approx(0.6)}


def test_k_bounds_the_paths_and_unlikely_first_tokens_are_not_branched(client, fake):
    fake.script = script_for(fake)
    completion = client.chat.completions.create(model="cot_decoding:k=2-fake-model", messages=user())
    assert [p["first_token"] for p in completion.model_extra["ttc"]["details"]["paths"]] == ["The", "Let"]
    fake.requests.clear()
    completion = client.chat.completions.create(model="cot_decoding:min_first_probability=0.25-fake-model",
                                                messages=user())
    assert [p["first_token"] for p in completion.model_extra["ttc"]["details"]["paths"]] == ["The", "Let"]


def test_cot_decoding_streams_each_path_then_the_answer(client, fake):
    fake.script = script_for(fake)
    stream = client.chat.completions.create(model="cot_decoding:k=4-fake-model", messages=user(), stream=True)
    content, reasoning = [], []
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
    assert "".join(content) == "Let us see: 6 times 7 is 42."
    progress = "".join(reasoning)
    for line in ("path 0 from 'The': 41 margin 0.050", "from 'Let': 42 margin 0.600", "answer: 42 (path"):
        assert line in progress


def test_paths_are_in_the_trace(client, fake, proxy):
    fake.script = script_for(fake)
    completion = client.chat.completions.create(model="cot_decoding:k=4-fake-model", messages=user())
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.model_extra['ttc']['trace_id']}").json()
    notes = json.dumps(trace)
    assert '"paths"' in notes and '"first_token": "So"' in notes and '"margin": 0.45' in notes


def test_cot_decoding_needs_logprobs_and_raw_completions_and_says_so(fake_backend, fake):
    for missing in ("completions", "logprobs"):
        config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities={missing: False})])
        with ProxyServer(config) as server:
            for stream in (False, True):
                response = chat(server, {"model": "cot_decoding-fake-model", "messages": user(), "stream": stream})
                error = assert_openai_error(response, 400, code="backend_capability_missing")
                assert missing in error["message"] and "cot_decoding" in error["message"]
    assert fake.requests == []


def test_bad_cot_decoding_parameters_are_a_400(proxy):
    for model in ("cot_decoding:k=0-fake-model", "cot_decoding:k=21-fake-model",
                  "cot_decoding:aggregate=maybe-fake-model", "cot_decoding:top=3-fake-model"):
        assert_openai_error(chat(proxy, {"model": model, "messages": user()}), 400, code="invalid_strategy_params")


def test_a_failed_path_leaves_the_others(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body and fake.vocabulary.decode([body["prompt"][-1]]) == "Let":
            return FakeReply(status=500)
        return script_for(fake)(body)

    fake.script = script
    completion = client.chat.completions.create(model="cot_decoding:k=4-fake-model", messages=user())
    assert completion.choices[0].message.content == "So it is 41."
    details = completion.model_extra["ttc"]["details"]
    assert [p["first_token"] for p in details["paths"]] == ["The", "I", "So"]


def test_vllm_style_alternatives_named_by_id_are_detokenized_and_forced_by_id(client, fake):
    fake.script = script_for(fake)
    fake.vllm_logprobs = True
    try:
        completion = client.chat.completions.create(model="cot_decoding:k=4-fake-model", messages=user())
    finally:
        fake.vllm_logprobs = False
    details = completion.model_extra["ttc"]["details"]
    assert [p["first_token"] for p in details["paths"]][1:] == ["Let", "I", "So"]  # their text was asked for
    assert [r for r in fake.requests if r.path == "/detokenize"]
    assert sorted(b["prompt"][-1] for b in completions(fake)) == \
        sorted(fake.vocabulary.id(t) for t in ("Let", "I", "So"))


def test_when_the_budget_stops_the_paths_the_surest_of_those_found_answers(client, fake):
    fake.script = script_for(fake)
    completion = client.chat.completions.create(model="cot_decoding:k=4-fake-model", messages=user(),
                                                extra_body={"ttc": {"budget": {"max_calls": 2}}})
    details = completion.model_extra["ttc"]["details"]
    assert len(details["paths"]) == 2  # the greedy path and one branch
    assert completion.model_extra["ttc"]["budget_exhausted"] is True
    assert completion.choices[0].message.content == details["paths"][details["chosen"]]["text"]


def test_with_an_answer_prompt_each_path_states_its_answer_and_is_judged_on_it(client, fake):
    """A path that restates the question ("… what is 6 times 7?") is judged on the answer it states after the
    prompt, not on the 7 it copied."""
    stated = {"Let": (" 42.", LN(0.9)), "I": (" 41.", LN(0.6)), "So": (" 41.", LN(0.5)), "The": (" 41.", LN(0.55))}

    def script(body: dict[str, Any]) -> FakeReply:
        prompt = body.get("prompt")
        if prompt is not None and fake.vocabulary.decode(prompt[-4:]) == " So the answer is":
            first = next(t for t in stated if fake.vocabulary.id(t) in prompt[-40:])
            text, sure = stated[first]
            return FakeReply(texts=[text], logprobs_fn=lambda c, i, t: [(t, sure), ("?", math.log(1 - math.exp(sure)))])
        if prompt is not None and fake.vocabulary.decode([prompt[-1]]) == "Let":
            return FakeReply(texts=[" me think about what is 6 times 7"],
                             logprobs_fn=lambda c, i, t: [(t, LN(0.999)), ("?", LN(0.001))])
        return script_for(fake)(body)

    fake.script = script
    plain = client.chat.completions.create(model="cot_decoding:k=4-fake-model", messages=user())
    assert plain.model_extra["ttc"]["details"]["answer"] == "7"  # the copied number, sure to 0.998
    fake.requests.clear()
    completion = client.chat.completions.create(
        model="cot_decoding:k=4-fake-model", messages=user(),
        extra_body={"ttc": {"params": {"state_answer": True, "answer_prompt": " So the answer is",
                                       "answer_tokens": 4}}})
    assert completion.choices[0].message.content == "Let me think about what is 6 times 7 So the answer is 42."
    details = completion.model_extra["ttc"]["details"]
    assert [(p["answer"], p["margin"]) for p in details["paths"]] == \
        [("41", pytest.approx(0.1)), ("42", pytest.approx(0.8)), ("41", pytest.approx(0.2)), ("41", pytest.approx(0.0))]
    asked = [b for b in completions(fake) if b["max_tokens"] == 4]
    assert len(asked) == 4  # one answer call per path, greedy
    assert all(b["temperature"] == 0 and b["prompt"][-4:] == fake.vocabulary.encode(" So the answer is")
               for b in asked)
