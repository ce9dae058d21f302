"""entropy, online pts and pivot-guided decoding end to end: the embedded llama-server + SmolLM2, through the
official SDK (sync, async, streaming)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ttc_proxy.proxy.config import BackendConfig, EmbeddedEngine, PivotSet, ProxyConfig, StrategySettings

from tests.helpers import ProxyServer, validate_schema

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is 3 times 4? Answer with just the number."}]
CALIBRATION = Path(__file__).resolve().parents[2] / "calibration" / "smollm2.json"
# Every position is "careful" (entropy >= 0 is high, varentropy <= 100 is low): the first one gets the pause.
ALL_CAREFUL = "mapping=entropix,low_entropy=0,high_entropy=0,low_varentropy=100,high_varentropy=100"
# Every position is a fork (varentropy >= 0 is high, entropy <= 100 is not high).
ALL_FORKS = "low_entropy=0,high_entropy=100,low_varentropy=0,high_varentropy=0"


@pytest.fixture(scope="module")
def engine_proxy() -> Iterator[ProxyServer]:
    config = ProxyConfig(
        backends=[BackendConfig(name="local", kind="llama_cpp", embedded=EmbeddedEngine(slots=8, context=16384))],
        strategies=StrategySettings(calibration={"smollm2": str(CALIBRATION)}),
    )
    with ProxyServer(config) as server:
        yield server


@pytest.fixture()
def client(engine_proxy: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def test_entropy_on_calibrated_thresholds(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="entropy-smollm2", messages=QUESTION, max_tokens=24,
                                              temperature=0)
    body = response.model_dump(exclude_unset=True)
    validate_schema({k: v for k, v in body.items() if k != "ttc"}, "CreateChatCompletionResponse")
    details = response.model_extra["ttc"]["details"]
    assert details["thresholds"]["high_entropy"] == pytest.approx(2.9528)  # calibration/smollm2.json
    assert response.choices[0].message.content
    assert sum(details["regimes"].values()) >= 1
    assert response.usage.completion_tokens >= 1


def test_entropy_pause_is_cut_in_at_the_exact_offset_and_stays_in_the_content(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=f"entropy:{ALL_CAREFUL}-smollm2", messages=QUESTION,
                                              max_tokens=16, temperature=0)
    content = response.choices[0].message.content
    details = response.model_extra["ttc"]["details"]
    (pause,) = [i for i in details["interventions"] if i["action"] == "pause"]
    assert pause["offset"] == 0 and content.startswith(" Wait,")  # before the first token
    assert details["pauses_inserted"] == [" Wait,"] and details["streams"] == 2
    assert response.usage.completion_tokens <= 16


def test_entropy_branches_at_a_fork_and_streams_with_an_async_client(engine_proxy: ProxyServer) -> None:
    async def run() -> tuple[str, str, list[str]]:
        async with openai.AsyncOpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as sdk:
            stream = await sdk.chat.completions.create(
                model=f"entropy:{ALL_FORKS},branches=3,min_branch_probability=0-smollm2", messages=QUESTION,
                max_tokens=16, temperature=0, stream=True)
            content, reasoning, finish = [], [], []
            async for chunk in stream:
                if chunk.choices:
                    delta = chunk.choices[0].delta
                    content.append(delta.content or "")
                    reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
                    if chunk.choices[0].finish_reason:
                        finish.append(chunk.choices[0].finish_reason)
            return "".join(content), "".join(reasoning), finish

    content, reasoning, finish = asyncio.run(run())
    assert content and finish
    assert "fork" in reasoning and "branch ×3" in reasoning and "kept" in reasoning


def test_online_pts_searches_an_unsure_position(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="pts:threshold=1,alternatives=2,rollouts=2,rollout_tokens=8,max_searches=1-smollm2",
        messages=QUESTION, max_tokens=16, temperature=0)
    details = response.model_extra["ttc"]["details"]
    (search,) = details["searches"]
    assert len(search["alternatives"]) == 2 and search["kept"] in search["alternatives"]
    assert response.choices[0].message.content
    assert response.model_extra["ttc"]["backend_calls"] >= 3  # the stream and one rollout call per alternative


def test_pivot_guided_decoding_biases_the_engine_where_a_context_matches(engine_proxy: ProxyServer,
                                                                         client: openai.OpenAI) -> None:
    # The greedy reply's first token is the context; a pivot says the token after it should be " the".
    greedy = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=1)
    first = greedy.choices[0].logprobs.content[0].token
    backend = engine_proxy.server.config.app.state.proxy.backends["local"]
    record = {"model_id": "smollm2", "query": QUESTION[0]["content"], "pivot_context": first,
              "pivot_token": " the", "pivot_token_id": None, "prob_before": 0.2, "prob_after": 0.9,
              "prob_delta": 0.7, "is_positive": True, "task_type": "arith", "dataset_id": "test",
              "dataset_item_id": "0", "timestamp": "2026-11-29T00:00:00"}
    config = ProxyConfig(backends=[BackendConfig(name="local", kind="llama_cpp", base_url=backend.base_url)],
                         pivots={"test": PivotSet(path="(inline)", records=[record])})
    with ProxyServer(config) as server, openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                                      max_retries=0, timeout=120) as sdk:
        response = sdk.chat.completions.create(model="pts:pivots=test,search=false-smollm2", messages=QUESTION,
                                               max_tokens=8, temperature=0)
    details = response.model_extra["ttc"]["details"]
    assert details["pivots_applied"] == 1
    assert response.choices[0].message.content.startswith(first + " the")
