"""A client that goes away takes every backend request made for it down with it, within ~100 ms."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import async_client, chat, raw_request, user, wait_until

# A disconnect must reach every backend request within 100 ms; polling and thread scheduling get a little
# slack on top, but far less than a second.
ABORT_WITHIN = 0.15


@pytest.fixture(autouse=True)
def nothing_left_in_flight(fake: FakeBackend):
    yield
    wait_until(lambda: fake.in_flight == 0, timeout=5)


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}; got {data!r}")
        data += chunk
    return data


def disconnect_and_time_aborts(sock: socket.socket, fake: FakeBackend, expected_requests: int) -> float:
    """Close the client connection; return how long until every backend request was aborted."""
    sock.close()
    closed_at = time.monotonic()
    wait_until(lambda: fake.in_flight == 0 and all(r.aborted for r in fake.requests), timeout=3)
    elapsed = time.monotonic() - closed_at
    assert len(fake.requests) == expected_requests
    assert all(r.aborted and not r.finished for r in fake.requests)
    return elapsed


def test_non_streaming_strategy(proxy, fake):
    fake.script = lambda body: FakeReply(delay=5.0)
    sock = raw_request(proxy, {"model": "sc:n=8-fake-model", "messages": user()})
    # Two n=4 calls; each costs all 4 slots, so one is at the backend and one waits in the proxy's queue.
    wait_until(lambda: fake.in_flight == 1)
    assert disconnect_and_time_aborts(sock, fake, 1) < ABORT_WITHIN
    time.sleep(0.1)
    assert len(fake.requests) == 1  # the queued call was never sent


def test_non_streaming_strategy_with_queued_calls(proxy, fake):
    fake.script = lambda body: FakeReply(delay=5.0)
    sock = raw_request(proxy, {"model": "sc:n=8-fake-model", "messages": user(), "seed": 5})
    wait_until(lambda: fake.in_flight == 4)  # 4 slots: 4 calls in flight, 4 waiting in the proxy's queue
    assert disconnect_and_time_aborts(sock, fake, 4) < ABORT_WITHIN
    time.sleep(0.1)
    assert len(fake.requests) == 4  # the queued calls were never sent


def test_streaming_strategy(proxy, fake):
    fake.script = lambda body: FakeReply(delay=5.0)
    sock = raw_request(proxy, {"model": "sc:n=8-fake-model", "messages": user(), "stream": True, "seed": 1})
    read_until(sock, b"drawing 8 samples")  # the stream has started
    wait_until(lambda: fake.in_flight == 4)
    assert disconnect_and_time_aborts(sock, fake, 4) < ABORT_WITHIN


def test_streaming_pass_through(proxy, fake):
    fake.script = lambda body: FakeReply(texts=["one two three four five six"], chunk_delay=1.0)
    sock = raw_request(proxy, {"model": "fake-model", "messages": user(), "stream": True})
    read_until(sock, b'"one"')  # the first content chunk was relayed
    assert disconnect_and_time_aborts(sock, fake, 1) < ABORT_WITHIN


def test_streaming_pass_through_before_first_byte(proxy, fake):
    fake.script = lambda body: FakeReply(delay=5.0)
    sock = raw_request(proxy, {"model": "fake-model", "messages": user(), "stream": True})
    wait_until(lambda: fake.in_flight == 1)
    assert disconnect_and_time_aborts(sock, fake, 1) < ABORT_WITHIN


def test_non_streaming_pass_through(proxy, fake):
    fake.script = lambda body: FakeReply(delay=5.0)
    sock = raw_request(proxy, {"model": "fake-model", "messages": user()})
    wait_until(lambda: fake.in_flight == 1)
    assert disconnect_and_time_aborts(sock, fake, 1) < ABORT_WITHIN


def test_completions_pass_through(proxy, fake):
    fake.script = lambda body: FakeReply(delay=5.0)
    sock = raw_request(proxy, {"model": "fake-model", "prompt": "hi"}, path="/v1/completions")
    wait_until(lambda: fake.in_flight == 1)
    assert disconnect_and_time_aborts(sock, fake, 1) < ABORT_WITHIN


async def test_async_sdk_caller_giving_up(proxy, fake):
    fake.script = lambda body: FakeReply(delay=5.0)
    client = async_client(proxy)
    with pytest.raises((asyncio.TimeoutError, TimeoutError)):
        await asyncio.wait_for(client.chat.completions.create(model="sc:n=4-fake-model", messages=user(),
                                                              seed=9), timeout=0.3)
    gave_up_at = time.monotonic()
    while not (fake.in_flight == 0 and fake.requests and all(r.aborted for r in fake.requests)):
        assert time.monotonic() - gave_up_at < 3
        await asyncio.sleep(0.002)
    assert time.monotonic() - gave_up_at < ABORT_WITHIN
    assert len(fake.requests) == 4
    await client.close()


def test_proxy_serves_after_disconnects(proxy, fake):
    fake.script = lambda body: FakeReply(delay=5.0)
    socks = [raw_request(proxy, {"model": "sc:n=2-fake-model", "messages": user(), "seed": i}) for i in range(2)]
    socks.append(raw_request(proxy, {"model": "fake-model", "messages": user()}))
    wait_until(lambda: fake.in_flight == 4)
    socks.append(raw_request(proxy, {"model": "fake-model", "messages": user()}))  # queued in the proxy
    time.sleep(0.05)
    for sock in socks:
        sock.close()
    wait_until(lambda: fake.in_flight == 0)
    fake.script = lambda body: FakeReply()
    assert chat(proxy, {"model": "sc:n=4-fake-model", "messages": user()}).status_code == 200
    health = httpx.get(proxy.url + "/health").json()["backends"]["fake"]
    assert health["in_flight"] == 0 and health["queued"] == 0  # every slot was given back
