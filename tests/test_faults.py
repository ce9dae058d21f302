"""Faults: a scripted backend misbehaves in every way we know of. Each request ends as an OpenAI-style error (after a
stream has started: an error event, then `data: [DONE]`), the proxy keeps serving, and nothing leaks: its asyncio
tasks, the backend connections it holds and the scheduler's slots all return to where they were."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from proxy.app import ProxyState
from proxy.backends.backend import connections_in_use
from tools.fakebackend import FakeBackend, FakeReply

from .conftest import fake_config
from .helpers import (
    ProxyServer,
    assert_openai_error,
    backend_entry,
    chat,
    closed_port,
    user,
    validate_schema,
    wait_until,
)

READ_TIMEOUT = 1.0


# ---- what "nothing leaks" means, measured inside the proxy ----

def state_of(server: ProxyServer) -> ProxyState:
    return server.server.config.app.state.proxy  # type: ignore[no-any-return]


def tasks_in(server: ProxyServer) -> int:
    """asyncio tasks alive in the proxy's event loop (counted on that loop)."""
    loop = server.server.servers[0].get_loop()

    async def count() -> int:
        return len(asyncio.all_tasks()) - 1  # not this one

    return asyncio.run_coroutine_threadsafe(count(), loop).result(5)


def busy(server: ProxyServer) -> dict[str, int]:
    state = state_of(server)
    return {
        "slots": sum(b.scheduler.in_use for b in state.backends.values()),
        "queued": sum(b.scheduler.queued for b in state.backends.values()),
        "connections": connections_in_use(next(iter(state.backends.values())).client),
        "tasks": tasks_in(server),
    }


@pytest.fixture()
def leak_check(request: pytest.FixtureRequest) -> Iterator[Callable[[ProxyServer], None]]:
    """`leak_check(server)` before the fault takes the baseline; after the test, everything must return to it."""
    servers: list[tuple[ProxyServer, dict[str, int]]] = []

    def baseline(server: ProxyServer) -> None:
        servers.append((server, busy(server)))

    yield baseline
    for server, before in servers:
        wanted = {"slots": 0, "queued": 0, "connections": 0, "tasks": before["tasks"]}
        try:
            wait_until(lambda: busy(server) == wanted, timeout=5, interval=0.05)
        except AssertionError:
            raise AssertionError(f"leaked: {busy(server)} (before the fault: {before})") from None


# ---- the proxy under test: read timeout 1 s, in front of the shared fake ----

@pytest.fixture(scope="module")
def proxy(fake_backend: FakeBackend) -> Iterator[ProxyServer]:
    entry = backend_entry(fake_backend, timeouts={"read": READ_TIMEOUT, "connect": 1.0})
    with ProxyServer(fake_config(fake_backend, backends=[entry])) as server:
        yield server


def still_serving(server: ProxyServer, fake: FakeBackend) -> None:
    fake.script = lambda body: FakeReply()
    response = chat(server, {"model": "fake-model", "messages": user()})
    assert response.status_code == 200, response.text
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=10,
                      json={"model": "fake-model", "messages": user(), "stream": True}) as streamed:
        assert streamed.status_code == 200
        assert streamed.read().decode().rstrip().endswith("data: [DONE]")


def streamed_error(response: httpx.Response) -> dict[str, Any]:
    """A stream that started (200) and ended in an OpenAI-shaped error event, then [DONE]; returns the error."""
    assert response.status_code == 200, response.text
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    payload = json.loads(events[-2].removeprefix("data: "))
    validate_schema(payload, "ErrorResponse")
    for event in events[:-2]:  # what came before is whole, valid events
        assert event.startswith("data: {") and json.loads(event[6:])
    return payload["error"]


# ---- the faults, by what the fake does; a script answers stream and non-stream calls alike ----

def script(fault: str) -> Callable[[dict[str, Any]], FakeReply]:
    def reply(body: dict[str, Any]) -> FakeReply:
        streaming = bool(body.get("stream"))
        return {
            "reset mid-body": FakeReply(texts=["one two three four"], fail_after_chunks=2, reset_mid_body=True),
            "slow first byte": FakeReply(delay=READ_TIMEOUT * 3),
            "5xx": FakeReply(status=500, error={"error": {"message": "engine fell over", "type": "server_error"}}),
            "429 with Retry-After": FakeReply(status=429, headers={"Retry-After": "3"},
                                              error={"error": {"message": "busy", "type": "rate_limit_error"}}),
            "non-JSON body": FakeReply(raw_stream=b"data: <html>oops</html>\n\ndata: [DONE]\n\n") if streaming
            else FakeReply(raw_body=b"<html>oops</html>"),
            "truncated SSE": FakeReply(texts=["one two three four"], truncate_after_chunks=2),
            "wrong shape": FakeReply(raw_stream=b'data: {"id": "x", "object": "chat.completion.chunk"}\n\n'
                                                b"data: [DONE]\n\n") if streaming
            else FakeReply(raw_body=b'{"id": "x", "object": "chat.completion"}'),
        }[fault]

    return reply


