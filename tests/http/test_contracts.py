"""Contract tests for engines that cannot run here (no GPU, no network): vLLM, OpenAI, `transformers serve`,
TabbyAPI, llamafile. Each is a scripted fake that answers with the engine's documented request/response shapes: how it
names itself in GET /v1/models, the largest `n` it takes, whether its usage counts every choice, how it
continues a trailing assistant message. They check that the proxy learns the right abilities for free and that
strategies adapt (one n-call, split calls, or concurrent single calls)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ttc_proxy.proxy.backends import Backend, new_client_session
from ttc_proxy.proxy.backends.capabilities import PRESETS
from ttc_proxy.proxy.config import BackendConfig, ProxyConfig
from ttc_proxy.proxy.runs.context import RunContext
from ttc_proxy.proxy.runs.state import RunState, Scope
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply
from ttc_proxy.proxy.runs.accounting import BudgetScope
from ttc_proxy.proxy.traces import Trace
from ttc_proxy.strategies import BUILTIN_STRATEGIES
from ttc_proxy.strategies.framework import Sampling

from tests.helpers import ProxyServer, assert_openai_error, chat, sse_payloads, sync_client, user


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


# llamafile (Mozilla-Ocho/llamafile 0.9.3, commit cfa861a) has two servers. Its default, `llamafile --server`, is an
# older, patched llama.cpp server (llama.cpp/server/): it names itself `llamacpp` in GET /v1/models and reports
# total_slots in /props like llama-server, but its /v1/chat/completions maps neither `n` (one choice) nor
# `logprobs`/`top_logprobs`/`n_probs` (none), closes a trailing assistant message and starts a new turn (no prefill),
# has no /v1/completions and no /apply-template, ends a stream without `data: [DONE]` and never sends a usage chunk,
# and answers a failed generation with a plain-text 500.
LLAMAFILE = {"owned_by": "llamacpp", "slots": 64, "model": "LLaMA_CPP", "echo_prefill": False,
             "absent_paths": frozenset({"/v1/completions", "/completions", "/apply-template"})}


def llamafile_reply(body: dict[str, Any]) -> FakeReply:
    return FakeReply(texts=["It is 42."], ignore_n=True, logprobs=False, send_done=False, stream_usage=False)


# Its newer server, llamafiler (`llamafile --server --v2`), names itself `llamafile`, refuses `n` other than 1 and any
# `logprobs`/`top_logprobs` field with a plain-text 400, does not continue a trailing assistant message, has
# /v1/completions for text prompts only, a /tokenize that answers token texts (not ids), and no /props,
# /detokenize or /apply-template; its streams end with [DONE] and carry usage when asked.
LLAMAFILER = {"owned_by": "llamafile", "slots": 64, "model": "Llama-3.2-1B-Instruct.Q6_K", "echo_prefill": False,
              "tokenize_pieces": True, "absent_paths": frozenset({"/props", "/detokenize", "/apply-template"})}


def llamafiler_reply(body: dict[str, Any]) -> FakeReply:
    def refused(reason: str) -> FakeReply:
        return FakeReply(status=400, raw_body=f"{reason}\r\n".encode())

    if body.get("n") not in (None, 1):
        return refused("n field must be 1 if specified")
    for field_name in ("logprobs", "top_logprobs"):
        if field_name in body and "messages" in body:
            return refused(f"OpenAI {field_name} field not supported yet")
    if "prompt" in body and not isinstance(body["prompt"], str):
        return refused("JSON missing prompt string")
    return FakeReply(texts=["It is 42."])


def llamafile_engine(params: dict[str, Any], script: Any) -> FakeBackend:
    fake = FakeBackend(**params)
    fake.script = script
    return fake.start_in_thread()


@pytest.fixture()
def llamafile() -> Iterator[FakeBackend]:
    fake = llamafile_engine(LLAMAFILE, llamafile_reply)
    yield fake
    fake.stop_thread()


@pytest.fixture()
def llamafiler() -> Iterator[FakeBackend]:
    fake = llamafile_engine(LLAMAFILER, llamafiler_reply)
    yield fake
    fake.stop_thread()


def test_llamafile_names_itself_like_llama_server_so_its_kind_is_configured(llamafile: FakeBackend) -> None:
    with serve(llamafile) as server:  # kind not set: GET /v1/models says llamacpp, and that is all it says
        assert httpx.get(server.url + "/health").json()["backends"]["engine"]["kind"] == "llama_cpp"
    with serve(llamafile, kind="llamafile") as server:
        health = httpx.get(server.url + "/health").json()["backends"]["engine"]
    assert health["kind"] == "llamafile" and health["max_n"] == 1


def test_llamafile_passes_through_streams_and_runs_sc_with_single_calls(llamafile: FakeBackend) -> None:
    with serve(llamafile, kind="llamafile") as server, sync_client(server) as client:
        passed = client.chat.completions.create(model="LLaMA_CPP", messages=user(), n=3)
        assert [c.message.content for c in passed.choices] == ["It is 42."] * 3  # n drawn by three calls
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                          json={"model": "LLaMA_CPP", "messages": user(), "stream": True,
                                "stream_options": {"include_usage": True}}) as response:
            lines = [line for line in response.iter_lines() if line]
        body = client.chat.completions.create(model="sc:n=3-LLaMA_CPP", messages=user(), max_tokens=8).model_dump()
    assert lines[-1] == "data: [DONE]"  # the engine sends none; the proxy ends the stream properly
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_payloads(lines) if c["choices"]) \
        == "It is 42."
    assert body["choices"][0]["message"]["content"] == "It is 42." and body["ttc"]["backend_calls"] == 3
    calls = llamafile.chat_requests()
    assert len(calls) == 3 + 1 + 3
    assert all(c.body.get("n", 1) == 1 and "logprobs" not in c.body for c in calls)
    assert "/props" not in llamafile.get_paths


@pytest.mark.parametrize(("model", "missing"), [("bon:n=2,select=confidence-LLaMA_CPP", "logprobs"),
                                                ("think-LLaMA_CPP", "continue")])
def test_llamafile_refuses_strategies_needing_what_it_lacks(llamafile: FakeBackend, model: str, missing: str) -> None:
    with serve(llamafile, kind="llamafile") as server:
        response = chat(server, {"model": model, "messages": user()})
    error = assert_openai_error(response, 400, code="backend_capability_missing")
    assert missing in error["message"] and "llamafile" in error["message"]
    assert llamafile.chat_requests() == []  # refused before anything was sent


def test_llamafiler_is_recognised_and_never_sent_n_or_logprobs(llamafiler: FakeBackend) -> None:
    with serve(llamafiler) as server, sync_client(server) as client:  # kind: generic, as with --backend URL
        health = httpx.get(server.url + "/health").json()["backends"]["engine"]
        assert health["kind"] == "llamafile" and health["max_n"] == 1
        model = "Llama-3.2-1B-Instruct.Q6_K"
        passed = client.chat.completions.create(model=model, messages=user(), n=2)
        stream = client.chat.completions.create(model=model, messages=user(), stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        body = client.chat.completions.create(model=f"sc:n=2-{model}", messages=user(), max_tokens=8).model_dump()
        refused = chat(server, {"model": f"deepconf-{model}", "messages": user()})
        engine_error = chat(server, {"model": model, "messages": user(), "logprobs": True})
    assert len(passed.choices) == 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "It is 42."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert body["choices"][0]["message"]["content"] == "It is 42." and body["ttc"]["backend_calls"] == 2
    assert "logprobs" in assert_openai_error(refused, 400, code="backend_capability_missing")["message"]
    # Pass-through forwards what the client sent; the engine's plain-text refusal comes back OpenAI-shaped.
    assert "logprobs field not supported" in assert_openai_error(engine_error, 400)["message"]
    assert all(c.body.get("n", 1) == 1 for c in llamafiler.chat_requests())
    assert all("logprobs" not in c.body for c in llamafiler.chat_requests()[:-1])


def probe_checks(url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    from ttc_proxy.tools import cli

    assert cli.main(["probe", url, "--json"]) == 0
    return {c["name"]: c["value"] for c in json.loads(capsys.readouterr().out)["checks"]}


MEASURED = ("max_n", "logprobs", "max_top_logprobs", "prefill", "completions", "tokenize", "render", "token_ids")


def test_probe_of_either_llamafile_server_measures_what_the_preset_assumes(
        llamafile: FakeBackend, llamafiler: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    preset = PRESETS["llamafile"]
    default_server = probe_checks(llamafile.base_url, capsys)
    v2_server = probe_checks(llamafiler.base_url, capsys)
    assert default_server["kind"] == "llama_cpp" and v2_server["kind"] == "llamafile"
    # The preset is what both servers offer; each has one thing more, which the probe (or an override) adds.
    assert {k: default_server[k] for k in MEASURED} == {**{k: getattr(preset, k) for k in MEASURED}, "tokenize": True}
    assert {k: v2_server[k] for k in MEASURED} == {**{k: getattr(preset, k) for k in MEASURED}, "completions": True}
    assert default_server["stream_done"] is False and default_server["stream_usage"] is False
    assert v2_server["stream_done"] is True and v2_server["stream_usage"] is True


def test_llamafiler_continues_a_prefix_through_text_completions_when_configured(llamafiler: FakeBackend) -> None:
    template = {"message": "<|im_start|>{role}\n{content}<|im_end|>\n", "generation_prompt": "<|im_start|>assistant\n"}
    model = "Llama-3.2-1B-Instruct.Q6_K"
    with serve(llamafiler, chat_template=template, capabilities={"completions": True}) as server:
        response = chat(server, {"model": f"think-{model}", "messages": user(), "max_tokens": 16})
    assert response.status_code == 200, response.text
    raw = [r for r in llamafiler.requests if r.path.endswith("/v1/completions")]
    assert raw and all(isinstance(r.body["prompt"], str) and "logprobs" not in r.body for r in raw)
    assert raw[0].body["prompt"].startswith("<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n")
