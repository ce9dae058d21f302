"""The trace stores: each trace bounded in bytes, the in-memory store bounded in count, bytes and age, Redis's
traces expiring, and per-key ownership (another key's trace is absent: 404) on both stores."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from ttc_proxy.proxy.traces import MemoryTraceStore, Trace
from ttc_proxy.proxy.trace_store_redis import RedisTraceStore, display_url
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, user
from tests.redis_server import RedisServer, redis_server_or_skip


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_or_skip()


def big_trace(nodes: int, text_chars: int = 2000, owner: str | None = None) -> Trace:
    trace = Trace("sc", owner=owner)
    for i in range(nodes):
        trace.add(0, f"sample {i}", "call", text="x" * text_chars, seed=i)
    trace.update(0, status="ok", details={"votes": {"42": nodes}})
    return trace


# ---- one trace's byte bound ----

def test_a_trace_over_its_byte_bound_keeps_the_root_and_the_first_nodes_that_fit():
    trace = big_trace(64)  # 64 samples of 2,000 characters: ~130 kB
    body = trace.encode(16_384)
    assert len(body) <= 16_384
    decoded = json.loads(body)
    root, *kept = decoded["nodes"]
    assert decoded["id"] == trace.id and root["status"] == "ok" and root["details"] == {"votes": {"42": 64}}
    assert root["truncated"] is True and root["nodes_dropped"] == 64 - len(kept)
    assert [n["id"] for n in kept] == list(range(1, len(kept) + 1)) and 5 <= len(kept) < 64


def test_a_trace_within_its_bound_is_whole_and_a_huge_root_is_cut_to_its_tree_fields():
    small = big_trace(3, text_chars=10)
    assert json.loads(small.encode(4096)) == small.to_dict()
    huge_root = Trace("sc")
    huge_root.update(0, status="ok", details={"x": "y" * 100_000})
    huge_root.add(0, "call", "call")
    decoded = json.loads(huge_root.encode(4096))
    assert decoded["nodes"] == [{"id": 0, "parent": None, "label": "sc", "kind": "run", "status": "ok",
                                 "truncated": True, "nodes_dropped": 1}]


def test_non_finite_numbers_in_a_trace_are_stored_as_null():
    trace = Trace("deepconf")
    trace.add(0, "call", "call", confidence=float("nan"), logprob=float("-inf"))
    node = json.loads(trace.encode(4096))["nodes"][1]
    assert node["confidence"] is None and node["logprob"] is None


# ---- the in-memory store: count, bytes, age, owner ----

async def test_the_memory_store_is_bounded_in_bytes_as_well_as_count():
    store = MemoryTraceStore(1000, max_total_bytes=100_000, max_trace_bytes=30_000)
    traces = [big_trace(10) for _ in range(6)]  # ~20 kB each
    for trace in traces:
        await store.save(trace)
    assert store.total_bytes <= 100_000
    assert await store.get(traces[0].id, None) is None  # the oldest went first
    assert await store.get(traces[-1].id, None) is not None
    assert store.total_bytes == sum(len(trace.encode(30_000)) for trace in traces[-len(store):])


async def test_a_trace_saved_again_replaces_its_snapshot_and_counts_once():
    store = MemoryTraceStore(10)
    trace = big_trace(1, text_chars=10)
    await store.save(trace)
    trace.update(0, status="cancelled")
    await store.save(trace)
    assert len(store) == 1 and store.total_bytes == len(trace.encode(store.max_trace_bytes))
    assert json.loads(await store.get(trace.id, None) or b"")["nodes"][0]["status"] == "cancelled"


async def test_memory_traces_expire():
    store = MemoryTraceStore(10, ttl_seconds=0.2)
    trace = big_trace(1, text_chars=10)
    await store.save(trace)
    assert await store.get(trace.id, None) is not None
    await asyncio.sleep(0.3)
    assert await store.get(trace.id, None) is None and len(store) == 0 and store.total_bytes == 0


async def test_memory_traces_belong_to_their_key():
    store = MemoryTraceStore(10)
    trace = big_trace(1, owner="key-a")
    await store.save(trace)
    assert await store.get(trace.id, "key-a") is not None
    assert await store.get(trace.id, "key-b") is None
    assert await store.get(trace.id, None) is None


# ---- the Redis store ----

async def test_redis_store_keeps_bounded_traces_with_an_expiry(redis_server):
    store = RedisTraceStore(redis_server.url, max_trace_bytes=8192, ttl_seconds=0.5)
    await store.start()
    try:
        trace = big_trace(64, owner="key-a")
        await store.save(trace)
        body = await store.get(trace.id, "key-a")
        assert body is not None and len(body) <= 8192 and json.loads(body)["nodes"][0]["truncated"] is True
        assert await store.get(trace.id, "key-b") is None and await store.get(trace.id, None) is None
        ttl_ms = redis.Redis(port=redis_server.port).pttl(f"ttc:trace:{trace.id}")
        assert 0 < ttl_ms <= 500
        await asyncio.sleep(0.7)
        assert await store.get(trace.id, "key-a") is None
    finally:
        await store.aclose()


async def test_redis_store_writes_snapshots_in_order_even_when_the_saver_is_cancelled(redis_server):
    store = RedisTraceStore(redis_server.url, max_trace_bytes=65536, ttl_seconds=60)
    await store.start()
    try:
        trace = big_trace(1, text_chars=10)
        first = asyncio.create_task(store.save(trace))
        await asyncio.sleep(0)  # queued, not yet written
        first.cancel()
        trace.update(0, status="final")
        await store.save(trace)
        assert json.loads(await store.get(trace.id, None) or b"")["nodes"][0]["status"] == "final"
    finally:
        await store.aclose()


async def test_an_unreachable_redis_stops_the_proxy_at_start_and_hides_its_password():
    from ttc_proxy.proxy.backends.engine import free_port
    from ttc_proxy.proxy.traces import TraceStoreUnavailable

    url = f"redis://user:s3cret@127.0.0.1:{free_port('127.0.0.1')}/0"
    store = RedisTraceStore(url, max_trace_bytes=4096, ttl_seconds=1, timeout_seconds=1)
    with pytest.raises(TraceStoreUnavailable) as caught:
        await store.start()
    assert "s3cret" not in caught.value.message and "127.0.0.1" in caught.value.message
    assert display_url(url) == url.replace("s3cret", "***")


# ---- through the proxy: ownership on both stores, and the bound ----

KEYS = ["key-one", "key-two"]


@pytest.fixture(params=["memory", "redis"])
def locked_proxy(request, fake_backend: FakeBackend, fake: FakeBackend) -> Iterator[ProxyServer]:
    store = "memory" if request.param == "memory" else request.getfixturevalue("redis_server").url
    config = fake_config(fake_backend, server={"api_keys": KEYS, "trace_store": store, "trace_max_bytes": 8192})
    with ProxyServer(config) as server:
        yield server


def _sdk(server: ProxyServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_a_trace_is_read_only_with_the_key_that_made_it(locked_proxy, fake):
    completion = _sdk(locked_proxy, "key-one").chat.completions.create(model="sc:n=2-fake-model", messages=user())
    trace_id = completion.model_extra["ttc"]["trace_id"]
    url = f"{locked_proxy.url}/v1/traces/{trace_id}"
    mine = httpx.get(url, headers={"authorization": "Bearer key-one"})
    assert mine.status_code == 200 and mine.json()["id"] == trace_id and mine.json()["nodes"][0]["status"] == "ok"
    theirs = assert_openai_error(httpx.get(url, headers={"authorization": "Bearer key-two"}), 404, param="trace_id")
    unknown = assert_openai_error(httpx.get(f"{locked_proxy.url}/v1/traces/trace-0000000000000000",
                                            headers={"authorization": "Bearer key-two"}), 404, param="trace_id")
    assert theirs["code"] == unknown["code"] == "trace_not_found"  # as if absent: nothing tells it exists
    assert_openai_error(httpx.get(url), 401)


def test_a_strategy_trace_through_the_proxy_is_cut_to_the_configured_bytes(locked_proxy, fake):
    fake.reset(lambda request: FakeReply(texts=["The answer is 42. " + "so " * 1000]))
    completion = _sdk(locked_proxy, "key-two").chat.completions.create(model="sc:n=8-fake-model", messages=user())
    trace = httpx.get(f"{locked_proxy.url}/v1/traces/{completion.model_extra['ttc']['trace_id']}",
                      headers={"authorization": "Bearer key-two"})
    assert trace.status_code == 200 and len(trace.content) <= 8192
    assert trace.json()["nodes"][0]["truncated"] is True  # eight 3,000-character samples do not fit


def test_without_keys_every_client_reads_every_trace(proxy, client, fake):
    completion = client.chat.completions.create(model="sc:n=2-fake-model", messages=user())
    response = httpx.get(f"{proxy.url}/v1/traces/{completion.model_extra['ttc']['trace_id']}")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"


async def test_a_redis_gone_after_start_loses_traces_quietly_and_reading_is_a_503():
    import shutil

    from ttc_proxy.proxy.traces import TraceStoreUnavailable

    binary = shutil.which("redis-server")
    if binary is None:
        next(redis_server_or_skip())  # skips (or fails under CI=true) naming it
    server = RedisServer(binary)  # this test's own: it is stopped mid-test
    server.wait_ready()
    store = RedisTraceStore(server.url, max_trace_bytes=4096, ttl_seconds=60, timeout_seconds=1)
    try:
        await store.start()
        server.stop()
        trace = big_trace(1, text_chars=10)
        await asyncio.wait_for(store.save(trace), 10)  # logged, not raised: the run it records goes on
        with pytest.raises(TraceStoreUnavailable) as caught:
            await store.get(trace.id, None)
        assert caught.value.status_code == 503 and caught.value.code == "trace_store_unavailable"
    finally:
        await store.aclose(flush_seconds=1)
        if server.process.poll() is None:
            server.stop()


async def test_a_slow_redis_holds_a_save_up_for_a_bounded_time(redis_server):
    """A Redis that answers late (CLIENT PAUSE holds every write for 1 s) delays a run's save by at most
    save_wait_seconds; the snapshot is written when Redis answers."""
    import time

    import redis.asyncio as aioredis

    store = RedisTraceStore(redis_server.url, max_trace_bytes=65536, ttl_seconds=60, save_wait_seconds=0.2)
    await store.start()
    pauser = aioredis.from_url(redis_server.url)
    try:
        trace = big_trace(1, text_chars=10)
        await pauser.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
        started = time.monotonic()
        await store.save(trace)
        assert time.monotonic() - started < 0.6
        await asyncio.sleep(1.2)
        assert await store.get(trace.id, None) is not None
    finally:
        await pauser.aclose()
        await store.aclose()
