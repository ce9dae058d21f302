"""Issue 22's strategies on real engines at once: the embedded llama-server serving `smollm2` and vLLM (CPU) serving
the same model as `smollm2_vllm`, behind one proxy, through the official SDK (sync, async, streaming).

mcts searches over both models (every node names the one that made it); re2, moa and cot_decoding answer on each
engine, streamed and composed. Small on purpose: two engines on two cores, max_tokens <= 12.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from ttc_proxy.proxy.config import BackendConfig, EmbeddedEngine, ProxyConfig
from ttc_proxy.tools.engines import ENGINES_VENV, MODEL_FOLDER, EngineError, backend_entry, running_engine

from tests.helpers import ProxyServer, validate_schema

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is 3 times 4? Answer with just the number."}]
LOGS = Path(__file__).resolve().parents[2] / "build" / "engine-logs"
LLAMA, VLLM = "smollm2", "smollm2_vllm"


@pytest.fixture(scope="module")
def both_engines(phase_times: dict[str, float]) -> Iterator[ProxyServer]:
    if not (ENGINES_VENV / "bin" / "python").exists() or not (MODEL_FOLDER / "config.json").exists():
        message = f"vllm: {ENGINES_VENV.name} or {MODEL_FOLDER} missing; `make engines` installs them"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    LOGS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with running_engine("vllm", log=LOGS / "vllm-token-level.log") as base_url:
            phase_times["vllm + llama-server: start"] = time.monotonic() - started
            (vllm,) = yaml.safe_load(backend_entry("vllm", base_url))
            # the same model under another name, so a request can say which engine serves it
            vllm.update(models=[VLLM], model_names={VLLM: vllm["models"][0]})
            local = BackendConfig(name="local", kind="llama_cpp", embedded=EmbeddedEngine(slots=4, context=8192))
            config = ProxyConfig.model_validate({"backends": [local.model_dump(exclude_none=True), vllm]})
            tests_started = time.monotonic()
            with ProxyServer(config) as proxy:
                yield proxy
            phase_times["vllm + llama-server: tests"] = time.monotonic() - tests_started
    except EngineError as exc:
        pytest.fail(f"vllm did not start: {exc}")


@pytest.fixture()
def sdk(both_engines: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{both_engines.url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        yield client


def test_mcts_searches_over_the_model_on_llama_server_and_on_vllm(sdk: openai.OpenAI,
                                                                  both_engines: ProxyServer) -> None:
    response = sdk.chat.completions.create(
        model=f"mcts-{LLAMA}", messages=QUESTION, max_tokens=8, seed=2,
        extra_body={"ttc": {"params": {"models": [LLAMA, VLLM], "iterations": 4, "batch": 2, "max_depth": 2}}})
    body = response.model_dump(exclude_unset=True)
    validate_schema({k: v for k, v in body.items() if k != "ttc"}, "CreateChatCompletionResponse")
    assert response.choices[0].message.content
    details = response.model_extra["ttc"]["details"]
    made = [n for n in details["tree"] if n["action"] != "refused"]
    assert {n["model"] for n in made} == {LLAMA, VLLM}, made
    assert details["models"][LLAMA]["nodes"] + details["models"][VLLM]["nodes"] == len(made)
    trace = httpx.get(f"{both_engines.url}/v1/traces/{response.model_extra['ttc']['trace_id']}", timeout=30).json()
    (tree,) = [node["notes"]["tree"] for node in trace["nodes"] if "tree" in node.get("notes", {})]
    assert {n["model"] for n in tree if n["action"] != "refused"} == {LLAMA, VLLM}


def test_mcts_over_both_models_streams_which_model_made_each_node(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(model=f"mcts:models={LLAMA}+{VLLM},iterations=2,batch=2-{LLAMA}",
                                         messages=QUESTION, max_tokens=6, seed=5, stream=True)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in stream if c.choices)
    assert f"expanded by one of {LLAMA}, {VLLM}" in reasoning
    assert f" by {LLAMA})" in reasoning or f" by {VLLM})" in reasoning


@pytest.mark.parametrize("model", [LLAMA, VLLM])
def test_re2_answers_streamed_and_composed(sdk: openai.OpenAI, model: str) -> None:
    response = sdk.chat.completions.create(model=f"re2-{model}", messages=QUESTION, max_tokens=8, temperature=0)
    assert response.choices[0].message.content and response.usage.completion_tokens >= 1
    stream = sdk.chat.completions.create(model=f"re2-{model}", messages=QUESTION, max_tokens=8, temperature=0,
                                         stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == response.choices[0].message.content  # greedy: the same reply
    composed = sdk.chat.completions.create(model=f"bon:n=2,select=vote>re2-{model}", messages=QUESTION,
                                           max_tokens=8, seed=1)
    assert composed.choices[0].message.content
    assert composed.model_extra["ttc"]["backend_calls"] >= 2


@pytest.mark.parametrize("model", [LLAMA, VLLM])
def test_moa_answers_streamed_composed_and_async(sdk: openai.OpenAI, both_engines: ProxyServer, model: str) -> None:
    stream = sdk.chat.completions.create(model=f"moa:n=2-{model}", messages=QUESTION, max_tokens=10, seed=1,
                                         stream=True)
    content, reasoning = "", ""
    for chunk in stream:
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
    assert content and "aggregating 2 proposals" in reasoning
    composed = sdk.chat.completions.create(model=f"bon:n=2,select=vote>moa:n=2-{model}", messages=QUESTION,
                                           max_tokens=8, seed=1)
    assert composed.choices[0].message.content

    async def aggregated_elsewhere() -> openai.types.chat.ChatCompletion:
        other = VLLM if model == LLAMA else LLAMA
        async with openai.AsyncOpenAI(base_url=f"{both_engines.url}/v1", api_key="unused", max_retries=0,
                                      timeout=300) as client:
            return await client.chat.completions.create(model=f"moa:n=2,aggregator_model={other}-{model}",
                                                        messages=QUESTION, max_tokens=8, seed=3)

    response = asyncio.run(aggregated_elsewhere())
    assert response.choices[0].message.content
    assert response.model_extra["ttc"]["details"]["aggregated"] is True


@pytest.mark.parametrize("model", [LLAMA, VLLM])
def test_cot_decoding_branches_first_tokens_on_each_engine(sdk: openai.OpenAI, model: str) -> None:
    response = sdk.chat.completions.create(model=f"cot_decoding:k=3-{model}", messages=QUESTION, max_tokens=12)
    details = response.model_extra["ttc"]["details"]
    paths = details["paths"]
    assert len(paths) == 3 and len({p["first_token"] for p in paths}) == 3  # three different first tokens
    assert all(p["first_token"] for p in paths)  # vLLM names alternatives by id: their text was asked for
    assert response.choices[0].message.content == paths[details["chosen"]]["text"]
    assert all(-1 <= p["margin"] <= 1 for p in paths)

