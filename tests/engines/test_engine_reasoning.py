"""llama-server's own reasoning output, for real (issue 21). SmolLM2-135M does not think by itself; with a ChatML
template whose generation prompt opens `<think>` (examples/chatml-think.jinja), `--reasoning-format deepseek`, and
`--reasoning-budget 8` (llama-server closes the thinking after 8 tokens: this model never writes `</think>`
itself), the embedded llama-server sends each reply's thinking as `reasoning_content`, apart from `content`.
Through the official SDK: the engine itself, `sc` and `bon` voting on the content, the thinking shown as progress
(streamed too), its tokens counted as reasoning, and `think` continuing the thinking the template opened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ttc_proxy.proxy.config import BackendConfig, EmbeddedEngine, ProxyConfig
from ttc_proxy.strategies.answers import extract_answer

from tests.helpers import ProxyServer

pytestmark = pytest.mark.engine

TEMPLATE = Path(__file__).resolve().parents[2] / "examples" / "chatml-think.jinja"
THINKING_FLAGS = ["--jinja", "--chat-template-file", str(TEMPLATE), "--reasoning-format", "deepseek",
                  "--reasoning-budget", "8"]
# A question SmolLM2 answers past its 8 thinking tokens (to "What is 12 + 30?" it often ends inside them).
QUESTION = [{"role": "user", "content": "Tell me about Paris in one sentence."}]


@pytest.fixture(scope="module")
def thinking_proxy() -> Iterator[ProxyServer]:
    engine = EmbeddedEngine(slots=4, context=4096, extra_args=THINKING_FLAGS)
    with ProxyServer(ProxyConfig(backends=[BackendConfig(name="local", kind="llama_cpp", embedded=engine)])) as server:
        yield server


@pytest.fixture()
def client(thinking_proxy: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=thinking_proxy.url + "/v1", api_key="x", max_retries=0, timeout=300) as sdk:
        yield sdk


def test_the_engine_sends_the_thinking_apart(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=64, temperature=0)
    message = completion.choices[0].message
    thinking = message.model_extra.get("reasoning_content")
    print(f"\nengine: thinking {thinking!r}, content {message.content!r}")
    # (the model often starts its answer by repeating its thinking's words: what matters is where each arrives)
    assert thinking and "<think>" not in thinking
    assert message.content and "think>" not in message.content


@pytest.mark.parametrize("model", ["sc:n=3-smollm2", "bon:n=3,select=vote-smollm2"])
def test_votes_are_on_the_content_and_the_thinking_is_progress(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=64, temperature=0.7,
                                                seed=5)
    message = completion.choices[0].message
    details = completion.model_extra["ttc"]["details"]
    print(f"\n{model}: content {message.content!r}; votes {details.get('votes') or details.get('scores')}")
    assert details["answer"] == extract_answer(message.content)  # the winner's answer is read off its content
    assert message.content and all(c["answer"] for c in details["candidates"])  # they voted on answers, not ""
    progress = message.model_extra["reasoning_content"]
    assert "the chosen reply's thinking: " in progress
    thinking = progress.split("the chosen reply's thinking: ", 1)[1].strip()
    assert thinking and "think>" not in message.content


def test_the_chosen_reply_s_thinking_tokens_are_reasoning_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="bon:n=2,select=vote-smollm2", messages=QUESTION,
                                                max_tokens=64, temperature=0.7, seed=5)
    details = completion.model_extra["ttc"]["details"]
    winner = details["candidates"][details["winner"]["index"]]
    usage = completion.usage
    # the other sample is reasoning, and so is part of the winner: its thinking
    assert usage.completion_tokens_details.reasoning_tokens > usage.completion_tokens - winner["completion_tokens"]


def test_streamed_the_thinking_arrives_as_progress(client: openai.OpenAI) -> None:
    content, progress = "", ""
    for chunk in client.chat.completions.create(model="sc:n=2-smollm2", messages=QUESTION, max_tokens=64,
                                                temperature=0.7, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            progress += (choice.delta.model_extra or {}).get("reasoning_content") or ""
    print(f"\nstreamed: content {content!r}")
    assert "the chosen reply's thinking: " in progress
    assert "<think>" not in content  # (empty when the model ended inside its thinking budget)


async def test_the_engine_streams_its_thinking_apart_async(thinking_proxy: ProxyServer) -> None:
    async with openai.AsyncOpenAI(base_url=thinking_proxy.url + "/v1", api_key="x", max_retries=0,
                                  timeout=300) as sdk:
        stream = await sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=48,
                                                   temperature=0, stream=True)
        content, thinking = "", ""
        async for chunk in stream:
            for choice in chunk.choices:
                content += choice.delta.content or ""
                thinking += (choice.delta.model_extra or {}).get("reasoning_content") or ""
    assert thinking and "<think>" not in content


def test_think_continues_the_thinking_the_template_opened(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="think:min_thinking_tokens=8,max_thinking_tokens=24,answer_tokens=12-smollm2", messages=QUESTION)
    details = completion.model_extra["ttc"]["details"]
    print(f"\nthink: {details}; content {completion.choices[0].message.content!r}")
    assert details["continued_model_thinking"] is True
    assert "<think>" not in completion.choices[0].message.content
