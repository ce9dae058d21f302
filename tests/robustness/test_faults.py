"""Faults: a scripted backend misbehaves in every way we know of. Each request ends as an OpenAI-style error (after a
stream has started: an error event, then `data: [DONE]`), the proxy keeps serving, and nothing leaks: its asyncio
tasks, the backend connections it holds and the scheduler's slots all return to where they were."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from ttc_proxy.proxy.app import ProxyState
from ttc_proxy.proxy.backends.backend import connections_in_use
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import (
    ProxyServer,
    assert_openai_error,
    backend_entry,
    chat,
    closed_port,
    raw_request,
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


@contextmanager
def nothing_leaks(server: ProxyServer) -> Iterator[None]:
    """Around a fault: afterwards no slot is held or queued, no backend connection held, and the proxy's loop has
    no more tasks than before."""
    idle = {"slots": 0, "queued": 0, "connections": 0}
    wait_until(lambda: {k: v for k, v in busy(server).items() if k != "tasks"} == idle, timeout=5, interval=0.05)
    before = busy(server)
    yield
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
def test_pass_through(proxy, fake, fault):
    fake.script = script(fault)
    with nothing_leaks(proxy):
        response = chat(proxy, {"model": "fake-model", "messages": user()})
    status, code = PLAIN[fault]
    error = assert_openai_error(response, status, code=code)
    if fault == "429 with Retry-After":
        assert response.headers["retry-after"] == "3"
    assert "fake" in error["message"] or code is None  # the proxy's own errors name the backend
    still_serving(proxy, fake)


@pytest.mark.parametrize("fault", STREAMED)
def test_pass_through_streaming(proxy, fake, fault):
    fake.script = script(fault)
    with nothing_leaks(proxy):
        response = chat(proxy, {"model": "fake-model", "messages": user(), "stream": True})
    status, code = STREAMED[fault]
    if status == 200:
        error = streamed_error(response)
        assert error["code"] == code and "fake" in error["message"]
    else:
        assert_openai_error(response, status, code=code)
    still_serving(proxy, fake)


STRATEGY_FAULTS = ["reset mid-body", "slow first byte", "5xx", "429 with Retry-After", "non-JSON body", "wrong shape"]


@pytest.mark.parametrize("strategy", ["sc:n=4", "bon:n=4"])
@pytest.mark.parametrize("fault", STRATEGY_FAULTS)
def test_strategy(proxy, fake, fault, strategy):
    fake.script = script(fault)
    with nothing_leaks(proxy):
        response = chat(proxy, {"model": f"{strategy}-fake-model", "messages": user(), "seed": 1})
    error = assert_openai_error(response, PLAIN[fault][0])
    assert response.headers["x-should-retry"] == "false"  # a retry would pay for the whole run again
    assert error["message"]
    assert len(fake.chat_requests()) == 4  # each sample once: no retries behind the client's back
    still_serving(proxy, fake)


@pytest.mark.parametrize("strategy", ["sc:n=4", "bon:n=4"])
@pytest.mark.parametrize("fault", STRATEGY_FAULTS)
def test_strategy_streaming(proxy, fake, fault, strategy):
    fake.script = script(fault)
    with nothing_leaks(proxy):
        response = chat(proxy, {"model": f"{strategy}-fake-model", "messages": user(), "seed": 1, "stream": True})
    streamed_error(response)
    still_serving(proxy, fake)


@pytest.mark.parametrize("fault", ["reset mid-body", "truncated SSE", "non-JSON body", "wrong shape"])
def test_a_strategy_that_streams_from_the_backend(proxy, fake, fault):
    """deepconf streams its online traces: a broken one is a failed trace; the warm-up's answer stands."""
    faulty = script(fault)
    fake.script = lambda body: faulty(body) if body.get("stream") else FakeReply(texts=["It is 7"])
    with nothing_leaks(proxy):
        response = chat(proxy, {"model": "deepconf:n=4,warmup=2,window=2-fake-model", "messages": user(),
                                "seed": 1})
    assert response.status_code == 200, response.text
    details = response.json()["ttc"]["details"]
    assert details["answer"] == "7" and details["failed"] == 2
    still_serving(proxy, fake)


# ---- no backend at all; a backend that stops reading ----

def test_connection_refused(fake_backend):
    entry = {"name": "gone", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
             "models": ["fake-model"], "connect_retries": {"attempts": 2, "backoff": 0.01}}
    with ProxyServer(fake_config(fake_backend, backends=[entry])) as server, nothing_leaks(server):
        for body in ({"model": "fake-model", "messages": user()},
                     {"model": "fake-model", "messages": user(), "stream": True},
                     {"model": "sc:n=4-fake-model", "messages": user(), "seed": 1},
                     {"model": "sc:n=4-fake-model", "messages": user(), "seed": 1, "stream": True}):
            response = chat(server, body)
            if body["model"].startswith("sc") and body.get("stream"):
                error = streamed_error(response)
                assert error["code"] == "backend_unreachable"
            else:
                error = assert_openai_error(response, 502, code="backend_unreachable")
            assert "gone" in error["message"]
        assert httpx.get(server.url + "/health").status_code == 200


