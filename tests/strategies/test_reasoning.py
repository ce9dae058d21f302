"""Reasoning-aware answers (issue 21): one place (strategies.answers.split_thinking) decides a reply's answer, its
content without thinking, whether the engine sent the thinking apart (`reasoning_content`) or inline
(`<think>...</think>`). Voting, scoring, grading and answer extraction read the answer only; the thinking is
reasoning (progress, reasoning_tokens); `think` continues a model's own opened thinking instead of nesting tags."""

from __future__ import annotations

import pytest

from ttc_proxy.strategies.answers import answer_text, extract_answer, split_thinking
from ttc_proxy.strategies.framework import Candidate
from ttc_proxy.strategies.scoring import AgreementScorer, VerifierScorer
from ttc_proxy.tools.eval.checks import check_reply
from ttc_proxy.tools.fakebackend import FakeReply

from tests.helpers import user


@pytest.mark.parametrize("content, thinking, answer", [
    ("<think>6 x 7 = 48?</think>The answer is 42.", "6 x 7 = 48?", "The answer is 42."),
    ("<think>\nhmm\n</think>\n\n42", "hmm", "42"),
    ("the template opened it; 48</think> 42", "the template opened it; 48", "42"),  # Qwen3 / R1 templates
    ("<think>still thinking about 48", "still thinking about 48", ""),  # cut off while thinking: no answer yet
    ("No thinking, 42.", "", "No thinking, 42."),
    ("Answer 42, and <think> is just a word here", "", "Answer 42, and <think> is just a word here"),
])
def test_split_thinking(content, thinking, answer):
    assert split_thinking(content) == (thinking, answer)
    assert answer_text(content) == answer


def test_extraction_grading_and_scoring_ignore_the_thinking():
    reply = "<think>Maybe the answer is 48. \\boxed{48}</think>So it is \\boxed{42}."
    assert extract_answer(reply) == "42"
    assert check_reply("number", reply, "42").correct and not check_reply("number", reply, "48").correct
    assert check_reply("boxed", reply, "42").correct
    assert check_reply("exact", "<think>no</think>Paris", "paris").correct
    agree = [Candidate(text="<think>48</think>42"), Candidate(text="<think>7</think>It is 42")]
    assert AgreementScorer().score_now(agree[0], agree) == 1.0


async def test_the_verifier_checks_the_answer_not_the_thinking():
    scorer = VerifierScorer(regex=r"^\d+$")
    assert await scorer.score(Candidate(text="<think>let me see</think>42"), []) == 1.0


# ---------------------------------------------------------------- the vote follows the answer, over HTTP


def by_seed(replies):
    return lambda body: replies[int(body.get("seed", 100)) - 100]


# Thinking says 48 in four of five replies; the answers say 42 in three. The vote must follow the answers.
THOUGHTS = ["It is 48.", "48, surely.", "I get 48.", "48", "Hmm, 42."]
ANSWERS = ["The answer is 42.", "The answer is 7.", "The answer is 42.", "The answer is 7.", "The answer is 42."]


def test_vote_follows_the_answer_when_the_engine_sends_thinking_apart(client, fake):
    fake.script = by_seed({i: FakeReply(texts=[a], reasoning=[t]) for i, (t, a) in enumerate(zip(THOUGHTS, ANSWERS))})
    completion = client.chat.completions.create(model="sc:n=5-fake-model", messages=user(), seed=100)
    assert completion.choices[0].message.content == "The answer is 42."
    ttc = completion.model_extra["ttc"]["details"]
    assert ttc["votes"] == {"42": 3.0, "7": 2.0}
    assert "the chosen reply's thinking: It is 48." in completion.choices[0].message.reasoning_content


def test_vote_follows_the_answer_when_the_thinking_is_inline(client, fake):
    fake.script = by_seed({i: FakeReply(texts=[f"<think>{t}</think>{a}"]) for i, (t, a) in
                           enumerate(zip(THOUGHTS, ANSWERS))})
    completion = client.chat.completions.create(model="bon:n=5,select=vote-fake-model", messages=user(), seed=100)
    message = completion.choices[0].message
    assert message.content == "The answer is 42."  # the thinking is not part of the answer
    assert "<think>" not in message.content
    assert "the chosen reply's thinking: It is 48." in message.reasoning_content
    # The returned reply's thinking counts as reasoning: "<think>It is 48.</think>The answer is 42." is 6 tokens
    # by the fake's count, of which the answer is a share by characters.
    details = completion.usage.completion_tokens_details
    winner_tokens = completion.model_extra["ttc"]["details"]["candidates"][0]["completion_tokens"]
    assert details.reasoning_tokens > completion.usage.completion_tokens - winner_tokens


def test_the_answer_streams_without_the_thinking(client, fake):
    fake.script = lambda body: FakeReply(texts=["<think>48?</think>The answer is 42."])
    chunks = list(client.chat.completions.create(model="sc:n=2-fake-model", messages=user(), stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == "The answer is 42."
    assert "the chosen reply's thinking: 48?" in reasoning


# ---------------------------------------------------------------- think continues a model's own thinking


def test_think_continues_the_thinking_the_template_opened(client, fake):
    fake.generation_prompt_suffix = "<think>\n"

    def script(body):
        prompt = body.get("prompt", "")
        if isinstance(prompt, str) and prompt.endswith("Final answer:"):
            return FakeReply(texts=[" 42"])
        return FakeReply(texts=["six sevens are 42"])

    fake.script = script
    completion = client.chat.completions.create(
        model="think:min_thinking_tokens=1,max_thinking_tokens=50-fake-model", messages=user())
    prompts = [r.body["prompt"] for r in fake.requests if r.path.endswith("/completions")
               and not r.path.endswith("chat/completions")]
    assert prompts[0].endswith("<|assistant|><think>\n")  # the template's own open tag, no second one
    assert all(p.count("<think>") == 1 for p in prompts)
    assert prompts[-1].endswith("<think>\nsix sevens are 42\n</think>\nFinal answer:")
    assert completion.choices[0].message.content == "42"
    assert completion.model_extra["ttc"]["details"]["continued_model_thinking"] is True


def test_cot_on_a_thinking_model_returns_the_output_tokens_only(client, fake):
    fake.script = lambda body: FakeReply(texts=["<think>hmm 48</think><thinking>6 sevens</thinking> <output>It is 42"
                                                "</output>"])
    completion = client.chat.completions.create(model="cot-fake-model", messages=user(), logprobs=True)
    assert completion.choices[0].message.content == "It is 42"
    tokens = "".join(t.token for t in completion.choices[0].logprobs.content)
    assert "48" not in tokens and "sevens" not in tokens and "42" in tokens
