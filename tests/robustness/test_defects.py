"""Defects found by reading the code (issue 11), each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, held_until_all_arrived, user


# ---- retry amplification: an error that will repeat says so, so the official SDK does not run it again ----

@pytest.fixture()
def retrying_sdk(proxy: ProxyServer, fake: FakeBackend) -> Iterator[tuple[openai.OpenAI, list[str]]]:
    """The official SDK at its default max_retries (2), and the list of HTTP attempts it made."""
    attempts: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda request: attempts.append(str(request.url))]}, timeout=30)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", http_client=http) as sdk:
        assert sdk.max_retries == 2
        yield sdk, attempts


def test_a_failed_strategy_costs_one_run(retrying_sdk, fake):
    sdk, attempts = retrying_sdk
    fake.script = lambda body: FakeReply(status=500)
    with pytest.raises(openai.InternalServerError) as caught:  # the backend's 500, as every sample failed
        sdk.chat.completions.create(model="sc:n=4-fake-model", messages=user(), seed=1)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(attempts) == 1 and len(fake.chat_requests()) == 4


def test_a_strategy_with_too_few_survivors_costs_one_run(retrying_sdk, fake):
    sdk, attempts = retrying_sdk
    # The strategy gives up after the second failure; all four calls are in flight before any answers.
    fake.script = held_until_all_arrived(4, lambda body: FakeReply(status=500) if body["seed"] % 2 else FakeReply())
    with pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="sc:n=4,min_success=3-fake-model", messages=user(), seed=1)
    assert caught.value.status_code == 502 and caught.value.code == "strategy_failed"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(attempts) == 1 and len(fake.chat_requests()) == 4


def test_a_spent_budget_costs_one_run(retrying_sdk, fake):
    sdk, attempts = retrying_sdk
    fake.script = lambda body: FakeReply(status=500)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="sc:n=4-fake-model", messages=user(), seed=1,
                                    extra_body={"ttc": {"budget": {"max_calls": 1}}})
    assert caught.value.code == "budget_exhausted"
    assert len(attempts) == 1 and len(fake.chat_requests()) == 1


def test_a_backend_timeout_inside_a_strategy_costs_one_run(fake):
    config = fake_config(fake, backends=[backend_entry(fake, timeouts={"read": 0.2})])
    fake.script = lambda body: FakeReply(delay=1.0)
    attempts: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda request: attempts.append(str(request.url))]}, timeout=30)
    with ProxyServer(config) as server, openai.OpenAI(base_url=server.url + "/v1", api_key="x",
                                                      http_client=http) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            sdk.chat.completions.create(model="sc:n=2-fake-model", messages=user(), seed=1)
    assert caught.value.status_code >= 500
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(attempts) == 1 and len(fake.chat_requests()) == 2


def test_a_strategy_refused_by_the_backend_with_a_4xx_is_not_retried(retrying_sdk, fake):
    sdk, attempts = retrying_sdk
    fake.script = lambda body: FakeReply(status=409, error={"error": {"message": "conflict", "type": "x"}})
    with pytest.raises(openai.ConflictError) as caught:  # the SDK retries 409 unless told not to
        sdk.chat.completions.create(model="sc:n=2-fake-model", messages=user(), seed=1)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(attempts) == 1 and len(fake.chat_requests()) == 2


def test_a_backend_429_passed_through_keeps_its_retry_after(proxy, fake):
    fake.script = lambda body: FakeReply(status=429, headers={"Retry-After": "7"},
                                         error={"error": {"message": "slow down", "type": "rate_limit_error"}})
    response = chat(proxy, {"model": "fake-model", "messages": user()})
    assert_openai_error(response, 429)
    assert response.headers["retry-after"] == "7"


# ---- framing: events end at a blank line however the backend ends its lines (\r\n, \r or \n) ----

@pytest.fixture(scope="module")
def aliased(fake_backend: FakeBackend) -> Iterator[ProxyServer]:
    """The proxy with the fake's model also served as `alias-model`, so streamed events are rewritten."""
    entry = backend_entry(fake_backend, model_names={"alias-model": "fake-model"})
    with ProxyServer(fake_config(fake_backend, backends=[entry])) as server:
        yield server


def timed_events(server: ProxyServer, body: dict[str, Any]) -> list[tuple[float, str]]:
    """(seconds since the request, data) of each streamed event, as the client receives them."""
    started = time.monotonic()
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic() - started, line[6:]))
    return events


