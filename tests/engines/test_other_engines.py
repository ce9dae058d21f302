"""vLLM (CPU) and `transformers serve` for real, through the proxy and the official SDK (sync, async, streaming).

Each engine is started once for this module's tests and stopped before the next starts (a module-scoped
parametrised fixture: pytest runs every test of one engine, then the other's). Small on purpose: n <= 2,
max_tokens <= 16. Where an engine lacks a capability a strategy needs, the test asserts the 400 that names it.
`make engines` installs both; outside CI a machine without them skips with that instruction, under CI=true it fails.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest
import yaml

from ttc_proxy.proxy.backends.capabilities import PRESETS, Capabilities
from ttc_proxy.proxy.backends.probe import probe
from ttc_proxy.proxy.config import ProxyConfig
from ttc_proxy.tools.engines import ENGINES_VENV, MODEL_FOLDER, EngineError, backend_entry, running_engine

from tests.helpers import ProxyServer, validate_schema

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is 3 times 4? Answer with just the number."}]
LOGS = Path(__file__).resolve().parents[2] / "build" / "engine-logs"
# What the adapter assumes of each engine (its kind's preset) and `ttc-proxy probe` measures.
CONTRACT = ("logprobs", "max_top_logprobs", "prefill", "completions", "tokenize", "render", "token_ids")


@dataclass
class Engine:
    kind: str
    base_url: str
    engine_model: str  # the name the engine itself wants
    proxy: ProxyServer

    @property
    def preset(self) -> Capabilities:
        return PRESETS[self.kind]  # type: ignore[index]

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.proxy.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def async_sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.proxy.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module", params=["vllm", "transformers"])
def engine(request: pytest.FixtureRequest, phase_times: dict[str, float]) -> Iterator[Engine]:
    kind = request.param
    if not (ENGINES_VENV / "bin" / "python").exists() or not (MODEL_FOLDER / "config.json").exists():
        message = f"{kind}: {ENGINES_VENV.name} or {MODEL_FOLDER} missing; `make engines` installs them"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    LOGS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with running_engine(kind, log=LOGS / f"{kind}.log") as base_url:
            phase_times[f"{kind}: start"] = time.monotonic() - started
            (entry,) = yaml.safe_load(backend_entry(kind, base_url))
            config = ProxyConfig.model_validate({"backends": [entry]})
            engine_model = entry.get("model_names", {}).get("smollm2", "smollm2")
            tests_started = time.monotonic()
            with ProxyServer(config) as proxy:
                yield Engine(kind, base_url, engine_model, proxy)
            phase_times[f"{kind}: tests"] = time.monotonic() - tests_started
    except EngineError as exc:
        pytest.fail(f"{kind} did not start: {exc}")


def test_probe_measures_what_the_adapter_assumes(engine: Engine) -> None:
    async def measure() -> dict[str, object]:
        async with aiohttp.ClientSession() as client:
            report = await probe(client, engine.base_url, engine.engine_model)
        return {check.name: check.value for check in report.checks}

    checks = asyncio.run(measure())
    assert checks["chat"] is True
    for capability in CONTRACT:
        assert checks[capability] == getattr(engine.preset, capability), capability
    # The largest n: vLLM takes every n the probe tries (its preset, 64, is what the probe tries last);
    # transformers serve ignores n and answers one choice.
    assert checks["max_n"] == engine.preset.max_n
    if engine.kind == "transformers":
        assert checks["stream_done"] is False  # it ends streams without [DONE]: the proxy adds it (below)
        assert checks["stop_kept"] is True  # and leaves the stop string in: the proxy cuts it (below)


def test_pass_through_sync(engine: Engine) -> None:
    with engine.sdk() as sdk:
        response = sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0)
    assert response.model == "smollm2"  # the engine's own name for it (a folder path, for transformers) is hidden
    assert response.choices[0].message.content
    assert response.usage is not None and response.usage.completion_tokens > 0


def test_pass_through_n_gives_n_choices(engine: Engine) -> None:
    """transformers serve ignores `n`: the proxy asks it for each choice, at the same time."""
    with engine.sdk() as sdk:
        response = sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, temperature=1.0,
                                               n=2, seed=3)
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.message.content for c in response.choices)


def test_seeded_samples_repeat_and_differ(engine: Engine) -> None:
    """Sampling really samples (transformers serve decodes greedily unless the model's generation config says
    do_sample: the converted folder does) and a seed repeats its sample."""
    with engine.sdk() as sdk:
        def sample(seed: int) -> str:
            return sdk.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Tell me a "
                                               "word."}], max_tokens=12, temperature=1.0, seed=seed
                                               ).choices[0].message.content or ""
        first, again, others = sample(1), sample(1), {sample(seed) for seed in (2, 3, 4)}
    assert first == again
    assert others - {first}  # three other seeds: not all the same reply as the first


def test_pass_through_async(engine: Engine) -> None:
    async def ask() -> list[str]:
        async with engine.async_sdk() as sdk:
            responses = await asyncio.gather(*(
                sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=6, temperature=0)
                for _ in range(2)))
        return [r.choices[0].message.content or "" for r in responses]

    first, second = asyncio.run(ask())
    assert first and first == second  # greedy twice: the same reply


def test_pass_through_streaming_ends_with_done(engine: Engine) -> None:
    with engine.sdk() as sdk:
        stream = sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # token by token
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with httpx.stream("POST", f"{engine.proxy.url}/v1/chat/completions", timeout=300,
                      json={"model": "smollm2", "messages": QUESTION, "max_tokens": 4, "stream": True}) as raw:
        events = [line for line in raw.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_stop_string_is_not_in_the_content(engine: Engine) -> None:
    with engine.sdk() as sdk:
        free = sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0)
        text = free.choices[0].message.content or ""
        stop = text.split()[1] if len(text.split()) > 1 else text[-1]
        cut = sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0,
                                          stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_fields_the_engine_refuses_are_a_400(engine: Engine) -> None:
    with engine.sdk() as sdk:
        if engine.preset.engine_fields is not None and "top_k" not in engine.preset.engine_fields:
            with pytest.raises(openai.BadRequestError) as caught:  # transformers answers 422 {"detail"}: normalised
                sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2,
                                            extra_body={"top_k": 5})
            assert "top_k" in caught.value.message
            with pytest.raises(openai.BadRequestError) as refused:  # a strategy checks before calling
                sdk.chat.completions.create(model="sc:n=2-smollm2", messages=QUESTION, max_tokens=2,
                                            extra_body={"top_k": 5})
            assert "top_k" in refused.value.message
        else:
            response = sdk.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2,
                                                   extra_body={"top_k": 5})
            assert response.choices[0].message.content is not None


@pytest.mark.parametrize("model, needs", [
    ("bon:n=2,select=confidence,confidence=logprob-smollm2", {"logprobs"}),  # best-of-n
    ("sc:n=2-smollm2", set()),  # self-consistency
    ("mcts:iterations=1,batch=2-smollm2", {"logprobs"}),  # tree search, scored by logprobs
    ("mcts:iterations=1,batch=2,score=agreement-smollm2", set()),  # tree search, scored by agreement
    ("deepthink:k=2,plan=false-smollm2", set()),  # deep think
    ("entropy-smollm2", {"logprobs", "tokenize"}),  # entropy-based sampling
    ("pts:alternatives=2,rollouts=1,rollout_tokens=8-smollm2", {"logprobs", "tokenize"}),  # pivotal-token search
])
def test_one_strategy_per_family(engine: Engine, model: str, needs: set[str]) -> None:
    with engine.sdk() as sdk:
        if not all(engine.preset.supports(c) for c in needs):  # the 400 that names what is missing
            with pytest.raises(openai.BadRequestError) as caught:
                sdk.chat.completions.create(model=model, messages=QUESTION, max_tokens=16)
            assert caught.value.code == "backend_capability_missing"
            assert "logprobs" in caught.value.message
            return
        response = sdk.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=0.7)
    body = response.model_dump(exclude_unset=True)
    validate_schema({k: v for k, v in body.items() if k != "ttc"}, "CreateChatCompletionResponse")
    assert response.model == model
    assert response.choices[0].message.content
    assert response.usage.completion_tokens > 0 and response.model_extra["ttc"]["backend_calls"] >= 1


def test_strategy_streams_through_the_async_sdk(engine: Engine) -> None:
    async def stream() -> list[openai.types.chat.ChatCompletionChunk]:
        async with engine.async_sdk() as sdk:
            chunks = await sdk.chat.completions.create(model="sc:n=2-smollm2", messages=QUESTION, max_tokens=12,
                                                       stream=True, stream_options={"include_usage": True})
            return [chunk async for chunk in chunks]

    chunks = asyncio.run(stream())
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