def test_a_backend_that_stops_reading():
    fake = FakeBackend().start_in_thread()
    fake.stop_reading = True
    try:
        entry = backend_entry(fake, models=["fake-model"], timeouts={"read": READ_TIMEOUT, "connect": 0.5})
        config = fake_config(fake, backends=[entry], strategies={"budget": {"max_total_tokens": 10_000_000}})
        with ProxyServer(config) as server, nothing_leaks(server):
            big = "x" * (4 << 20)  # far more than the socket buffers hold: the proxy's write blocks
            for model in ("fake-model", "sc:n=2-fake-model"):
                started = time.monotonic()
                response = chat(server, {"model": model, "messages": user(big), "seed": 1})
                assert_openai_error(response, 504, code="backend_timeout")
                assert time.monotonic() - started < READ_TIMEOUT + 2
    finally:
        fake.stop_thread()


# ---- retries where they are safe: a connection that could not be made ----

def test_connect_errors_are_retried_with_backoff_until_the_backend_is_there():
    port = closed_port()
    late = FakeBackend()
    entry = {"name": "late", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{port}/v1", "models": ["m"],
             "connect_retries": {"attempts": 5, "backoff": 0.1}}
    with ProxyServer(fake_config(late, backends=[entry])) as server, nothing_leaks(server):
        timer = threading.Timer(0.3, lambda: late.start_in_thread(port))
        timer.start()
        try:
            started = time.monotonic()
            response = chat(server, {"model": "m", "messages": user()})
            took = time.monotonic() - started
        finally:
            timer.join()
        try:
            assert response.status_code == 200, response.text
            assert 0.3 <= took < 3.5  # waited for it: 0.05-0.15, 0.1-0.3, 0.2-0.6 s ... before the attempts
            assert len(late.chat_requests()) == 1  # sent once: the refused attempts sent nothing
        finally:
            late.stop_thread()


def test_retry_delays_back_off_with_jitter(monkeypatch):
    import random

    from ttc_proxy.proxy.backends.backend import retry_delay

    random.seed(7)
    delays = [[retry_delay(0.1, retry) for retry in range(4)] for _ in range(200)]
    for retry in range(4):
        column = [d[retry] for d in delays]
        assert 0.05 * 2 ** retry <= min(column) and max(column) <= 0.15 * 2 ** retry
        assert len(set(column)) > 150  # jittered: calls refused together do not come back together


def test_an_http_error_is_not_retried(proxy, fake):
    fake.script = lambda body: FakeReply(status=503, error={"error": {"message": "loading", "type": "x"}})
    assert_openai_error(chat(proxy, {"model": "fake-model", "messages": user()}), 503)
    assert len(fake.chat_requests()) == 1  # it reached the engine: sending it again is the client's call


# ---- health checks: down after failed checks (503 naming it), up when it recovers ----

def test_a_backend_failing_health_checks_is_down_then_up_again():
    fake = FakeBackend().start_in_thread()
    port = fake.port
    entry = {**backend_entry(fake, models=["fake-model"]), "health_check": {"interval": 0.2, "failures": 2},
             "connect_retries": {"attempts": 0}}
    with ProxyServer(fake_config(fake, backends=[entry])) as server, nothing_leaks(server):
        backend = state_of(server).backends["fake"]
        assert chat(server, {"model": "fake-model", "messages": user()}).status_code == 200
        fake.stop_thread()
        wait_until(lambda: backend.down, timeout=3)
        for body in ({"model": "fake-model", "messages": user()},
                     {"model": "fake-model", "messages": user(), "stream": True},
                     {"model": "sc:n=2-fake-model", "messages": user()}):
            response = chat(server, body)
            error = assert_openai_error(response, 503, code="backend_down")
            assert "fake" in error["message"] and response.headers["retry-after"] == "1"
        back = FakeBackend().start_in_thread(port)
        try:
            wait_until(lambda: not backend.down, timeout=3)
            response = chat(server, {"model": "fake-model", "messages": user()})
            assert response.status_code == 200, response.text
            assert len(back.chat_requests()) == 1
        finally:
            back.stop_thread()


def test_a_judge_model_on_a_backend_that_is_down_is_a_503_not_a_400(fake_backend):
    judge = FakeBackend(model="judge").start_in_thread()
    entries = [backend_entry(fake_backend, models=["fake-model"]),
               {"name": "judges", "kind": "llama_cpp", "base_url": judge.base_url, "models": ["judge"],
                "health_check": {"interval": 0.2, "failures": 1}}]
    with ProxyServer(fake_config(fake_backend, backends=entries)) as server:
        judge.stop_thread()
        wait_until(lambda: state_of(server).backends["judges"].down, timeout=3)
        response = chat(server, {"model": "bon:n=2,select=judge,judge_model=judge-fake-model", "messages": user()})
        error = assert_openai_error(response, 503, code="backend_down")
        assert "judges" in error["message"]