@pytest.mark.parametrize("line_end", ["\r\n", "\r", "\n"])
def test_an_aliased_stream_is_relayed_event_by_event_whatever_its_line_endings(aliased, fake, line_end):
    fake.script = lambda body: FakeReply(texts=["one two three four"], chunk_delay=0.25, sse_line_end=line_end)
    events = timed_events(aliased, {"model": "alias-model", "messages": user(), "stream": True})
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(chunk["model"] == "alias-model" for chunk in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "one two three four"
    first_token = next(t for (t, _), c in zip(events, chunks) if c["choices"][0]["delta"].get("content"))
    assert events[-1][0] - first_token > 0.5  # the first token came while the others were still being made


def test_an_event_sent_over_several_data_lines_reaches_the_client_whole(proxy, fake):
    """SSE joins an event's `data:` lines with newlines; passed on, each line must be a `data:` line again."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
             "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    first, second = json.dumps(chunk)[:20], json.dumps(chunk)[20:]
    fake.script = lambda body: FakeReply(raw_stream=f"data: {first}\ndata: {second}\n\ndata: [DONE]\n\n".encode())
    response = chat(proxy, {"model": "fake-model", "messages": user(), "stream": True})
    events = [e for e in response.text.split("\n\n") if e]
    data = "\n".join(line[6:] for line in events[0].split("\n"))
    assert json.loads(data) == chunk and events[-1] == "data: [DONE]"


@pytest.mark.parametrize("line_end", ["\r\n", "\r"])
def test_a_strategy_reads_a_stream_whatever_its_line_endings(proxy, fake, line_end):
    fake.script = lambda body: FakeReply(texts=["It is 7"], sse_line_end=line_end)
    response = chat(proxy, {"model": "deepconf:n=3,warmup=2,window=2-fake-model", "messages": user(), "seed": 1})
    assert response.status_code == 200, response.text
    details = response.json()["ttc"]["details"]
    assert details["answer"] == "7" and details["failed"] == 0
    assert [c["tokens"] for c in details["candidates"]] == [3, 3, 3]


# ---- aborted streams are paid for: their prompt, and the tokens that came before the abort ----

PROMPT_TOKENS = 5  # "What is 6 times 7?" in the fake's word pieces


def test_a_stream_the_backend_breaks_off_still_counts_its_prompt_and_tokens(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        broken = body.get("stream") and body["seed"] == 3  # the one online trace
        return FakeReply(texts=["It is 7 and so on"], fail_after_chunks=2 if broken else None)

    fake.script = script
    completion = client.chat.completions.create(model="deepconf:n=3,warmup=2,window=2-fake-model",
                                                messages=user(), seed=1)
    assert completion.ttc["details"]["failed"] == 1 and completion.ttc["backend_calls"] == 3
    assert completion.usage.prompt_tokens == 3 * PROMPT_TOKENS
    assert completion.usage.completion_tokens == 2 * 6 + 2


def test_a_stream_pruned_by_the_proxy_counts_its_prompt(client, fake):
    from tests.strategies.test_deepconf import script_by_seed

    fake.script = script_by_seed({105, 106, 107})
    completion = client.chat.completions.create(model="deepconf:n=8,warmup=4,window=3-fake-model",
                                                messages=user(), seed=100, max_tokens=64)
    assert completion.ttc["details"]["pruned"] == 3
    assert completion.usage.prompt_tokens == 8 * PROMPT_TOKENS


def test_a_queued_stream_is_checked_against_the_budget_when_it_starts(fake):
    config = fake_config(fake, backends=[backend_entry(fake, max_in_flight=1)])
    fake.script = lambda body: FakeReply(texts=["It is 7"], chunk_delay=0.05)
    with ProxyServer(config) as server:
        response = chat(server, {"model": "deepconf:n=5,warmup=2,window=2-fake-model", "messages": user(),
                                 "seed": 1, "ttc": {"budget": {"max_calls": 3}}})
    body = response.json()
    assert response.status_code == 200, body
    # three online traces queue for the one slot; the budget lets one start, the other two are refused there
    assert body["ttc"]["backend_calls"] == 3 == len(fake.chat_requests())
    assert body["ttc"]["budget_exhausted"] is True
    assert body["usage"]["prompt_tokens"] == 3 * PROMPT_TOKENS


def test_a_stream_cut_by_the_deadline_counts_its_prompt_and_a_queued_one_nothing(fake):
    config = fake_config(fake, backends=[backend_entry(fake, max_in_flight=1)])
    fake.script = lambda body: FakeReply(texts=["It is 7 and so on and on"], chunk_delay=0.3 if body.get("stream")
                                         else 0)
    with ProxyServer(config) as server:
        response = chat(server, {"model": "deepconf:n=4,warmup=2,window=2-fake-model", "messages": user(),
                                 "seed": 1, "ttc": {"budget": {"max_seconds": 1.0}}})
    body = response.json()
    assert response.status_code == 200, body
    # two warm-up calls, then one trace streams (slowly, 2 tokens before the deadline) while the other waits
    assert body["ttc"]["backend_calls"] == 3 == len(fake.chat_requests())
    assert body["ttc"]["budget_exhausted"] is True
    assert body["usage"]["prompt_tokens"] == 3 * PROMPT_TOKENS


# ---- deepconf: a trace without logprobs has no confidence, which is reported as such, not a 500 ----

def test_deepconf_with_a_trace_without_logprobs(client, fake):
    fake.script = lambda body: FakeReply(texts=["It is 7"], logprobs=not body.get("stream"))
    completion = client.chat.completions.create(model="deepconf:n=3,warmup=2,window=2-fake-model",
                                                messages=user(), seed=1)
    assert "score n/a" in completion.choices[0].message.reasoning_content
    candidates = completion.ttc["details"]["candidates"]
    assert [c["confidence"] is None for c in candidates] == [False, False, True]


def test_deepconf_with_no_logprobs_at_all_is_an_openai_error(proxy, fake):
    fake.script = lambda body: FakeReply(texts=["It is 7"], logprobs=False)
    response = chat(proxy, {"model": "deepconf:n=3,warmup=2-fake-model", "messages": user(), "seed": 1})
    error = assert_openai_error(response, 502, code="strategy_failed")
    assert "logprobs" in error["message"]


# ---- nesting: no request shape escapes the composition limits or the budget ----

def nested_over(depth: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"strategy": "sc", "params": {"n": 2}}
    for _ in range(depth - 1):
        spec = {"strategy": "sc", "params": {"n": 2}, "over": spec}
    return spec


@pytest.mark.parametrize("depth", [4, 50, 900])
def test_a_deep_ttc_composition_is_a_400(proxy, fake, depth):
    outer = nested_over(depth)
    body = {"model": "fake-model", "messages": user(), "ttc": outer}
    error = assert_openai_error(chat(proxy, body), 400)
    assert error["code"] in ("composition_too_deep", "invalid_json"), error
    assert fake.requests == []


@pytest.mark.parametrize("depth", [4, 10_000])
def test_a_deep_model_name_composition_is_a_400(proxy, fake, depth):
    model = ">".join(["sc:n=2"] * depth) + "-fake-model"
    error = assert_openai_error(chat(proxy, {"model": model, "messages": user()}), 400)
    assert error["code"] == "composition_too_deep"
    assert len(error["message"]) < 2_000  # names the limit without echoing the whole composition
    assert fake.requests == []


def test_a_nested_composition_cannot_exceed_max_calls(client, fake):
    fake.script = lambda body: FakeReply(delay=0.02)
    completion = client.chat.completions.create(
        model="sc:n=8>sc:n=8-fake-model", messages=user(), seed=3, extra_body={"ttc": {"budget": {"max_calls": 2}}})
    assert completion.ttc["backend_calls"] == 2 == len(fake.chat_requests())
    assert completion.ttc["budget_exhausted"] is True


# ---- a full queue is transient: it may be retried, after Retry-After ----

def test_a_full_queue_may_be_retried(fake):
    config = fake_config(fake, backends=[backend_entry(fake, max_in_flight=1, max_queue=0)])
    fake.script = lambda body: FakeReply(delay=1.0) if body["messages"][0]["content"] == "slow" else FakeReply()
    with ProxyServer(config) as server:
        import threading

        holder = threading.Thread(target=chat, args=(server, {"model": "fake-model", "messages": user("slow")}))
        holder.start()
        try:
            time.sleep(0.3)
            responses = [chat(server, {"model": model, "messages": user(), "seed": 1})
                         for model in ("fake-model", "sc:n=2-fake-model")]
        finally:
            holder.join()
    for response in responses:  # checked once both were sent, while the slot was held
        assert_openai_error(response, 429, code="proxy_queue_full")
        assert response.headers["retry-after"] == "1"
        assert response.headers.get("x-should-retry") != "false"


def test_a_call_cut_by_the_deadline_counts_its_prompt(client, fake):
    fake.script = lambda body: FakeReply(delay=3.0 if body["seed"] == 2 else 0)
    completion = client.chat.completions.create(model="sc:n=2-fake-model", messages=user(), seed=1,
                                                extra_body={"ttc": {"budget": {"max_seconds": 0.5}}})
    assert completion.ttc["budget_exhausted"] is True and completion.ttc["details"]["samples"] == 1
    # the engine read both prompts; only one reply came back before the deadline
    assert completion.usage.prompt_tokens == 2 * PROMPT_TOKENS
    assert completion.usage.completion_tokens == 4


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_whose_connection_was_never_made_counts_no_prompt(fake, caplog, stream):
    """Nothing reached the engine: the run's spending (the access log reports it) has no prompt tokens."""
    import logging

    from tests.helpers import closed_port

    entry = {"name": "gone", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
             "models": ["fake-model"], "connect_retries": {"attempts": 0}, "health_check": {"interval": 0}}
    caplog.set_level(logging.INFO, logger="ttc_proxy.access")
    with ProxyServer(fake_config(fake, backends=[entry])) as server:
        model = "deepconf:n=5,warmup=4-fake-model" if stream else "sc:n=2-fake-model"  # deepconf streams
        assert chat(server, {"model": model, "messages": user(), "seed": 1}).status_code >= 400
    (line,) = [r for r in caplog.records if r.name == "ttc_proxy.access"]
    assert "prompt_tokens=0" in line.getMessage() and "status=" in line.getMessage()
