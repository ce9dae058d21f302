"""The proxy's own API keys, the backend's key, and x-request-id."""

from __future__ import annotations

import json
import re
import socket

import httpx
import openai
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, sync_client, user

KEYS = ["proxy-key-1", "proxy-key-2"]


@pytest.fixture(scope="module")
def locked(fake_backend: FakeBackend):
    mp = pytest.MonkeyPatch()
    mp.setenv("FAKE_BACKEND_KEY", "backend-secret")
    mp.delenv("TTC_PROXY_API_KEYS", raising=False)
    config = fake_config(fake_backend, server={"api_keys": KEYS},
                         backends=[backend_entry(fake_backend, api_key_env="FAKE_BACKEND_KEY")])
    with ProxyServer(config) as server:
        yield server
    mp.undo()


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}, {"authorization": "proxy-key-1"},
                                     {"authorization": "Basic proxy-key-1"}, {"api-key": "nope"}])
def test_missing_or_wrong_key_is_401(locked, fake, headers):
    body = {"model": "fake-model", "messages": user()}
    error = assert_openai_error(chat(locked, body, headers=headers), 401, code="invalid_api_key")
    assert error["type"] == "authentication_error"
    assert_openai_error(chat(locked, {**body, "model": "sc-fake-model"}, headers=headers), 401)
    assert_openai_error(httpx.get(locked.url + "/v1/models", headers=headers), 401)
    assert_openai_error(httpx.get(locked.url + "/v1/traces/trace-x", headers=headers), 401)
    assert fake.requests == []


def test_sdk_with_wrong_key(locked, fake):
    with pytest.raises(openai.AuthenticationError):
        sync_client(locked, api_key="wrong").chat.completions.create(model="fake-model", messages=user())


@pytest.mark.parametrize("key", KEYS)
def test_right_key_works(locked, fake, key):
    client = sync_client(locked, api_key=key)
    assert client.chat.completions.create(model="fake-model", messages=user()).choices[0].message.content
    completion = client.chat.completions.create(model="sc:n=2-fake-model", messages=user())
    assert completion.ttc["strategy"] == "sc"
    assert [m.id for m in client.models.list()][0] == "fake-model"
    assert httpx.get(f"{locked.url}/v1/traces/{completion.ttc['trace_id']}",
                     headers={"authorization": f"Bearer {key}"}).status_code == 200


def test_azure_style_api_key_header(locked, fake):
    assert chat(locked, {"model": "fake-model", "messages": user()}, headers={"api-key": KEYS[0]}).status_code == 200


def test_client_key_is_not_forwarded_backend_key_is(locked, fake):
    client = sync_client(locked, api_key=KEYS[0])
    client.chat.completions.create(model="fake-model", messages=user())
    client.chat.completions.create(model="sc:n=2-fake-model", messages=user(), seed=1)
    list(client.chat.completions.create(model="fake-model", messages=user(), stream=True))
    client.completions.create(model="fake-model", prompt="hi")
    assert len(fake.requests) == 5
    for request in fake.requests:
        assert request.headers["authorization"] == "Bearer backend-secret"
        assert KEYS[0] not in str(request.headers)


def test_no_backend_key_means_no_authorization(client, fake):
    # The default proxy's backend has no api_key_env: the client's key must not leak through instead.
    sync = openai.OpenAI(base_url=client.base_url, api_key="client-secret", max_retries=0)
    sync.chat.completions.create(model="fake-model", messages=user())
    sync.chat.completions.create(model="sc:n=2-fake-model", messages=user())
    assert len(fake.requests) == 2
    for request in fake.requests:
        assert "authorization" not in request.headers
        assert "client-secret" not in str(request.headers)


def test_keys_from_environment(fake_backend, fake, monkeypatch):
    monkeypatch.setenv("TTC_PROXY_API_KEYS", "env-key-a, env-key-b")
    with ProxyServer(fake_config(fake_backend)) as server:
        assert_openai_error(chat(server, {"model": "fake-model", "messages": user()}), 401)
        assert sync_client(server, api_key="env-key-b").chat.completions.create(
            model="fake-model", messages=user()).choices


