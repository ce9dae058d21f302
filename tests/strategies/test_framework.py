"""Framework v2: what a strategy's context gives it, tested directly (a RunContext over the scripted fake) and
through the proxy: budgets, tokens, prefixes, seeds, raw prompts, engine fields, the trace tree, concurrency,
live answers, composition limits, response_format and logprobs on strategy requests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx
import openai
import pytest

from ttc_proxy.proxy.backends import Backend, new_client_session
from ttc_proxy.proxy.config import BackendConfig, ProxyConfig
from ttc_proxy.proxy.runs.accounting import BudgetScope
from ttc_proxy.proxy.runs.context import RunContext
from ttc_proxy.proxy.runs.state import RunState, Scope
from ttc_proxy.proxy.runs.sampling import TokenReader, derive_seed, logprob_entries, read_tokens
from ttc_proxy.proxy.traces import Trace
from ttc_proxy.strategies import BUILTIN_STRATEGIES
from ttc_proxy.strategies.framework import (
    BudgetExceeded,
    CallOptions,
    Candidate,
    Sampling,
    StrategyError,
    gather_all,
    gather_successes,
)
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply, render_template

from tests.helpers import fake_config
from tests.helpers import (ProxyServer, assert_openai_error, chat, held_until_all_arrived, sync_client, user,
                           validate_schema)

SETTINGS = ProxyConfig.model_validate({"backends": [{"name": "x", "base_url": "http://x"}]}).strategies


@asynccontextmanager
async def context(fake: FakeBackend, *, kind: str = "llama_cpp", seed: int | None = None,
                  budget: dict[str, Any] | None = None, max_tokens: int = 16,
                  **capabilities: Any) -> AsyncIterator[RunContext]:
    """A RunContext over the fake, as the proxy builds one for a request."""
    async with new_client_session() as client:
        config = BackendConfig(name="fake", kind=kind, base_url=fake.base_url, capabilities=capabilities)
        backend = Backend(config, fake.base_url, client)
        await backend.discover()
        limits = SETTINGS.budget.model_copy(update=budget or {})
        state = RunState(owner="test", request_id=None, settings=SETTINGS, registry=BUILTIN_STRATEGIES,
                         trace=Trace("test"))
        scope = Scope(backend=backend, model="fake-model", messages=user(),
                      sampling=Sampling(None, None, max_tokens, None, seed), budget=BudgetScope(limits))
        yield RunContext(state, scope)


# ================================================================ tokens


def test_token_reader_gives_char_offsets_and_drops_ids_of_merged_characters():
    entries = [{"id": 5, "token": "Grö", "bytes": list("Grö".encode()), "logprob": -0.1},
               {"id": 6, "token": "ße", "bytes": list("ße".encode()), "logprob": -0.2},
               {"id": 7, "token": " 42", "bytes": list(b" 42"), "logprob": -0.3,
                "top_logprobs": [{"id": 7, "token": " 42", "logprob": -0.3}, {"id": 8, "token": " 41",
                                                                               "logprob": -1.5}]}]
    tokens = read_tokens(entries, merges_split_characters=True)
    text = "Größe 42"
    assert [t.offset for t in tokens] == [0, 3, 5]
    assert text[:tokens[2].offset] == "Größe"
    # llama-server merges the tokens of a split multi-byte character into one entry with the last id: unusable.
    assert [t.id for t in tokens] == [None, None, 7]
    assert [(a.text, a.id) for a in tokens[2].top] == [(" 42", 7), (" 41", 8)]
    assert [t.id for t in read_tokens(entries, merges_split_characters=False)] == [5, 6, 7]


def test_token_reader_handles_bytes_split_inside_a_character_and_vllm_ids():
    smile = "😀".encode()
    reader = TokenReader(merges_split_characters=False)
    first, piece1 = reader.read({"token": "token_id:10", "bytes": list(smile[:2]), "logprob": -1.0})
    second, piece2 = reader.read({"token": "token_id:11", "bytes": list(smile[2:]), "logprob": -1.0})
    third, piece3 = reader.read({"token": "token_id:12", "bytes": list(b"!"), "logprob": -1.0})
    assert (first.id, second.id, third.id) == (10, 11, 12)
    assert piece1 + piece2 + piece3 == "😀!"  # what a stream appends: whole characters only
    assert (first.offset, second.offset, third.offset) == (0, 0, 1)


def test_legacy_completions_logprobs_are_read():
    choice = {"logprobs": {"tokens": ["A", " B"], "token_logprobs": [-0.5, -1.0],
                           "top_logprobs": [{"A": -0.5, "C": -2.0}, {" B": -1.0}]}}
    tokens = read_tokens(logprob_entries(choice), merges_split_characters=False)
    assert [(t.text, t.logprob, t.offset) for t in tokens] == [("A", -0.5, 0), (" B", -1.0, 1)]
    assert [(a.text, a.logprob) for a in tokens[0].top] == [("A", -0.5), ("C", -2.0)]


async def test_generated_tokens_carry_ids_bytes_and_offsets(fake_backend: FakeBackend, fake: FakeBackend):
    fake.script = lambda body: FakeReply(texts=["Größe is 42 ü"])
    async with context(fake) as ctx:
        (candidate,) = await ctx.generate(CallOptions(logprobs=True, top_logprobs=3))
        ids = await ctx.token_ids(candidate.tokens)
    assert candidate.text == "Größe is 42 ü"
    tokens = candidate.tokens
    assert [candidate.text[t.offset:t.offset + len(t.text)] for t in tokens] == [t.text for t in tokens]
    assert all(t.bytes == t.text.encode() for t in tokens) and len(tokens[0].top) == 3
    # ids the engine could not vouch for (multi-byte pieces) come from its tokenizer; the rest are its own.
    assert tokens[2].id is not None and ids[2] == tokens[2].id
    assert fake.vocabulary.decode(ids) == candidate.text


# ================================================================ prefixes and raw prompts


async def test_continue_prefix_draws_n_continuations_and_learns_the_echo_once(fake_backend, fake):
    fake.script = lambda body: FakeReply(texts=[" 42.", " 41."])
    async with context(fake) as ctx:
        first = await ctx.continue_prefix("The answer is", CallOptions(logprobs=True), n=2)
        again = await ctx.continue_prefix("The answer is", n=2)
    assert [c.text for c in first] == [" 42.", " 41."]  # the echoed prefix is not part of the continuation
    assert first[0].tokens[0].offset == 0 and first[0].tokens[0].text == " 42."
    assert [c.text for c in again] == [" 42.", " 41."]
    probes = [r for r in fake.chat_requests() if r.body["max_tokens"] == 1]
    assert len(probes) == 1 and probes[0].body["messages"][-1]["role"] == "assistant"
    calls = [r for r in fake.chat_requests() if r not in probes]
    assert [r.body["n"] for r in calls] == [2, 2]
    assert all(r.body["messages"][-1] == {"role": "assistant", "content": "The answer is"} for r in calls)


async def test_continue_prefix_without_echo_keeps_the_reply(fake_backend):
    quiet = FakeBackend(slots=4, echo_prefill=False).start_in_thread()
    try:
        quiet.script = lambda body: FakeReply(texts=[" 42."])
        async with context(quiet) as ctx:
            (candidate,) = await ctx.continue_prefix("The answer is")
        assert candidate.text == " 42."
    finally:
        quiet.stop_thread()


async def test_token_id_prefixes_go_through_raw_completions_exactly(fake_backend, fake):
    fake.script = lambda body: FakeReply(texts=[" 42"])
    async with context(fake) as ctx:
        rendered = await ctx.render()
        prefix = await ctx.tokenize("The answer is")
        (candidate,) = await ctx.continue_prefix(prefix, CallOptions(logprobs=True))
        assert await ctx.detokenize(prefix) == "The answer is"
    assert rendered == render_template(user())
    (call,) = [r for r in fake.requests if r.path.endswith("/completions") and "chat" not in r.path]
    assert call.body["prompt"] == fake.vocabulary.encode(rendered) + prefix
    assert candidate.text == " 42" and candidate.tokens[0].text == " 42"


async def test_text_prefix_without_prefill_renders_the_conversation(fake_backend, fake):
    fake.script = lambda body: FakeReply(texts=[" 42"])
    async with context(fake, prefill=False) as ctx:
        (candidate,) = await ctx.continue_prefix("The answer is")
    (call,) = [r for r in fake.requests if r.path == "/v1/completions"]
    assert call.body["prompt"] == render_template(user()) + "The answer is" and candidate.text == " 42"


async def test_complete_takes_text_or_ids_and_n(fake_backend, fake):
    fake.script = lambda body: FakeReply(texts=["a b", "c"])
    async with context(fake) as ctx:
        texts = [c.text for c in await ctx.complete("Once upon", n=2)]
        ids = [c.text for c in await ctx.complete([1, 2, 3])]
    assert texts == ["a b", "c"] and ids == ["a b"]
    prompts = [r.body["prompt"] for r in fake.requests if r.path == "/v1/completions"]
    assert prompts == ["Once upon", [1, 2, 3]]


async def test_raw_prompts_need_the_capability(fake_backend, fake):
    async with context(fake, kind="openai") as ctx:
        for call in (ctx.render(), ctx.tokenize("x"), ctx.complete("x"), ctx.continue_prefix("x")):
            with pytest.raises(Exception, match="does not support"):
                await call
    assert fake.requests == []


async def test_stream_continues_a_prefix_without_repeating_it(fake_backend, fake):
    fake.script = lambda body: FakeReply(texts=[" 42 is it"])
    async with context(fake) as ctx:
        async with aclosing(ctx.stream(prefix="The answer is")) as events:
            text = "".join([e.text async for e in events])
    assert text == " 42 is it"


async def test_closing_a_stream_early_settles_the_call_at_once(fake_backend, fake):
    # The engine call is aborted, traced as a cut and charged when the strategy closes the stream, not later.
    fake.script = lambda body: FakeReply(texts=["one two three four five six"], chunk_delay=0.05)
    async with context(fake, max_tokens=16) as ctx:
        async with aclosing(ctx.stream()) as events:
            first = await anext(events)
        state = ctx._state
        (node,) = [n for n in state.trace.nodes if n.get("kind") == "stream"]
        budget = ctx._scope.budget
        assert node["status"] == f"cut@{len(first.text)}"
        assert budget.reserved == 0 and budget.usage.calls == 1 and budget.usage.completion_tokens == 1


# ================================================================ engine fields per call


async def test_per_call_engine_fields_are_sent_and_checked(fake_backend, fake):
    async with context(fake) as ctx:
        await ctx.generate(CallOptions(extra={"logit_bias": {"42": 5}, "cache_prompt": False}))
    (call,) = fake.chat_requests()
    assert call.body["logit_bias"] == {"42": 5} and call.body["cache_prompt"] is False
    async with context(fake, kind="openai") as ctx:
        with pytest.raises(Exception, match="does not take cache_prompt"):
            await ctx.generate(CallOptions(extra={"cache_prompt": False}))
    async with context(fake, kind="transformers") as ctx:
        with pytest.raises(Exception, match="logit_bias"):
            await ctx.generate(CallOptions(extra={"logit_bias": {"1": 1}}))
    assert len(fake.chat_requests()) == 1


# ================================================================ seeds


async def test_seeds_top_level_spans_and_siblings(fake_backend, fake):
    async with context(fake, seed=7) as ctx:
        await ctx.generate(n=2)
        await ctx.generate(n=1, index=2)
        left, right = ctx.span("branch"), ctx.span("branch")
        await left.generate(n=2)
        await right.generate(n=1)
    seeds = [r.body["seed"] for r in fake.chat_requests()]
    assert seeds[:3] == [7, 8, 9]  # top level: seed + i (the eval's pools depend on it)
    assert sorted(seeds[3:5]) == sorted([derive_seed(7, ("branch#0",), 0), derive_seed(7, ("branch#0",), 1)])
    assert seeds[5] == derive_seed(7, ("branch#1",), 0)  # a sibling span: other seeds
    assert len(set(seeds)) == 6
    assert derive_seed(7, ("branch#0",), 0) == derive_seed(7, ("branch#0",), 0)


# ================================================================ budgets


async def test_budget_view_and_every_call_checked_before_it_starts(fake_backend, fake):
    async with context(fake, budget={"max_calls": 2}) as ctx:
        assert ctx.budget.calls == 2
        await ctx.generate(n=1)
        assert ctx.budget.calls == 1 and ctx.budget.tokens < SETTINGS.budget.max_total_tokens
        await ctx.generate(n=1)
        with pytest.raises(BudgetExceeded):
            await ctx.generate(n=1)
        with pytest.raises(BudgetExceeded):
            await ctx.span("deeper").continue_prefix("x")
        with pytest.raises(BudgetExceeded):
            await ctx.run_strategy("sc", {"n": 2})
        assert ctx.budget.exhausted and ctx.budget.calls == 0
    assert len([r for r in fake.chat_requests() if r.body.get("max_tokens") != 1]) == 2


async def test_a_nested_budget_binds_the_nested_run_only(fake_backend, fake):
    async with context(fake, seed=1) as ctx:
        result = await ctx.run_strategy("sc", {"n": 4}, budget={"max_calls": 2})
        assert result.budget_exhausted and result.usage.calls == 2
        assert ctx.budget.calls == SETTINGS.budget.max_calls - 2  # the run's own budget is not spent
        await ctx.generate(n=1)  # the run's own budget is not spent


def test_budget_cut_answer_is_not_a_max_tokens_cut_off():
    candidate = Candidate("42", "length", 1, budget_exhausted=True)
    assert not candidate.truncated and Candidate("4", "length", 1).truncated


def test_a_strategy_returns_its_best_so_far_when_the_budget_runs_out(client, fake):
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user(), seed=0,
                                                extra_body={"ttc": {"budget": {"max_calls": 3}}})
    assert completion.choices[0].finish_reason == "length" and completion.ttc["budget_exhausted"] is True
    assert completion.ttc["details"]["samples"] == 3 and completion.ttc["backend_calls"] == 3
    full = client.chat.completions.create(model="sc:n=2-fake-model", messages=user())
    assert full.choices[0].finish_reason == "stop" and full.ttc["budget_exhausted"] is False


def test_no_answer_within_the_budget_is_a_429_not_to_be_retried(proxy, fake):
    fake.script = lambda body: FakeReply(delay=2.0)
    started = time.monotonic()
    response = chat(proxy, {"model": "sc:n=2-fake-model", "messages": user(),
                            "ttc": {"budget": {"max_seconds": 0.2}}})
    assert time.monotonic() - started < 1.5
    assert_openai_error(response, 429, code="budget_exhausted")
    assert response.headers["x-should-retry"] == "false"


def test_nested_runs_are_checked_against_the_budget(client, fake):
    fake.script = lambda body: FakeReply(delay=0.05)
    completion = client.chat.completions.create(
        model="bon:n=4,select=vote>sc:n=4-fake-model", messages=user(), seed=3,
        extra_body={"ttc": {"budget": {"max_calls": 5}}})
    assert completion.ttc["backend_calls"] == 5 == len(fake.chat_requests())
    assert completion.ttc["budget_exhausted"] is True and completion.choices[0].finish_reason == "length"


# ================================================================ composition limits


@pytest.mark.parametrize(("model", "code", "words"), [
    ("sc:n=2>sc:n=2>sc:n=2>sc:n=2-fake-model", "composition_too_deep", "limit is 3"),
    ("bon:n=16>sc:n=8-fake-model", "composition_fan_out_too_large", "max_samples = 64"),
    ("mcts:iterations=8,batch=4>sc:n=4-fake-model", "composition_fan_out_too_large", "128"),
    ("cot>sc-fake-model", "not_composable", "cannot run over"),
])
def test_composition_limits_are_400s_naming_the_limit(proxy, fake, model, code, words):
    response = chat(proxy, {"model": model, "messages": user()})
    error = assert_openai_error(response, 400, code=code)
    assert words in error["message"] and fake.requests == []


async def test_run_strategy_checks_depth_and_fan_out_at_run_time(fake_backend, fake):
    async with context(fake) as ctx:
        inner = ctx
        for _ in range(2):  # the top run plus two nested levels: depth 3
            inner = inner._with(inner._scope.__class__(**{**inner._scope.__dict__,
                                                          "depth": inner._scope.depth + 1}))
        with pytest.raises(Exception, match="limit is 3"):
            await inner.run_strategy("sc", {"n": 1})
        wide = ctx._with(ctx._scope.__class__(**{**ctx._scope.__dict__, "fan_out": 32}))
        with pytest.raises(Exception, match="max_samples"):
            await wide.run_strategy("sc", {"n": 4})
    assert fake.requests == []


# ================================================================ the trace tree


def test_trace_is_a_tree_of_spans_runs_and_calls(client, proxy, fake):
    completion = client.chat.completions.create(model="bon:n=2,select=vote>sc:n=2-fake-model", messages=user())
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.ttc['trace_id']}").json()
    nodes = {n["id"]: n for n in trace["nodes"]}
    runs = [n for n in nodes.values() if n["kind"] == "strategy"]
    assert [n["label"] for n in runs] == ["sc", "sc"] and all(n["parent"] == 0 for n in runs)
    calls = [n for n in nodes.values() if n["kind"] == "call"]
    assert len(calls) == 2 and {c["parent"] for c in calls} == {r["id"] for r in runs}
    assert all(n["status"] == "ok" for n in calls + runs) and nodes[0]["calls"] == 2


def test_a_stream_cut_on_purpose_is_recorded_as_a_cut(client, proxy, fake):
    from tests.strategies.test_deepconf import script_by_seed

    fake.script = script_by_seed({105})
    completion = client.chat.completions.create(model="deepconf:n=6,warmup=4,window=3-fake-model",
                                                messages=user(), seed=100, max_tokens=64)
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.ttc['trace_id']}").json()
    streams = [n for n in trace["nodes"] if n["kind"] == "stream"]
    statuses = sorted(n["status"] for n in streams)
    assert statuses[0].startswith("cut@") and statuses[1] == "ok"
    cut = next(n for n in streams if n["status"].startswith("cut@"))
    assert int(cut["status"][4:]) == len(cut["outputs"][0]) > 0
    # A cut stream never hears the engine's usage: its prompt is charged as the same prompt's other calls reported.
    warmup = next(n for n in trace["nodes"] if n["kind"] == "call")
    assert cut["prompt_tokens"] == warmup["prompt_tokens"] > 0
    assert completion.usage.prompt_tokens == 6 * warmup["prompt_tokens"]


# ================================================================ concurrency


async def test_gather_successes_cancels_the_rest_once_min_success_is_unreachable():
    cancelled = []

    async def slow() -> int:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return 1

    async def fail() -> int:
        raise ValueError("boom")

    started = time.monotonic()
    with pytest.raises(StrategyError, match="boom"):
        await gather_successes([fail, slow, slow], min_success=3)
    assert time.monotonic() - started < 1 and cancelled == [True, True]
    results, errors = await gather_successes([fail, lambda: asyncio.sleep(0, 7)], min_success=1)
    assert results == [7] and [str(e) for e in errors] == ["boom"]
    with pytest.raises(ValueError, match="boom"):
        await gather_all([fail(), asyncio.sleep(5)])


def test_one_failure_that_makes_min_success_unreachable_aborts_the_siblings(client, fake):
    # All three calls are in flight before the failure answers, so there are siblings to abort at the backend.
    fake.script = held_until_all_arrived(
        3, lambda body: FakeReply(status=500) if body["seed"] == 0 else FakeReply(delay=3.0))
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="sc:n=3,min_success=3-fake-model", messages=user(), seed=0)
    assert time.monotonic() - started < 2
    slow = [r for r in fake.chat_requests() if r.body["seed"] != 0]
    assert len(slow) == 2
    deadline = time.monotonic() + 2
    while not all(r.aborted for r in slow):
        assert time.monotonic() < deadline, "the siblings must be aborted at the backend"
        time.sleep(0.01)


# ================================================================ response_format and logprobs


def test_response_format_reaches_every_sample_and_non_parsing_candidates_are_dropped(client, fake):
    fake.script = lambda body: FakeReply(texts=["not json", '{"a": 2}', '{"a": 1}', "no"])
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]}}}
    question = user("Give me JSON.")
    completion = client.chat.completions.create(model="bon:n=4,select=vote-fake-model", messages=question,
                                                response_format=schema)
    assert completion.choices[0].message.content == '{"a": 1}'
    ours = [r for r in fake.chat_requests() if r.body["messages"] == question]  # (a late call of another test)
    assert len(ours) == 1 and ours[0].body["response_format"] == schema and ours[0].body["n"] == 4
    # When nothing parses, the candidates are kept (the strategy still answers).
    fake.script = lambda body: FakeReply(texts=["nope", "nope", "x"])
    completion = client.chat.completions.create(model="bon:n=3,select=vote-fake-model", messages=user(),
                                                response_format={"type": "json_object"})
    assert completion.choices[0].message.content == "nope"


def test_logprobs_on_a_strategy_request_are_those_of_the_returned_candidate(client, fake):
    fake.script = lambda body: FakeReply(texts=["It is 7", "It is 9", "It is 7"])
    completion = client.chat.completions.create(model="sc:n=3-fake-model", messages=user(), logprobs=True,
                                                top_logprobs=2)
    body = completion.model_dump(exclude_unset=True)
    validate_schema({k: v for k, v in body.items() if k != "ttc"}, "CreateChatCompletionResponse")
    content = completion.choices[0].logprobs.content
    assert "".join(e.token for e in content) == completion.choices[0].message.content == "It is 7"
    assert all(len(e.top_logprobs) == 2 for e in content)
    assert all(r.body["logprobs"] is True for r in fake.chat_requests())


def test_tools_stay_refused(proxy, fake):
    response = chat(proxy, {"model": "cot-fake-model", "messages": user(),
                            "tools": [{"type": "function", "function": {"name": "f"}}]})
    error = assert_openai_error(response, 400, param="tools", code="unsupported_by_strategy")
    assert "tool" in error["message"]


# ================================================================ live answers


def test_emitted_answer_streams_before_the_run_ends_and_nested_runs_do_not_emit(client, fake):
    fake.script = lambda body: FakeReply(texts=["<output>42</output>"])
    chunks = list(client.chat.completions.create(model="cot-fake-model", messages=user(), stream=True))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["42"]  # emitted once, not repeated at the end
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert final and chunks.index(final[0]) > next(i for i, c in enumerate(chunks) if c.choices
                                                   and c.choices[0].delta.content)
    chunks = list(client.chat.completions.create(model="sc:n=2>cot-fake-model", messages=user(), stream=True))
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["42"]  # the nested cot runs' emits never reached the client


# ================================================================ plugins


PLUGIN = '''
from ttc_proxy.strategies.framework import Strategy, StrategyResult


class Echo(Strategy):
    slug = "echo"
    description = "returns the first sample"

    async def run(self, ctx, params):
        (candidate,) = await ctx.generate(n=1)
        return StrategyResult([candidate], {"plugin": True})


class NotAStrategy:
    slug = "nope"


class Clash(Echo):
    slug = "sc"
'''


@pytest.fixture()
def plugin_path(tmp_path, monkeypatch):
    (tmp_path / "ttc_test_plugin.py").write_text(PLUGIN)
    info = tmp_path / "ttc_test_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ttc-test-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[ttc_proxy.strategies]\necho = ttc_test_plugin:Echo\nbroken = ttc_test_plugin:Missing\n"
        "notastrategy = ttc_test_plugin:NotAStrategy\nclash = ttc_test_plugin:Clash\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_plugins_register_through_entry_points(plugin_path):
    from ttc_proxy.proxy.registry import load_registry

    registry, problems = load_registry()
    assert registry["echo"].__name__ == "Echo" and registry["sc"] is BUILTIN_STRATEGIES["sc"]
    assert len(problems) == 3
    assert any("broken" in p and "does not load" in p for p in problems)
    assert any("notastrategy" in p and "not a Strategy" in p for p in problems)
    assert any("clash" in p and "already taken" in p for p in problems)


def test_an_installed_plugin_serves_requests(plugin_path, fake_backend, fake):
    with ProxyServer(fake_config(fake_backend)) as server:
        completion = sync_client(server).chat.completions.create(model="echo-fake-model", messages=user())
        ids = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert completion.ttc["strategy"] == "echo" and completion.ttc["details"] == {"plugin": True}
    assert "echo-fake-model" in ids


def test_json_dump_of_trace_is_serialisable(client, proxy, fake):
    completion = client.chat.completions.create(model="mcts:iterations=1,batch=2-fake-model", messages=user())
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.ttc['trace_id']}").json()
    assert json.dumps(trace) and trace["nodes"][0]["status"] == "ok"


def test_scorers_judge_a_derived_answer_by_its_own_tokens():
    from ttc_proxy.strategies.scoring import ConfidenceSpec, LogprobScorer

    from tests.helpers import tok

    reply = "<output> 42</output>"
    tokens = (tok("<output>", -0.01, offset=0), tok(" 42", -2.0, offset=8), tok("</output>", -0.01, offset=11))
    derived = Candidate("42", "stop", 3, tokens, generated=reply, text_start=9)
    assert [t.text for t in derived.answer_tokens] == [" 42"]
    assert LogprobScorer().score_now(derived, []) == pytest.approx(2.718281828 ** -2.0)
    assert ConfidenceSpec("logprob").score(derived.answer_tokens) == pytest.approx(2.718281828 ** -2.0)
    plain = Candidate(reply, "stop", 3, tokens)
    assert plain.answer_tokens == tokens  # a plain reply is its own answer


# ================================================================ token reservations


async def test_a_call_reserves_its_worst_case_and_an_unseen_prompt_counts_the_learned_template(fake_backend, fake):
    async with context(fake, budget={"max_total_tokens": 100}, max_tokens=16) as ctx:
        await ctx.generate()  # reports its prompt: 5 fake tokens
        assert fake.chat_requests()[-1].body["max_tokens"] == 16
        state = ctx._state
        assert state.prompt_overhead == 0  # the fake has no template: a report below characters / 4
        state.learn_prompt("x" * 40, 30)  # an engine whose template adds 20 tokens to 10 characters' worth
        assert state.prompt_overhead == 20
        other = [{"role": "user", "content": "Something else entirely, never asked before?"}]
        left = ctx.budget.tokens
        # cut to what is left after its estimated prompt
        await ctx.generate(CallOptions(max_tokens=left), messages=other)
        estimated = len(json.dumps(other, sort_keys=True)) // 4 + 20
        assert fake.chat_requests()[-1].body["max_tokens"] == left - estimated


# ================================================================ Strategy[P]


def test_a_strategy_generic_over_its_params_model_validates_with_it():
    from ttc_proxy.proxy.config import StrategySettings
    from ttc_proxy.proxy.errors import InvalidRequest
    from ttc_proxy.proxy.runs.validation import check_params
    from ttc_proxy.strategies import BUILTIN_STRATEGIES
    from ttc_proxy.strategies.framework import Strategy, StrategyParams, StrategyResult

    class RepeatParams(StrategyParams):
        times: int = 1

    class Repeat(Strategy[RepeatParams]):
        slug = "repeat"
        description = "test only"

        async def run(self, ctx, params: RepeatParams) -> StrategyResult:
            raise NotImplementedError

    class Louder(Repeat):  # a subclass keeps its parent's model
        slug = "louder"

    class Plain(Strategy):  # no model: no parameters
        slug = "plain"
        description = "test only"

        async def run(self, ctx, params) -> StrategyResult:
            raise NotImplementedError

    assert Repeat.Params is RepeatParams and Louder.Params is RepeatParams and Plain.Params is StrategyParams
    params = check_params(Repeat, {"times": 3}, StrategySettings())
    assert isinstance(params, RepeatParams) and params.times == 3
    with pytest.raises(InvalidRequest, match="times"):
        check_params(Repeat, {"times": "many"}, StrategySettings())
    with pytest.raises(InvalidRequest, match="times"):
        check_params(Plain, {"times": 3}, StrategySettings())
    # every built-in strategy declares its model through the generic argument
    assert all(s.Params is not StrategyParams and s.Params.__name__.endswith("Params")
               for s in BUILTIN_STRATEGIES.values())
