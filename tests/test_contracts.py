"""Contract tests for engines that cannot run here (no GPU, no network): vLLM, OpenAI, `transformers serve`,
TabbyAPI. Each is a scripted fake that answers with the engine's documented request/response shapes: how it
names itself in GET /v1/models, the largest `n` it takes, whether its usage counts every choice, how it
continues a trailing assistant message. They check that the proxy learns the right abilities for free and that
strategies adapt (one n-call, split calls, or concurrent single calls)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from proxy.backends import Backend, new_client_session
from proxy.config import BackendConfig, ProxyConfig
from proxy.runs.context import RunContext, RunState, Scope
from tools.fakebackend import FakeBackend, FakeReply
from proxy.runs.accounting import BudgetScope
from proxy.traces import Trace
from strategies import BUILTIN_STRATEGIES
from strategies.framework import Sampling

from .helpers import ProxyServer, sync_client, user


@pytest.fixture()
def engine(request: pytest.FixtureRequest) -> Iterator[FakeBackend]:
    fake = FakeBackend(**request.param).start_in_thread()
    yield fake
    fake.stop_thread()


def serve(fake: FakeBackend, **backend: Any) -> ProxyServer:
    entry = {"name": "engine", "base_url": fake.base_url, **backend}
    return ProxyServer(ProxyConfig.model_validate({"backends": [entry]}))


VLLM = {"owned_by": "vllm", "slots": 256, "usage_counts_one_choice": False, "model": "Qwen/Qwen2.5-7B-Instruct"}


@pytest.mark.parametrize("engine", [VLLM], indirect=True)
def test_vllm_is_recognised_from_its_models_listing_and_gets_one_n_request(engine: FakeBackend) -> None:
    with serve(engine) as server, sync_client(server) as client:  # kind: generic, as with --backend URL
        health = httpx.get(server.url + "/health").json()["backends"]["engine"]
        assert health["kind"] == "vllm" and health["max_n"] == 64
        body = client.chat.completions.create(model="sc:n=16-Qwen/Qwen2.5-7B-Instruct", messages=user(),
                                              max_tokens=8).model_dump()
    (call,) = engine.chat_requests()
    assert call.body["n"] == 16 and "logprobs" not in call.body  # vLLM's usage counts every choice: trusted
    assert body["usage"]["completion_tokens"] == 16 * 4 and body["ttc"]["usage_estimated"] is False
    assert "/props" not in engine.get_paths  # llama.cpp's endpoint is never asked of other engines


@pytest.mark.parametrize("engine", [VLLM], indirect=True)
async def test_vllm_prefill_uses_continue_final_message(engine: FakeBackend) -> None:
    engine.script = lambda body: FakeReply(texts=[" 42."])  # vLLM answers with the continuation only
    settings = ProxyConfig.model_validate({"backends": [{"name": "x", "base_url": "http://x"}]}).strategies
    async with new_client_session() as client:
        backend = Backend(BackendConfig(name="vllm", kind="vllm", base_url=engine.base_url), engine.base_url, client)
        state = RunState(owner="t", request_id=None, settings=settings, registry=BUILTIN_STRATEGIES,
                         trace=Trace("t"))
        scope = Scope(backend=backend, model="m", messages=user(), sampling=Sampling(None, None, 16, None, None),
                      budget=BudgetScope(settings.budget))
        context = RunContext(state, scope)
        (candidate,) = await context.continue_prefix("The answer is")
        await context.continue_prefix("The answer is", n=2)
    probe, call, *_ = engine.chat_requests()
    assert probe.body["max_tokens"] == 1  # the one-time echo probe
    assert call.body["messages"][-1] == {"role": "assistant", "content": "The answer is"}
    assert call.body["continue_final_message"] is True and call.body["add_generation_prompt"] is False
    assert candidate.text == " 42."  # no echo: the continuation is the reply
    assert len(engine.chat_requests()) == 3  # the probe ran once; the second continuation drew n=2 in one call


OPENAI = {"owned_by": "openai", "slots": 128, "usage_counts_one_choice": False, "model": "gpt-4o-mini"}


@pytest.mark.parametrize("engine", [OPENAI], indirect=True)
def test_openai_gets_its_key_from_config_and_n_split_at_its_preset_cap(engine: FakeBackend,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTRACT_OPENAI_KEY", "sk-backend")
    with serve(engine, kind="openai", api_key_env="CONTRACT_OPENAI_KEY", models=["gpt-4o-mini"]) as server:
        with sync_client(server, api_key="client-key") as client:
            client.chat.completions.create(model="sc:n=12-gpt-4o-mini", messages=user(), max_tokens=8)
            passed = client.chat.completions.create(model="gpt-4o-mini", messages=user(), n=3)
    assert len(passed.choices) == 3
    calls = engine.chat_requests()
    assert sorted(c.body.get("n", 1) for c in calls[:-1]) == [4, 8]  # preset max n 8: 12 = 8 + 4
    assert {c.headers["authorization"] for c in calls} == {"Bearer sk-backend"}
    assert "/props" not in engine.get_paths


TRANSFORMERS = {"owned_by": "huggingface", "slots": 1, "usage_counts_one_choice": False, "model": "smol"}


@pytest.mark.parametrize("engine", [TRANSFORMERS], indirect=True)
def test_transformers_serve_without_n_gets_concurrent_single_requests(engine: FakeBackend) -> None:
    engine.script = lambda body: FakeReply(texts=["It is 42."], delay=0.1)
    with serve(engine, kind="transformers") as server, sync_client(server) as client:
        body = client.chat.completions.create(model="sc:n=5-smol", messages=user(), max_tokens=8).model_dump()
    calls = engine.chat_requests()
    assert len(calls) == 5 and all("n" not in c.body for c in calls)
    assert body["ttc"]["backend_calls"] == 5
    assert engine.max_in_flight_seen > 1  # drawn concurrently, not one after another


TABBY = {"owned_by": "tabbyAPI", "slots": 1, "usage_counts_one_choice": False, "model": "exl2-model"}


@pytest.mark.parametrize("engine", [TABBY], indirect=True)
def test_unrecognised_engine_stays_generic_and_strategies_needing_logprobs_say_so(engine: FakeBackend) -> None:
    with serve(engine) as server, sync_client(server) as client:
        assert httpx.get(server.url + "/health").json()["backends"]["engine"]["kind"] == "generic"
        response = httpx.post(server.url + "/v1/chat/completions",
                              json={"model": "deepconf-exl2-model", "messages": user()})
        assert response.status_code == 400 and "logprobs" in response.json()["error"]["message"]
        # Pass-through is untouched by what the proxy knows.
        assert client.chat.completions.create(model="exl2-model", messages=user(), extra_body={"top_k": 5}).choices
    assert engine.chat_requests()[-1].body["top_k"] == 5


@pytest.mark.parametrize("engine", [VLLM], indirect=True)
def test_vllm_is_asked_for_token_ids_with_logprobs(engine: FakeBackend) -> None:
    with serve(engine) as server, sync_client(server) as client:
        client.chat.completions.create(model="bon:n=2,select=confidence-Qwen/Qwen2.5-7B-Instruct", messages=user())
        client.chat.completions.create(model="sc:n=2-Qwen/Qwen2.5-7B-Instruct", messages=user())
    with_logprobs, without = engine.chat_requests()
    assert with_logprobs.body["logprobs"] and with_logprobs.body["return_tokens_as_token_ids"] is True
    assert "return_tokens_as_token_ids" not in without.body