# fault -> (status, error code) for a plain request; None: the backend's own status and code pass through
PLAIN = {
    "reset mid-body": (502, "backend_unreachable"),
    "slow first byte": (504, "backend_timeout"),
    "5xx": (500, None),
    "429 with Retry-After": (429, None),
    "non-JSON body": (502, "backend_invalid_response"),
    "wrong shape": (502, "backend_invalid_response"),
}
# fault -> (status before the stream, error code): status 200 means the error comes as an event in the stream
STREAMED = {
    "reset mid-body": (200, "backend_unreachable"),
    "slow first byte": (504, "backend_timeout"),
    "5xx": (500, None),
    "429 with Retry-After": (429, None),
    "non-JSON body": (200, "backend_invalid_response"),
    "truncated SSE": (200, "backend_unreachable"),
    "wrong shape": (200, "backend_invalid_response"),
}


@pytest.mark.parametrize("fault", PLAIN)
def test_pass_through(proxy, fake, leak_check, fault):
    leak_check(proxy)
    fake.script = script(fault)
    response = chat(proxy, {"model": "fake-model", "messages": user()})
    status, code = PLAIN[fault]
    error = assert_openai_error(response, status, code=code)
    if fault == "429 with Retry-After":
        assert response.headers["retry-after"] == "3"
    assert "fake" in error["message"] or code is None  # the proxy's own errors name the backend
    still_serving(proxy, fake)


@pytest.mark.parametrize("fault", STREAMED)
def test_pass_through_streaming(proxy, fake, leak_check, fault):
    leak_check(proxy)
    fake.script = script(fault)
    response = chat(proxy, {"model": "fake-model", "messages": user(), "stream": True})
    status, code = STREAMED[fault]
    if status == 200:
        error = streamed_error(response)
        assert error["code"] == code and "fake" in error["message"]
    else:
        assert_openai_error(response, status, code=code)
    still_serving(proxy, fake)


STRATEGY_FAULTS = ["reset mid-body", "slow first byte", "5xx", "429 with Retry-After", "non-JSON body", "wrong shape"]


@pytest.mark.parametrize("fault", STRATEGY_FAULTS)
def test_strategy(proxy, fake, leak_check, fault):
    leak_check(proxy)
    fake.script = script(fault)
    response = chat(proxy, {"model": "sc:n=4-fake-model", "messages": user(), "seed": 1})
    error = assert_openai_error(response, PLAIN[fault][0])
    assert response.headers["x-should-retry"] == "false"  # a retry would pay for the whole run again
    assert error["message"]
    assert len(fake.chat_requests()) == 4  # each sample once: no retries behind the client's back
    still_serving(proxy, fake)


@pytest.mark.parametrize("fault", STRATEGY_FAULTS)
def test_strategy_streaming(proxy, fake, leak_check, fault):
    leak_check(proxy)
    fake.script = script(fault)
    response = chat(proxy, {"model": "sc:n=4-fake-model", "messages": user(), "seed": 1, "stream": True})
    streamed_error(response)
    still_serving(proxy, fake)


@pytest.mark.parametrize("fault", ["reset mid-body", "truncated SSE", "non-JSON body", "wrong shape"])
def test_a_strategy_that_streams_from_the_backend(proxy, fake, leak_check, fault):
    """deepconf streams its online traces: a broken one is a failed trace; the warm-up's answer stands."""
    leak_check(proxy)
    faulty = script(fault)
    fake.script = lambda body: faulty(body) if body.get("stream") else FakeReply(texts=["It is 7"])
    response = chat(proxy, {"model": "deepconf:n=4,warmup=2,window=2-fake-model", "messages": user(), "seed": 1})
    assert response.status_code == 200, response.text
    details = response.json()["ttc"]["details"]
    assert details["answer"] == "7" and details["failed"] == 2
    still_serving(proxy, fake)