@pytest.mark.parametrize("model", ["fake-model", "sc:n=3-fake-model"])
@pytest.mark.parametrize("stream", [False, True])
def test_request_id_is_passed_and_returned(proxy, fake, model, stream):
    response = chat(proxy, {"model": model, "messages": user(), "stream": stream},
                    headers={"x-request-id": "req-abc-123"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-abc-123"
    assert fake.chat_requests()
    assert all(r.headers.get("x-request-id") == "req-abc-123" for r in fake.chat_requests())


@pytest.mark.parametrize("model", ["fake-model", "sc:n=8-fake-model"])
def test_request_id_is_generated_and_returned(proxy, fake, model):
    response = chat(proxy, {"model": model, "messages": user()})
    generated = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert {r.headers.get("x-request-id") for r in fake.chat_requests()} == {generated}
    other = chat(proxy, {"model": model, "messages": user()}).headers["x-request-id"]
    assert other != generated


def test_request_id_on_completions_and_errors(proxy, fake):
    response = chat(proxy, {"model": "fake-model", "prompt": "x"}, path="/v1/completions",
                    headers={"x-request-id": "req-c"})
    assert response.headers["x-request-id"] == "req-c" and fake.requests[0].headers["x-request-id"] == "req-c"
    response = chat(proxy, {"model": "fake-model", "messages": []}, headers={"x-request-id": "req-bad"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "req-bad"


def test_sdk_exposes_request_id(client, fake):
    raw = client.chat.completions.with_raw_response.create(model="fake-model", messages=user(),
                                                           extra_headers={"x-request-id": "sdk-req"})
    assert raw.headers["x-request-id"] == "sdk-req"
    assert raw.parse().choices[0].message.content


@pytest.mark.parametrize("model", ["fake-model", "sc:n=2-fake-model"])
def test_unforwardable_request_id_is_replaced(proxy, fake, model):
    payload = json.dumps({"model": model, "messages": user()}).encode()
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: caf\xe9\r\n"
                     b"content-type: application/json\r\nconnection: close\r\n"
                     b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:300]
    assert json.loads(body)["choices"][0]["message"]["content"]
    returned = re.search(rb"x-request-id: ([0-9a-f]{32})\r\n", head)
    assert returned, head  # a generated id instead of a 500 for a header we could not forward
    assert {r.headers["x-request-id"] for r in fake.chat_requests()} == {returned.group(1).decode()}


def test_health_shows_backends_only_to_key_holders(locked):
    anonymous = httpx.get(locked.url + "/health")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}  # liveness, no URLs
    with_key = httpx.get(locked.url + "/health", headers={"authorization": "Bearer proxy-key-2"}).json()
    assert with_key["backends"]["fake"]["url"].startswith("http://127.0.0.1:")


def test_keys_are_compared_in_constant_time(monkeypatch):
    import hmac

    from ttc_proxy.proxy.app import ProxyState
    from ttc_proxy.proxy.errors import Unauthorized
    from ttc_proxy.proxy.traces import MemoryTraceStore

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    from ttc_proxy.proxy.config import ProxyConfig

    config = ProxyConfig.model_validate({"backends": [{"name": "b", "base_url": "http://127.0.0.1:9"}]})
    state = ProxyState(config=config, registry={}, traces=MemoryTraceStore(1), api_keys=frozenset(KEYS))
    state.authorize({"authorization": "Bearer proxy-key-1"})
    assert len(compared) == len(KEYS)  # every key compared, the matching one too
    with pytest.raises(Unauthorized):
        state.authorize({"authorization": "Bearer proxy-key-"})


def test_a_body_over_the_limit_is_a_413_before_anything_is_sent(fake_backend, fake):
    config = fake_config(fake_backend, server={"max_body_bytes": 4096})
    big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 5000}]}
    with ProxyServer(config) as server:
        error = assert_openai_error(chat(server, big), 413, code="request_too_large")
        assert "4,096" in error["message"]
        # a chunked body (no content-length) is cut off while it is read
        raw = json.dumps(big).encode()
        chunked = httpx.post(server.url + "/v1/chat/completions", content=iter([raw[:3000], raw[3000:]]),
                             headers={"content-type": "application/json"})
        assert_openai_error(chunked, 413, code="request_too_large")
        small = chat(server, {"model": "fake-model", "messages": user()})
        assert small.status_code == 200
    assert len(fake.chat_requests()) == 1
