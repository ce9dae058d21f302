"""End to end against the real engine: the proxy's embedded llama-server + SmolLM2, through the official SDK."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import openai
import pytest

from ttc_proxy.proxy.config import BackendConfig, EmbeddedEngine, ProxyConfig

from tests.helpers import ProxyServer, validate_schema

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is 3 times 4? Answer with just the number."}]


@pytest.fixture(scope="module")
def engine_proxy() -> Iterator[ProxyServer]:
    config = ProxyConfig(
        backends=[BackendConfig(name="local", kind="llama_cpp", embedded=EmbeddedEngine(slots=8, context=16384))]
    )
    with ProxyServer(config) as server:
        yield server


@pytest.fixture()
def client(engine_proxy: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0)


def test_capabilities_are_learned_from_the_engine(engine_proxy: ProxyServer) -> None:
    health = httpx.get(f"{engine_proxy.url}/health").json()
    assert health["backends"]["local"]["kind"] == "llama_cpp"
    assert health["backends"]["local"]["max_n"] == 8  # from llama-server's /props total_slots


def test_pass_through_sync_sdk(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0)
    # Pass-through bodies are the engine's own (strict schema checks apply to what the proxy generates).
    body = response.model_dump(exclude_unset=True)
    assert {"id", "object", "created", "model", "choices", "usage"} <= set(body)
    assert response.model == "smollm2"
    assert response.choices[0].message.content
    assert response.usage is not None and response.usage.completion_tokens > 0


def test_pass_through_keeps_turns_and_n_and_logprobs(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say A."},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Say B."},
    ]
    response = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=4, n=3, logprobs=True, top_logprobs=2, temperature=0.8,
        extra_body={"top_k": 20, "cache_prompt": False},
    )
    assert len(response.choices) == 3
    entries = response.choices[0].logprobs.content
    assert entries and len(entries[0].top_logprobs) == 2


def test_n_above_the_engines_slots_is_drawn_by_two_calls(client: openai.OpenAI) -> None:
    """llama-server refuses n above its 8 slots: the proxy draws n=9 as 8 + 1 at once, one reply."""
    response = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2, n=9,
                                              temperature=1.0)
    assert [c.index for c in response.choices] == list(range(9))
    assert all(c.message.content is not None for c in response.choices)


def test_pass_through_streaming_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) >= 2  # token by token, not one buffered blob
    assert "".join(pieces).strip()


def test_completions_pass_through(engine_proxy: ProxyServer) -> None:
    client = openai.OpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0)
    response = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert response.choices[0].text


def test_self_consistency_async_sdk_counts_every_sample(engine_proxy: ProxyServer) -> None:
    async def ask() -> openai.types.chat.ChatCompletion:
        # Closed inside the loop: a client left to the garbage collector closes its sockets on a dead loop.
        async with openai.AsyncOpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0) as client:
            return await client.chat.completions.create(model="sc:n=6-smollm2", messages=QUESTION, max_tokens=16)

    response = asyncio.run(ask())
    body = response.model_dump(exclude_unset=True)
    validate_schema(body, "CreateChatCompletionResponse")
    ttc = body["ttc"]
    assert ttc["strategy"] == "sc" and ttc["params"]["n"] == 6
    details = ttc["details"]
    # Every sample either votes or is reported as cut off by max_tokens.
    assert details["samples"] == 6 and sum(details["votes"].values()) + details["not_counted"] == 6
    # One call draws all 6 (slots=8); llama-server's own usage would count one choice only.
    assert ttc["backend_calls"] == 1
    usage = body["usage"]
    answer_tokens = usage["completion_tokens"] - usage["completion_tokens_details"]["reasoning_tokens"]
    assert usage["completion_tokens"] > answer_tokens > 0
    assert response.choices[0].message.content


def test_self_consistency_streams_progress_then_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sc:n=4-smollm2", messages=QUESTION, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, usage, ttc = [], [], None, None
    for chunk in stream:
        validate_schema(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        if chunk.usage is not None:
            usage = chunk.usage
        extra = chunk.model_extra or {}
        ttc = extra.get("ttc", ttc)
        for choice in chunk.choices:
            delta_extra = choice.delta.model_extra or {}
            if delta_extra.get("reasoning_content"):
                assert not content, "progress comes before the answer"
                reasoning.append(delta_extra["reasoning_content"])
            if choice.delta.content:
                content.append(choice.delta.content)
    assert any("winner" in line for line in reasoning)
    assert "".join(content)
    assert usage is not None and usage.completion_tokens > 0
    assert ttc is not None and ttc["strategy"] == "sc"


def test_seeded_self_consistency_is_reproducible(client: openai.OpenAI) -> None:
    def ask() -> str:
        response = client.chat.completions.create(
            model="sc:n=3-smollm2", messages=QUESTION, max_tokens=12, seed=1234, temperature=0.9
        )
        return response.model_extra["ttc"]["trace_id"], response.choices[0].message.content

    (trace_a, first), (trace_b, second) = ask(), ask()
    assert first == second
    assert trace_a != trace_b


@pytest.mark.parametrize("select", ["vote", "confidence", "weighted", "judge"])
def test_best_of_n_selectors_on_the_engine(client: openai.OpenAI, select: str) -> None:
    response = client.chat.completions.create(
        model=f"bon:n=4,select={select}-smollm2", messages=QUESTION, max_tokens=16, seed=7
    )
    body = response.model_dump(exclude_unset=True)
    validate_schema(body, "CreateChatCompletionResponse")
    details = body["ttc"]["details"]
    assert details["selector"] == select
    assert len(details["candidates"]) == 4
    assert body["usage"]["completion_tokens"] >= len(details["candidates"])
    assert response.choices[0].message.content


def test_deepconf_streams_traces_with_logprobs_from_the_engine(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="deepconf:n=6,warmup=3,window=4-smollm2", messages=QUESTION, max_tokens=24, seed=11
    )
    body = response.model_dump(exclude_unset=True)
    validate_schema(body, "CreateChatCompletionResponse")
    details = body["ttc"]["details"]
    assert details["traces"] == 6
    assert all(c["confidence"] is not None or c["pruned_at"] is not None for c in details["candidates"])
    assert details["survivors"] + details["pruned"] <= 6
    assert body["ttc"]["backend_calls"] == 6  # 3 warm-up samples (seeded: one call each) + 3 streamed traces


# ---- framework v2 and the new strategies on the real engine ----


def _engine_backend(engine_proxy: ProxyServer):
    return engine_proxy.server.config.app.state.proxy.backends["local"]


def test_tokens_prefixes_and_raw_prompts_on_the_engine(engine_proxy: ProxyServer) -> None:
    from ttc_proxy.proxy.backends import Backend, new_client_session
    from ttc_proxy.proxy.runs.accounting import BudgetScope
    from ttc_proxy.proxy.runs.context import RunContext
    from ttc_proxy.proxy.runs.state import RunState, Scope
    from ttc_proxy.proxy.traces import Trace
    from ttc_proxy.strategies import BUILTIN_STRATEGIES
    from ttc_proxy.strategies.framework import CallOptions, Sampling

    engine = _engine_backend(engine_proxy)
    settings = ProxyConfig(backends=[BackendConfig(name="x", base_url="http://x")]).strategies
    messages = [{"role": "user", "content": "Write a smiling face emoji, then the word über."}]

    async def run() -> None:
        async with new_client_session() as session:
            backend = Backend(engine.config, engine.base_url, session)
            await backend.discover()
            state = RunState(owner="e2e", request_id=None, settings=settings, registry=BUILTIN_STRATEGIES,
                             trace=Trace("e2e"))
            ctx = RunContext(state, Scope(backend=backend, model="smollm2", messages=messages,
                                          sampling=Sampling(0.0, None, 12, None, 5), budget=BudgetScope(settings.budget)))
            (reply,) = await ctx.generate(CallOptions(logprobs=True, top_logprobs=3))
            tokens = reply.tokens
            assert tokens and tokens[0].offset == 0 and all(len(t.top) == 3 for t in tokens)
            # Offsets are characters: every token's text sits at its offset, multi-byte characters included.
            for token in tokens:
                assert reply.text[token.offset:].startswith(token.bytes.decode("utf-8", "replace"))
            ids = await ctx.token_ids(tokens)
            assert await ctx.detokenize(ids) == reply.text
            # Continuing from token ids (raw completions of the rendered template) equals continuing the text.
            cut = tokens[len(tokens) // 2]
            by_ids = await ctx.continue_prefix(await ctx.token_ids(tokens[:len(tokens) // 2]),
                                               CallOptions(max_tokens=6))
            by_text = await ctx.continue_prefix(reply.text[:cut.offset], CallOptions(max_tokens=6))
            assert by_ids[0].text == by_text[0].text == reply.text[cut.offset:][:len(by_ids[0].text)]
            several = await ctx.continue_prefix(reply.text[:cut.offset], CallOptions(temperature=0.9, max_tokens=4),
                                                n=3)
            assert len(several) == 3 and len({c.seed for c in several}) == 3
            rendered = await ctx.render()
            assert rendered.endswith("assistant\n") and messages[0]["content"] in rendered

    asyncio.run(run())


def test_cot_sync_sdk(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="cot-smollm2", messages=QUESTION, max_tokens=48, temperature=0,
                                              logprobs=True, top_logprobs=2)
    body = response.model_dump(exclude_unset=True)
    validate_schema({k: v for k, v in body.items() if k != "ttc"}, "CreateChatCompletionResponse")
    assert response.choices[0].message.content and body["ttc"]["backend_calls"] == 1
    assert "".join(t.token for t in response.choices[0].logprobs.content).strip() in \
        response.choices[0].message.content + " "


def test_mcts_async_sdk_grows_a_tree(engine_proxy: ProxyServer) -> None:
    async def ask() -> openai.types.chat.ChatCompletion:
        async with openai.AsyncOpenAI(base_url=f"{engine_proxy.url}/v1", api_key="unused", max_retries=0) as client:
            return await client.chat.completions.create(model="mcts:iterations=2,batch=2,level=answer-smollm2",
                                                        messages=QUESTION, max_tokens=16, seed=3)

    response = asyncio.run(ask())
    body = response.model_dump(exclude_unset=True)
    validate_schema({k: v for k, v in body.items() if k != "ttc"}, "CreateChatCompletionResponse")
    tree = body["ttc"]["details"]["tree"]
    assert len(tree) == 4 and all(n["parent"] is None or n["parent"] < n["id"] for n in tree)
    trace = httpx.get(f"{engine_proxy.url}/v1/traces/{body['ttc']['trace_id']}").json()
    assert trace["nodes"][0]["notes"]["tree"] == tree


def test_step_level_mcts_continues_prefixes_on_the_engine(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="mcts:level=step,iterations=2,batch=2,step_tokens=8-smollm2",
                                              messages=QUESTION, max_tokens=24, seed=4)
    details = response.model_extra["ttc"]["details"]
    assert details["level"] == "step" and details["nodes"] >= 2 and response.choices[0].message.content


def test_think_streams_its_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="think:min_thinking_tokens=8,max_thinking_tokens=24,answer_tokens=12-smollm2", messages=QUESTION,
        max_tokens=24, temperature=0, stream=True)
    content, ttc = [], None
    for chunk in stream:
        validate_schema(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        ttc = (chunk.model_extra or {}).get("ttc", ttc)
        content += [c.delta.content for c in chunk.choices if c.delta.content]
    assert ttc["details"]["thinking_tokens"] >= 8 and "".join(content)


def test_deepthink_and_bon_over_cot(client: openai.OpenAI) -> None:
    deep = client.chat.completions.create(model="deepthink:k=2-smollm2", messages=QUESTION, max_tokens=32,
                                          temperature=0)
    assert deep.model_extra["ttc"]["details"]["route"] in ("direct", "synthesis")
    composed = client.chat.completions.create(model="bon:n=3,select=confidence,confidence=logprob>cot-smollm2",
                                              messages=QUESTION, max_tokens=32, seed=9)
    ttc = composed.model_extra["ttc"]
    assert ttc["over"] == "cot" and ttc["backend_calls"] == 3 and composed.choices[0].message.content


# ---- offline pivotal-token search (ttc-proxy pts) on the real engine, with hard caps ----


def test_tokenize_endpoints_on_the_engine(engine_proxy: ProxyServer) -> None:
    chat = httpx.post(f"{engine_proxy.url}/v1/tokenize", json={"model": "smollm2", "messages": QUESTION}).json()
    assert chat["count"] == len(chat["tokens"]) > 5
    text = httpx.post(f"{engine_proxy.url}/v1/detokenize", json={"model": "smollm2", "tokens": chat["tokens"]}).json()
    assert text["prompt"].endswith("assistant\n") and QUESTION[0]["content"] in text["prompt"]
    plain = httpx.post(f"{engine_proxy.url}/tokenize", json={"model": "smollm2", "prompt": text["prompt"]}).json()
    assert plain["tokens"] == chat["tokens"]  # special-token text is parsed back to the same ids


def test_offline_pts_on_the_engine(engine_proxy: ProxyServer, tmp_path) -> None:
    import json

    from ttc_proxy.tools import cli
    from ttc_proxy.tools.pts.records import PivotalTokenRecord

    tasks = tmp_path / "tasks.jsonl"
    # Two dev-set questions SmolLM2 gets right about half the time (at 24 tokens).
    tasks.write_text(
        '{"id": "mul-1001-1", "question": "What is 3 times 8? Answer with just the number.", "answer": "24", '
        '"check": "number"}\n'
        '{"id": "mul-1001-19", "question": "What is 5 times 2? Answer with just the number.", "answer": "10", '
        '"check": "number"}\n')
    out = tmp_path / "pivots"
    # Hard caps: 2 tasks, 4 rollouts per estimate, one reply searched per task, short replies. Every task is
    # searched (p in [0, 1]).
    status = cli.main(["pts", str(tasks), "--model", "smollm2", "--proxy", engine_proxy.url, "--out", str(out),
                       "--rollouts", "4", "--min-p", "0", "--max-p", "1", "--answers-per-task", "1",
                       "--max-tokens", "24", "--dpo-candidates", "2", "--seed", "3", "--no-progress"])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["tasks_done"], summary["tasks_searched"], summary["tasks_failed"]) == (2, 2, {})
    assert all(t["samples"] == 4 and t["answers"] == 1 for t in summary["tasks"])
    # Where the question's p is strictly between 0 and 1, the reply searched (its p is 0 or 1) differs from it by
    # at least 0.25, so the subdivision measured prefixes beyond the question.
    assert all(t["estimates"] > 1 for t in summary["tasks"] if 0 < t["p"] < 1)
    spend = summary["this_run"]["spend"]
    assert spend["calls"] >= 2 and spend["completion_tokens"] > 0
    assert spend["cached_prompt_tokens"] is not None  # llama-server says how much of each prompt it had cached
    lines = (out / "pivotal_tokens.jsonl").read_text().splitlines()
    assert len(lines) == summary["pivots"]
    for line in lines:
        record = PivotalTokenRecord.from_dict(json.loads(line))
        assert record.prob_before in (0, 0.25, 0.5, 0.75, 1) and abs(record.prob_delta) >= 0.2
        assert record.pivot_context.startswith("<|im_start|>") and record.query in record.pivot_context
        decoded = httpx.post(f"{engine_proxy.url}/v1/detokenize",
                             json={"model": "smollm2", "tokens": [record.pivot_token_id]}).json()["prompt"]
        assert decoded == record.pivot_token
    for line in (out / "dpo_pairs.jsonl").read_text().splitlines():
        pair = json.loads(line)
        assert pair["chosen"] != pair["rejected"] and pair["prompt"].startswith("<|im_start|>")


def test_probe_measures_llama_server(engine_proxy: ProxyServer, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from ttc_proxy.tools import cli

    backend = engine_proxy.server.config.app.state.proxy.backends["local"]
    assert cli.main(["probe", backend.base_url, "--json"]) == 0
    checks = {c["name"]: c["value"] for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["kind"] == "llama_cpp" and checks["models"] == ["smollm2"]
    assert checks["max_n"] == 8 and checks["usage_counts_one_choice"] is True
    assert checks["logprobs"] is True and checks["max_top_logprobs"] == 20 and checks["token_ids"] is True
    assert checks["prefill"] is True and checks["prefill_echo"] is True
    assert checks["completions"] is True and checks["completions_token_ids"] is True
    assert checks["tokenize"] is True and checks["render"] is True and checks["logit_bias"] is True
    assert checks["stream_done"] is True and checks["stream_usage"] is True
    assert checks["error_shape"].startswith("HTTP 400, OpenAI shape")
    # What the preset assumes for llama_cpp is what was measured.
    measured = {k: checks[k] for k in ("logprobs", "prefill", "completions", "tokenize", "render", "token_ids",
                                       "logit_bias", "usage_counts_one_choice")}
    assumed = {k: getattr(backend.capabilities, k) for k in measured}
    assert measured == assumed


HOLD_ENGINE = """
import asyncio
from ttc_proxy.proxy.backends.engine import LocalEngine
from ttc_proxy.proxy.config import EmbeddedEngine

async def main():
    engine = LocalEngine(EmbeddedEngine(slots=1, context=1024))
    await engine.start()
    print(engine.process.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_the_embedded_engine_dies_with_the_process_that_started_it() -> None:
    """Even a SIGKILLed proxy leaves no llama-server behind (the kernel's parent-death signal)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    owner = subprocess.Popen([sys.executable, "-c", HOLD_ENGINE], stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(owner.stdout.readline())
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{engine_pid}/stat") as stat:
                    if stat.read().split(")")[-1].split()[0] == "Z":
                        break  # dead, waiting only to be reaped
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            os.kill(engine_pid, signal.SIGKILL)
            raise AssertionError("llama-server outlived the process that started it")
    finally:
        owner.kill()
