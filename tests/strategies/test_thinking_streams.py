"""Inline `<think>` inside a strategy's own token stream (issue 21): whatever path an engine's tokens take to the
client (entropy's and pts's streamed replies, think's streamed answer, a chosen candidate's text), the thinking
block at the reply's start reaches the client as reasoning (`reasoning_content` deltas while streaming, a progress
line otherwise), never in the answer's content, and counts in `reasoning_tokens`; a tag split across stream chunks
too. The split is ThinkingSplitter (strategies.answers) on what a strategy emits, and with_thinking_apart on the
answer it returns."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from ttc_proxy.strategies.answers import ThinkingSplitter, split_thinking
from ttc_proxy.strategies.framework import Candidate, Token, with_thinking_apart
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import user

REPLY = "<think> 6*7=48? </think> The answer is 42."  # the fake's tokens: '<think>', ' 6*7=48?', ' </think>', ...
ANSWER = "The answer is 42."
# Strategies that stream an engine's tokens to the client as they come.
STREAMING = ["entropy-fake-model", "pts-fake-model", "think:min_thinking_tokens=1,max_thinking_tokens=20-fake-model"]
# Strategies whose answer is a chosen or rebuilt candidate's text.
CHOSEN = ["deepconf-fake-model", "cot_decoding-fake-model", "mcts-fake-model", "re2-fake-model"]


def streamed(client: openai.OpenAI, model: str) -> tuple[str, str, Any]:
    content, reasoning, usage = "", "", None
    for chunk in client.chat.completions.create(model=model, messages=user(), stream=True,
                                                stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
    return content, reasoning, usage


# ---------------------------------------------------------------- the splitter (pure)


@pytest.mark.parametrize("pieces, thinking, answer", [
    (["<think>6*7=48?</think>The answer is 42."], "6*7=48?", ANSWER),
    (["<th", "ink>6*7", "=48?</", "think", ">", " The answer", " is 42."], "6*7=48?", ANSWER),
    (["  \n<", "think>a", "</think>\n", "\n", "42"], "a", "42"),
    (["No tags, 42."], "", "No tags, 42."),
    (["<", "b>bold</b>"], "", "<b>bold</b>"),
    (["<think>cut off while thinking"], "cut off while thinking", ""),
])
def test_the_splitter_releases_thinking_and_answer_as_split_thinking_reads_the_whole(pieces: list[str], thinking: str,
                                                                                     answer: str) -> None:
    splitter = ThinkingSplitter()
    released = [splitter.feed(piece) for piece in pieces]
    assert "".join(t for t, _ in released).strip() == thinking
    assert "".join(a for _, a in released) == answer
    assert split_thinking("".join(pieces)) == (thinking, answer)


def test_a_tag_cut_at_the_end_is_held_not_released() -> None:
    splitter = ThinkingSplitter()
    assert splitter.feed("<think>a</th") == ("a", "")
    assert splitter.feed("ink>b") == ("", "b")


def test_with_thinking_apart_keeps_the_answer_s_tokens_and_counts_the_thinking_s() -> None:
    pieces = ["<think>", " 48?", " </think>", " 42"]
    offsets = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    tokens = tuple(Token(p, -0.1, offset=o) for p, o in zip(pieces, offsets))
    apart = with_thinking_apart(Candidate("".join(pieces), completion_tokens=4, tokens=tokens))
    assert apart.text == "42" and apart.reasoning == "48?"
    assert [t.text for t in apart.answer_tokens or ()] == [" 42"]
    assert apart.thinking_tokens == 3  # ' 42' starts at a space before the answer: it is still the answer's
    plain = Candidate("42", completion_tokens=1)
    assert with_thinking_apart(plain) is plain


# ---------------------------------------------------------------- through the SDK


@pytest.mark.parametrize("model", STREAMING + CHOSEN)
def test_streamed_the_thinking_is_reasoning_and_the_content_is_the_answer(client: openai.OpenAI, fake: FakeBackend,
                                                                         model: str) -> None:
    fake.script = lambda body: FakeReply(texts=[REPLY])
    content, reasoning, usage = streamed(client, model)
    assert content == ANSWER
    assert "6*7=48?" in reasoning and "think>" not in content
    assert usage.completion_tokens_details.reasoning_tokens >= 3  # at least '<think>', ' 6*7=48?', ' </think>'


@pytest.mark.parametrize("model", STREAMING + CHOSEN)
def test_not_streamed_the_thinking_is_a_progress_line(client: openai.OpenAI, fake: FakeBackend, model: str) -> None:
    fake.script = lambda body: FakeReply(texts=[REPLY])
    completion = client.chat.completions.create(model=model, messages=user())
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert "6*7=48?" in message.reasoning_content


@pytest.mark.parametrize("model", ["entropy-fake-model", "pts-fake-model"])
def test_the_returned_reply_s_thinking_tokens_are_reasoning_tokens(client: openai.OpenAI, fake: FakeBackend,
                                                                   model: str) -> None:
    fake.script = lambda body: FakeReply(texts=[REPLY], token_logprob=-0.01)
    completion = client.chat.completions.create(model=model, messages=user(), logprobs=True)
    # Of the reply's 7 tokens '<think>', ' 6*7=48?' and ' </think>' are its thinking, ' The answer is 42.' its 4
    # answer tokens; everything else spent (entropy's branches) is reasoning too.
    usage = completion.usage
    assert usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens - 4
    # the returned logprobs are the answer's tokens
    assert [t.token for t in completion.choices[0].logprobs.content] == [" The", " answer", " is", " 42."]
    assert "the chosen reply's thinking: 6*7=48?" in completion.choices[0].message.reasoning_content


def chunks(pieces: list[str]) -> bytes:
    """A stream whose content deltas are exactly these pieces."""
    events = [{"id": "x", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces]
    events.append({"id": "x", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


SPLIT = [" <th", "ink>6*7", "=48?</", "think", ">", "The answer", " is 42."]


@pytest.mark.parametrize("model", STREAMING)
def test_tags_split_across_stream_chunks(client: openai.OpenAI, fake: FakeBackend, model: str) -> None:
    fake.script = lambda body: FakeReply(raw_stream=chunks(SPLIT)) if body.get("stream") \
        else FakeReply(texts=["thinking it over"])
    content, reasoning, _ = streamed(client, model)
    assert content == ANSWER
    assert "6*7=48?" in reasoning and "think>" not in reasoning
    assert "the chosen reply's thinking" not in reasoning  # it streamed live as it came, not again at the end
    completion = client.chat.completions.create(model=model, messages=user())
    assert completion.choices[0].message.content == ANSWER


def test_a_reply_without_thinking_streams_unchanged(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = lambda body: FakeReply(raw_stream=chunks(["<", "b>42</b> is", " it."]))
    content, reasoning, _ = streamed(client, "entropy-fake-model")
    assert content == "<b>42</b> is it."
    assert "the chosen reply's thinking" not in reasoning
