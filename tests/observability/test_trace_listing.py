"""GET /v1/traces: a key's latest strategy runs, newest first, from the in-memory store and from Redis (shared by
replicas); never another key's; the limit checked."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend

from tests.helpers import ProxyServer, assert_openai_error, fake_config, sync_client, user
from tests.redis_server import RedisServer, redis_server_or_skip


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_or_skip()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_key_lists_its_own_runs_newest_first(fake: FakeBackend, store: str, request: pytest.FixtureRequest) -> None:
    trace_store = "memory" if store == "memory" else request.getfixturevalue("redis_server").url
    config = fake_config(fake, server={"api_keys": ["key-a", "key-b"], "trace_store": trace_store})
    with ProxyServer(config) as server:
        ids = []
        with sync_client(server, api_key="key-a") as client:
            for model in ("sc:n=2-fake-model", "bon:n=2-fake-model", "cot-fake-model"):
                ids.append(client.chat.completions.create(model=model, messages=user()).model_extra["ttc"]["trace_id"])
            client.chat.completions.create(model="fake-model", messages=user())  # pass-through: no trace
        with sync_client(server, api_key="key-b") as client:
            other = client.chat.completions.create(model="sc:n=2-fake-model", messages=user())
        mine = httpx.get(server.url + "/v1/traces", headers={"authorization": "Bearer key-a"}).json()
        two = httpx.get(server.url + "/v1/traces?limit=2", headers={"authorization": "Bearer key-a"}).json()
        theirs = httpx.get(server.url + "/v1/traces", headers={"authorization": "Bearer key-b"}).json()
    assert mine["object"] == "list"
    assert [t["id"] for t in mine["data"]] == ids[::-1]
    assert [t["nodes"][0]["label"] for t in mine["data"]] == ["cot", "bon", "sc"]
    assert all(t["nodes"][0]["status"] == "ok" for t in mine["data"])
    assert [t["id"] for t in two["data"]] == ids[::-1][:2]
    assert [t["id"] for t in theirs["data"]] == [other.model_extra["ttc"]["trace_id"]]


@pytest.mark.parametrize("limit", ["0", "201", "ten", "-1", "1.5"])
def test_the_limit_is_checked(fake: FakeBackend, limit: str) -> None:
    with ProxyServer(fake_config(fake)) as server:
        response = httpx.get(f"{server.url}/v1/traces", params={"limit": limit})
    assert_openai_error(response, 400, param="limit", code="invalid_value")


def test_listing_needs_a_key_when_keys_are_configured(fake: FakeBackend) -> None:
    with ProxyServer(fake_config(fake, server={"api_keys": ["key-a"]})) as server:
        response = httpx.get(f"{server.url}/v1/traces")
    assert response.status_code == 401