@pytest.mark.parametrize(("fault", "stream"), [
    *((fault, False) for fault in ("reset mid-body", "non-JSON body", "wrong shape", "5xx")),
    *((fault, True) for fault in ("reset mid-body", "non-JSON body", "wrong shape", "5xx", "truncated SSE")),
])
def test_pass_through_drawn_by_several_calls(proxy, fake, fault, stream):
    """n above the engine's cap (the fake takes 4) is drawn by concurrent calls: a fault in any ends the request."""
    fake.script = script(fault)
    with nothing_leaks(proxy):
        response = chat(proxy, {"model": "fake-model", "messages": user(), "n": 6, "stream": stream})
    status, code = (STREAMED if stream else PLAIN)[fault]
    if status == 200:
        error = streamed_error(response)
        assert error["code"] == code and "fake" in error["message"]
    else:
        assert_openai_error(response, status, code=code)
    still_serving(proxy, fake)


@pytest.mark.parametrize("model", ["fake-model", "sc:n=4-fake-model", "deepconf:n=4,warmup=2,window=2-fake-model"])
def test_a_client_leaving_a_stalled_stream_leaves_nothing_behind(proxy, fake, model):
    fake.script = lambda body: FakeReply(texts=["one two three four five six"], chunk_delay=0.3, delay=0.2)
    with nothing_leaks(proxy):
        sock = raw_request(proxy, {"model": model, "messages": user(), "seed": 1, "stream": True})
        sock.settimeout(5)
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        wait_until(lambda: any(not r.finished for r in fake.chat_requests()), timeout=3)
        sock.close()
    wait_until(lambda: all(r.finished or r.aborted for r in fake.chat_requests()), timeout=3)
    assert any(r.aborted for r in fake.chat_requests())  # the backend saw its calls end
    still_serving(proxy, fake)


def test_health_shows_a_backend_down_to_key_holders(fake_backend):
    gone = {"name": "gone", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
            "models": ["other"], "health_check": {"interval": 0.1, "failures": 1}}
    with ProxyServer(fake_config(fake_backend, backends=[backend_entry(fake_backend), gone])) as server:
        wait_until(lambda: httpx.get(server.url + "/health").json()["backends"]["gone"]["down"], timeout=3)
        assert httpx.get(server.url + "/health").json()["backends"]["fake"]["down"] is False


def test_a_backend_whose_connections_hang_is_failed_over_like_one_that_refuses(fake_backend):
    """A host that drops packets (here: a listening socket whose accept queue is full, so the kernel drops further
    SYNs) is a connect timeout: nothing was sent, so the request goes to the next backend serving the model."""
    import socket

    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(4):  # fill the accept queue: later connects hang
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(blackhole.getsockname())
        fillers.append(filler)
    time.sleep(0.2)
    hanging = {"name": "hanging", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{blackhole.getsockname()[1]}/v1",
               "models": ["fake-model"], "timeouts": {"connect": 0.3}, "connect_retries": {"attempts": 0},
               "health_check": {"interval": 0}}
    fallback = {**backend_entry(fake_backend, models=["fake-model"]), "name": "fallback"}
    try:
        with ProxyServer(fake_config(fake_backend, backends=[hanging, fallback])) as server:
            fake_backend.reset()
            started = time.monotonic()
            response = chat(server, {"model": "fake-model", "messages": user()})
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 3
            assert len(fake_backend.chat_requests()) == 1
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


def test_a_backend_down_is_sent_nothing_while_another_serves_the_model(fake_backend):
    """Config order puts the down one first, and the other was just passed over after a refused connection (a
    tie on health): the request still goes to the one that is not down."""
    down = {"name": "down-one", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
            "models": ["fake-model"], "health_check": {"interval": 0.1, "failures": 1},
            "connect_retries": {"attempts": 0}}
    up = {**backend_entry(fake_backend, models=["fake-model"]), "health_check": {"interval": 0}}
    with ProxyServer(fake_config(fake_backend, backends=[down, up])) as server:
        state = state_of(server)
        wait_until(lambda: state.backends["down-one"].down, timeout=3)
        state.backends["fake"].mark_down()  # passed over for a moment, not down
        fake_backend.reset()
        for body in ({"model": "fake-model", "messages": user()}, {"model": "sc:n=2-fake-model", "messages": user()}):
            assert chat(server, body).status_code == 200
        assert len(fake_backend.chat_requests()) == 2  # pass-through, and sc drawing its 2 in one call
