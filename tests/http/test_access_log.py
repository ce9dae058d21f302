"""The access log: one structured line per request on `ttc_proxy.access`, written when the response has ended."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from ttc_proxy.proxy.access_log import ACCESS_LOGGER, JsonFormatter
from ttc_proxy.proxy.backends.engine import free_port
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer, chat, raw_request, sse_lines, user, wait_until

KEY = "sk-client-key-0123456789"
KEY_ID = "key-" + hashlib.sha256(KEY.encode()).hexdigest()[:16]


@pytest.fixture()
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    return caplog


def lines_for(caplog: pytest.LogCaptureFixture, request_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The access fields logged for `request_id`, once `count` lines are there (a line follows its response)."""
    def found() -> list[dict[str, Any]]:
        return [r.access for r in caplog.records if r.name == ACCESS_LOGGER and r.access["request_id"] == request_id]

    wait_until(lambda: len(found()) >= count, timeout=10)
    return found()


def post(proxy: ProxyServer, body: dict[str, Any]) -> httpx.Response:
    return chat(proxy, body, headers={"authorization": f"Bearer {KEY}"})


def test_pass_through_line(proxy: ProxyServer, fake: FakeBackend, access: pytest.LogCaptureFixture) -> None:
    response = post(proxy, {"model": "fake-model", "messages": user()})
    assert response.status_code == 200
    [line] = lines_for(access, response.headers["x-request-id"])
    usage = response.json()["usage"]
    assert line["key_id"] == KEY_ID and line["model"] == "fake-model" and line["strategy"] is None
    assert line["status"] == 200 and line["method"] == "POST" and line["path"] == "/v1/chat/completions"
    assert line["backend_calls"] == 1
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    text = next(r.getMessage() for r in access.records if r.name == ACCESS_LOGGER)
    assert "status=200" in text and f"key_id={KEY_ID}" in text and KEY not in access.text


def test_strategy_line_counts_calls_and_tokens(proxy: ProxyServer, fake: FakeBackend,
                                               access: pytest.LogCaptureFixture) -> None:
    response = post(proxy, {"model": "sc:n=6-fake-model", "messages": user()})  # the fake draws at most 4 a call
    assert response.status_code == 200
    body = response.json()
    [line] = lines_for(access, response.headers["x-request-id"])
    assert line["strategy"] == "sc:n=6" and line["model"] == "sc:n=6-fake-model" and line["status"] == 200
    assert line["backend_calls"] == body["ttc"]["backend_calls"] > 1
    assert line["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert line["completion_tokens"] == body["usage"]["completion_tokens"] > 0


def test_error_lines(proxy: ProxyServer, fake: FakeBackend, access: pytest.LogCaptureFixture) -> None:
    missing = post(proxy, {"model": "no-such-model", "messages": user()})
    [line] = lines_for(access, missing.headers["x-request-id"])
    assert (line["status"], line["model"], line["backend_calls"]) == (404, "no-such-model", 0)
    fake.reset(lambda request: FakeReply(status=500))
    failed = post(proxy, {"model": "fake-model", "messages": user()})
    [line] = lines_for(access, failed.headers["x-request-id"])
    assert (line["status"], line["backend_calls"], line["prompt_tokens"]) == (500, 1, None)
    refused = post(proxy, {"model": "sc:n=2-fake-model", "messages": user()})
    [line] = lines_for(access, refused.headers["x-request-id"])
    assert line["status"] == refused.status_code >= 500 and line["strategy"] == "sc:n=2"


def test_stream_lines_when_it_ends(proxy: ProxyServer, fake: FakeBackend, access: pytest.LogCaptureFixture) -> None:
    response = post(proxy, {"model": "fake-model", "messages": user(), "stream": True,
                            "stream_options": {"include_usage": True}})
    assert sse_lines(response)[-1] == "data: [DONE]"
    [line] = lines_for(access, response.headers["x-request-id"])
    assert line["status"] == 200 and line["completion_tokens"] == 4 and line["backend_calls"] == 1
    run = post(proxy, {"model": "sc:n=2-fake-model", "messages": user(), "stream": True})
    [line] = lines_for(access, run.headers["x-request-id"])
    assert line["strategy"] == "sc:n=2" and line["status"] == 200 and line["completion_tokens"] > 0


@pytest.mark.parametrize("model", ["fake-model", "sc:n=2-fake-model"])
def test_a_stream_its_client_leaves_logs_499(proxy: ProxyServer, fake: FakeBackend, access: pytest.LogCaptureFixture,
                                            model: str) -> None:
    fake.reset(lambda request: FakeReply(texts=["one two three four five six"], chunk_delay=0.3, delay=0.3))
    sock = raw_request(proxy, {"model": model, "messages": user(), "stream": True})
    head = sock.recv(4096).decode()
    request_id = next(h.split(":", 1)[1].strip() for h in head.split("\r\n") if h.lower().startswith("x-request-id"))
    sock.close()
    [line] = lines_for(access, request_id)
    assert line["status"] == 499 and line["model"] == model


def test_json_format_parses(proxy: ProxyServer, fake: FakeBackend, access: pytest.LogCaptureFixture) -> None:
    response = post(proxy, {"model": "fake-model", "messages": user()})
    lines_for(access, response.headers["x-request-id"])
    record = next(r for r in access.records if r.name == ACCESS_LOGGER)
    line = json.loads(JsonFormatter().format(record))
    assert line["logger"] == ACCESS_LOGGER and line["level"] == "INFO" and line["status"] == 200
    assert line["request_id"] == response.headers["x-request-id"] and "time" in line


def test_serve_log_format_json(fake: FakeBackend, tmp_path: Any) -> None:
    """`ttc-proxy serve --log-format json`: every line on stderr is a JSON object; a request's is its access line."""
    port = free_port("127.0.0.1")
    server = subprocess.Popen(
        [sys.executable, "-m", "ttc_proxy.tools.cli", "serve", "--backend", fake.base_url, "--port", str(port),
         "--log-format", "json"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, "TTC_PROXY_API_KEYS": ""},
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                                      json={"model": "fake-model", "messages": user()},
                                      headers={"authorization": f"Bearer {KEY}"})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and server.poll() is None, "the proxy did not start"
                time.sleep(0.1)
        assert response.status_code == 200
        time.sleep(0.3)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=20)
    lines = [json.loads(text) for text in stderr.splitlines() if text.strip()]
    access = [line for line in lines if line["logger"] == ACCESS_LOGGER]
    assert [line["request_id"] for line in access] == [response.headers["x-request-id"]], stderr
    assert access[0]["key_id"] == KEY_ID and access[0]["status"] == 200 and KEY not in stderr
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # uvicorn's own lines are JSON too


def test_pass_through_failed_over_counts_both_calls(fake_backend: FakeBackend,
                                                   access: pytest.LogCaptureFixture) -> None:
    """The first backend refused the connection, the second answered: two calls tried, each with its own cap."""
    from tests.helpers import fake_config
    from tests.helpers import backend_entry, closed_port

    gone = {"name": "gone", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{closed_port()}/v1",
            "models": ["fake-model"], "connect_retries": {"attempts": 0}, "health_check": {"interval": 0}}
    with ProxyServer(fake_config(fake_backend, backends=[gone, backend_entry(fake_backend, models=["fake-model"])])) \
            as server:
        response = chat(server, {"model": "fake-model", "messages": user()})
        assert response.status_code == 200
        [line] = lines_for(access, response.headers["x-request-id"])
    assert line["backend_calls"] == 2
