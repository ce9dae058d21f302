"""Backend keys never leave the proxy (logs, traces, errors, /health), and no request can make the proxy reach a
host that is not a configured backend or verifier (SSRF)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, backend_entry, chat, closed_port, user

BACKEND_KEY = "sk-backend-7Hq2ZpX9vLr4Wm8N"  # distinctive: any occurrence is a leak
PROXY_KEY = "proxy-key-sec"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}


class Listener:
    """A socket standing for a host the proxy must never reach: it counts the connections made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture()
def attacker() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def keyed(fake_backend: FakeBackend) -> Iterator[ProxyServer]:
    """The fake with a backend key, a second backend nothing listens on (same key), and proxy keys."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SECURITY_BACKEND_KEY", BACKEND_KEY)
    mp.delenv("TTC_PROXY_API_KEYS", raising=False)
    config = fake_config(fake_backend, server={"api_keys": [PROXY_KEY]}, backends=[
        backend_entry(fake_backend, api_key_env="SECURITY_BACKEND_KEY"),
        {"name": "gone", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
         "api_key_env": "SECURITY_BACKEND_KEY", "models": ["gone-model"]},
    ])
    with ProxyServer(config) as server:
        yield server
    mp.undo()


# ---- backend keys ----

def test_backend_key_is_sent_to_the_backend_and_nowhere_else(keyed: ProxyServer, fake: FakeBackend,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    def answer(status: int, **extra: Any) -> None:
        fake.reset(lambda request: FakeReply(status=status, **extra))

    def send(model: str, **body: Any) -> httpx.Response:
        response = chat(keyed, {"model": model, "messages": user(), **body}, headers=AUTH)
        seen.append(response.text)
        return response

    ok = send("fake-model")
    assert ok.status_code == 200
    assert fake.requests[-1].headers["authorization"] == f"Bearer {BACKEND_KEY}"  # the key does go to its backend
    trace_ids = [send("sc:n=2-fake-model").json()["ttc"]["trace_id"]]
    # a backend that refuses the key, fails, or echoes the key it was sent in its error
    for status, extra in ((401, {}), (500, {}), (403, {"error": {"error": {"message": f"bad key {BACKEND_KEY}",
                                                                            "type": "auth", "code": "bad_key"}}}),
                          (400, {"raw_body": f"invalid api key: Bearer {BACKEND_KEY}".encode()})):
        answer(status, **extra)
        for model in ("fake-model", "sc:n=2-fake-model"):
            assert send(model).status_code >= 400
            assert send(model, stream=True).status_code in (200, 400, 401, 403, 500, 502)
    # an error event in a stream that quotes the key (one call, and n split across calls)
    answer(200, raw_stream=b'data: {"error": {"message": "bad key ' + BACKEND_KEY.encode() + b'"}}\n\n')
    for n in (1, 6):
        streamed = send("fake-model", stream=True, n=n)
        assert streamed.status_code == 200 and "[backend key]" in streamed.text
    # a strategy's streams (deepconf), every other one an error event quoting the key: in its trace and error
    calls = iter(range(10**6))
    fake.reset(lambda request: FakeReply(raw_stream=b'data: {"error": {"message": "bad key ' + BACKEND_KEY.encode()
                                         + b'"}}\n\n') if next(calls) % 2 else FakeReply(texts=["4"]))
    mixed = send("deepconf:n=6,warmup=4-fake-model")
    if mixed.status_code == 200:
        trace_ids.append(mixed.json()["ttc"]["trace_id"])
    assert "[backend key]" in httpx.get(f"{keyed.url}/v1/traces/{trace_ids[-1]}", headers=AUTH).text or \
        "[backend key]" in mixed.text
    # a 200 that is not what was asked, quoting the key: pass-through (plain, split n) and a strategy
    answer(200, raw_body=b"not json: " + BACKEND_KEY.encode())
    for model, n in (("fake-model", 1), ("fake-model", 6), ("sc:n=2-fake-model", 1)):
        invalid = send(model, n=n)
        assert invalid.status_code == 502 and "[backend key]" in invalid.text, invalid.text
    answer(200, raw_stream=b"data: not a chunk " + BACKEND_KEY.encode() + b"\n\n")
    for model, n in (("fake-model", 1), ("fake-model", 6), ("deepconf:n=5,warmup=4-fake-model", 1)):
        send(model, n=n, stream=True)
    fake.reset()
    assert send("gone-model").status_code == 502  # connect failure
    assert send("gone-model", stream=True).status_code == 502
    for path in ("/tokenize", "/detokenize"):
        seen.append(chat(keyed, {"model": "gone-model", "prompt": "x", "tokens": [1]}, headers=AUTH, path=path).text)
    for trace_id in trace_ids:
        seen.append(httpx.get(f"{keyed.url}/v1/traces/{trace_id}", headers=AUTH).text)
    seen.append(httpx.get(f"{keyed.url}/health", headers=AUTH).text)
    seen.append(httpx.get(f"{keyed.url}/health").text)
    seen.append(httpx.get(f"{keyed.url}/v1/models", headers=AUTH).text)
    seen.append(httpx.get(f"{keyed.url}/openapi.json").text)
    logged = caplog.text + "\n".join(repr(getattr(r, "access", "")) for r in caplog.records)
    assert "backend" in logged or caplog.records  # something was logged at DEBUG
    for text in (*seen, logged):
        assert BACKEND_KEY not in text
        assert PROXY_KEY not in text


# ---- SSRF ----

def ssrf_requests(url: str) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """Every place a URL could come from the request: (path, body, headers)."""
    chat_path = "/v1/chat/completions"
    base = {"messages": user()}
    return [
        (chat_path, {**base, "model": url}, {}),
        (chat_path, {**base, "model": f"{url}/v1"}, {}),
        (chat_path, {**base, "model": f"sc-{url}"}, {}),
        (chat_path, {**base, "model": f"sc:n=2,judge_model={url}-fake-model"}, {}),
        (chat_path, {**base, "model": "bon:n=2,select=verifier,http_verifier=x-fake-model"}, {}),
        (chat_path, {**base, "model": "bon:n=2-fake-model",
                     "ttc": {"params": {"select": "verifier", "http_verifier": f"{url}/check"}}}, {}),
        (chat_path, {**base, "model": "bon:n=2-fake-model",
                     "ttc": {"params": {"select": "judge", "judge_model": f"{url}/v1"}}}, {}),
        (chat_path, {**base, "model": "mcts:iterations=1,batch=1-fake-model",
                     "ttc": {"params": {"score": "judge", "judge_model": url}}}, {}),
        (chat_path, {**base, "model": "pts-fake-model", "ttc": {"params": {"pivots": f"{url}/pivots.jsonl"}}}, {}),
        (chat_path, {**base, "model": "pts-fake-model", "ttc": {"params": {"pivots": "/etc/passwd"}}}, {}),
        (chat_path, {**base, "model": "sc:n=2-fake-model", "ttc": {"over": {"strategy": "cot",
                                                                           "params": {"base_url": url}}}}, {}),
        (chat_path, {**base, "model": "fake-model", "base_url": url, "api_base": url, "baseURL": url,
                     "backend": url, "url": url}, {}),
        (chat_path, {**base, "model": "sc:n=2-fake-model", "base_url": url, "api_base": url}, {}),
        (chat_path, {**base, "model": "fake-model"},
         {"host": url[7:], "x-forwarded-host": url[7:], "forwarded": f"host={url[7:]}", "x-backend-url": url,
          "x-api-base": url, "origin": url, "referer": url}),
        (chat_path, {**base, "model": "sc:n=2-fake-model"}, {"x-forwarded-host": url[7:], "x-backend-url": url}),
        ("/v1/completions", {"model": url, "prompt": "x"}, {}),
        ("/tokenize", {"model": url, "prompt": "x"}, {}),
        ("/detokenize", {"model": f"{url}/v1", "tokens": [1]}, {}),
    ]


def test_no_request_reaches_a_host_that_is_not_configured(keyed: ProxyServer, fake: FakeBackend,
                                                          attacker: Listener) -> None:
    for path, body, headers in ssrf_requests(attacker.url):
        response = chat(keyed, body, headers={**AUTH, **headers}, path=path)
        assert response.status_code != 500, (body, response.text)
        if body.get("model", "").startswith("http"):
            assert response.status_code in (400, 404), (body, response.text)
    assert chat(keyed, {"model": "fake-model", "messages": user()}, headers=AUTH).status_code == 200
    assert attacker.connections == 0


def test_a_backend_redirect_is_not_followed(fake: FakeBackend, attacker: Listener) -> None:
    """A configured backend answering a redirect to another host: the proxy does not go there."""
    redirector = socket.create_server(("127.0.0.1", 0))
    port = redirector.getsockname()[1]
    location = f"{attacker.url}/v1/chat/completions"

    def serve() -> None:
        redirector.settimeout(0.2)
        while True:
            try:
                conn, _ = redirector.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                request = b""
                try:
                    while b"\r\n\r\n" not in request:
                        request += conn.recv(65536)
                except OSError:
                    continue
                if request.startswith(b"GET /v1/models"):
                    body = b'{"object":"list","data":[{"id":"fake-model","object":"model"}]}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                 + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
                else:
                    conn.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\n"
                                 f"connection: close\r\n\r\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    config = fake_config(fake, backends=[{"name": "redirecting", "kind": "generic", "probe": True,  # start-up too
                                          "base_url": f"http://127.0.0.1:{port}/v1"}])
    try:
        with ProxyServer(config) as server:
            for model in ("fake-model", "sc:n=2-fake-model"):
                for stream in (False, True):
                    response = chat(server, {"model": model, "messages": user(), "stream": stream})
                    assert response.status_code != 500, response.text
            assert response.status_code in (200, 502)
    finally:
        redirector.close()
        thread.join(2)
    assert attacker.connections == 0
