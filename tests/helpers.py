"""Test plumbing: run the proxy in a thread on a free port, and validate bodies against the OpenAI spec."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from jsonschema import Draft202012Validator

from ttc_proxy.proxy.app import create_app
from ttc_proxy.proxy.config import BackendConfig, ProxyConfig
from ttc_proxy.proxy.backends.engine import free_port
from ttc_proxy.tools.fakebackend import FakeBackend

SPEC_PATH = Path(__file__).resolve().parent / "data" / "openai-openapi.yaml"


def fake_config(fake: FakeBackend, **overrides: object) -> ProxyConfig:
    """A proxy config whose one backend is the scripted one (named `fake`, kind llama_cpp)."""
    backend = BackendConfig(name="fake", kind="llama_cpp", base_url=fake.base_url)
    return ProxyConfig.model_validate({"backends": [backend.model_dump()], **overrides})


class ProxyServer:
    """uvicorn serving create_app(config) in a background thread."""

    def __init__(self, config: ProxyConfig) -> None:
        self.port = free_port("127.0.0.1")
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="proxy")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ProxyServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("proxy did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _nullable_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` means null is allowed; plain JSON Schema ignores it, so rewrite it."""
    if isinstance(node, dict):
        node = {k: _nullable_to_jsonschema(v) for k, v in node.items()}
        if node.pop("nullable", False):
            node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable_to_jsonschema(v) for v in node]
    return node


@lru_cache(maxsize=1)
def _spec() -> dict[str, Any]:
    spec = yaml.load(SPEC_PATH.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # C: 6x faster
    return _nullable_to_jsonschema(spec)


def validate_schema(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless `instance` matches components.schemas[schema_name]."""
    spec = _spec()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    Draft202012Validator(schema).validate(instance)


def sse_payloads(lines: list[str]) -> list[Any]:
    """The JSON payloads of `data:` lines, stopping at [DONE]."""
    payloads = []
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            if data == "[DONE]":
                break
            payloads.append(json.loads(data))
    return payloads


# ---- added for the unit-test suite (tests/test_*.py) ----

import socket  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402

import httpx  # noqa: E402
import openai  # noqa: E402

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply  # noqa: E402


def held_until_all_arrived(calls: int, script: Callable[[dict[str, Any]], FakeReply]
                           ) -> Callable[[dict[str, Any]], FakeReply]:
    """A fake-backend script whose replies all wait until `calls` requests have arrived: a test that counts the
    calls a strategy sends does not race the cancellation of calls not yet sent (after a failure it answers)."""
    arrived = threading.Event()
    seen: list[dict[str, Any]] = []

    def held(body: dict[str, Any]) -> FakeReply:
        seen.append(body)
        if len(seen) >= calls:
            arrived.set()
        return dataclasses.replace(script(body), release=arrived)

    return held


def backend_entry(fake: FakeBackend, **fields: Any) -> dict[str, Any]:
    """One `backends:` entry for the fake, with extra fields (timeouts, max_in_flight, capabilities, ...)."""
    return {"name": "fake", "kind": "llama_cpp", "base_url": fake.base_url, **fields}


def sync_client(server: ProxyServer, api_key: str = "x", **kwargs: Any) -> openai.OpenAI:
    """The official SDK pointed at the proxy; no retries, so an error is seen exactly once."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=30, **kwargs)


def async_client(server: ProxyServer, api_key: str = "x", **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=30, **kwargs)


def user(text: str = "What is 6 times 7?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def chat(server: ProxyServer, body: Mapping[str, Any] | bytes, headers: Mapping[str, str] | None = None,
         path: str = "/v1/chat/completions", timeout: float = 30) -> httpx.Response:
    """A raw POST (httpx), for cases the SDK would not send or would hide."""
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body, headers={"content-type": "application/json",
                                                                     **(headers or {})}, timeout=timeout)
    return httpx.post(server.url + path, json=body, headers=dict(headers or {}), timeout=timeout)


def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.text.split("\n") if line]


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0, interval: float = 0.002) -> float:
    """Poll until `predicate()` holds; returns the seconds it took, or fails the test after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def raw_request(server: ProxyServer, body: Mapping[str, Any], path: str = "/v1/chat/completions") -> socket.socket:
    """Send a POST over a bare socket and return the socket, so a test can disconnect at a moment it picks."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return sock


def closed_port() -> int:
    """A local port nothing listens on."""
    return free_port("127.0.0.1")


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None,
                        code: str | None = None) -> dict[str, Any]:
    """The response has `status` and an OpenAI-shaped error body (checked against the spec); returns the error."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    validate_schema(body, "ErrorResponse")
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


from ttc_proxy.strategies.framework import Token, TokenAlternative  # noqa: E402


def tok(text: str, logprob: float, top: tuple[tuple[str, float], ...] = (), offset: int = 0,
        token_id: int | None = None) -> Token:
    """A Token with (text, logprob) alternatives, for pure tests."""
    return Token(text=text, logprob=logprob, id=token_id, bytes=text.encode(), offset=offset,
                 top=tuple(TokenAlternative(t, lp) for t, lp in top))


def stop_service(process: "subprocess.Popen[bytes]", log: Any, folder: Path) -> None:
    """Stop a service a test started (Prometheus, Phoenix): SIGTERM, SIGKILL after 20 s; close its log, remove its
    folder."""
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()
    shutil.rmtree(folder, ignore_errors=True)
