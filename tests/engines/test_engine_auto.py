"""`auto-smollm2` end to end on the embedded llama-server through the official SDK (sync, async, streamed), with the
shipped policy file (the built-in default cascade while none is shipped), and the cascade's backend calls equal to
what its stages ran."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ttc_proxy.proxy.config import BackendConfig, EmbeddedEngine, ProxyConfig, StrategySettings

from tests.helpers import ProxyServer

pytestmark = pytest.mark.engine

POLICY = Path(__file__).resolve().parents[2] / "policies" / "smollm2.json"
SOURCE = "tuned for smollm2" if POLICY.exists() else "built-in default"
QUESTION = [{"role": "user", "content": "What is 7 times 8? Answer with just the number."}]


@pytest.fixture(scope="module")
def engine_proxy() -> Iterator[ProxyServer]:
    config = ProxyConfig(
        backends=[BackendConfig(name="local", kind="llama_cpp", embedded=EmbeddedEngine(slots=8, context=16384))],
        strategies=StrategySettings(policies={"smollm2": str(POLICY)} if POLICY.exists() else {}),
    )
    with ProxyServer(config) as server:
        yield server


def check_cascade(ttc: dict, content: str) -> None:
    details = ttc["details"]
    assert details["policy"].startswith(SOURCE)
    stages = [s for s in details["stages"] if "answer" in s]
    assert stages and content.strip() == stages[-1]["answer"]
    assert ttc["backend_calls"] == sum(s["calls"] for s in stages)  # routing adds no calls
    last = stages[-1]
    assert last["decision"] in ("stop", "last stage")
    assert all(s["decision"] == "continue" for s in stages[:-1])


def test_auto_sync(engine_proxy: ProxyServer) -> None:
    client = openai.OpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0)
    response = client.chat.completions.create(model="auto-smollm2", messages=QUESTION, max_tokens=48,
                                              temperature=0)
    content = response.choices[0].message.content
    assert content
    check_cascade(response.ttc, content)
    assert response.usage.total_tokens == sum(s["tokens"] for s in response.ttc["details"]["stages"] if "tokens" in s)


def test_auto_with_a_budget_takes_the_cheapest_point(engine_proxy: ProxyServer) -> None:
    client = openai.OpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0)
    response = client.chat.completions.create(model="auto:budget=1-smollm2", messages=QUESTION, max_tokens=48,
                                              temperature=0)
    details = response.ttc["details"]
    assert details["operating_point"]["chosen_by"] == "budget=1"
    assert len(details["stages"]) == 1 and response.ttc["backend_calls"] == details["stages"][0]["calls"]


def test_auto_async_streamed(engine_proxy: ProxyServer) -> None:
    async def run() -> tuple[str, str, dict]:
        async with openai.AsyncOpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(model="auto-smollm2", messages=QUESTION, max_tokens=48,
                                                          temperature=0, stream=True)
            content, reasoning, ttc = [], [], {}
            async for chunk in stream:
                ttc = getattr(chunk, "ttc", None) or ttc
                for choice in chunk.choices:
                    content.append(choice.delta.content or "")
                    reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            return "".join(content), "".join(reasoning), ttc

    content, reasoning, ttc = asyncio.run(run())
    assert content
    assert "stage 1/" in reasoning and f"policy: {SOURCE}" in reasoning
    check_cascade(ttc, content)
