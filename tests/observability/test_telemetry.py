"""OpenTelemetry spans reach a real OTLP receiver, Arize Phoenix (`make phoenix` installs it in .venv-phoenix):
the client's traceparent is the request span's parent, a composed run's spans nest as its trace tree does, every
backend call carries its own span's traceparent to the engine, and text goes into spans only when asked."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ttc_proxy.proxy.backends.engine import free_port
from ttc_proxy.tools.fakebackend import FakeBackend

from tests.helpers import stop_service, ProxyServer, fake_config, user

ROOT = Path(__file__).resolve().parents[2]


class Phoenix:
    """`phoenix serve` on loopback, its database in a temporary folder."""

    def __init__(self, binary: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ttc-phoenix-"))
        self.port = free_port("127.0.0.1")
        env = {**os.environ, "PHOENIX_WORKING_DIR": str(self.folder), "PHOENIX_HOST": "127.0.0.1",
               "PHOENIX_PORT": str(self.port), "PHOENIX_GRPC_PORT": str(free_port("127.0.0.1"))}
        self.log = open(self.folder / "phoenix.log", "wb")
        self.process = subprocess.Popen([binary, "serve"], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> Phoenix:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"phoenix did not start:\n{(self.folder / 'phoenix.log').read_text(errors='replace')}")

    def spans(self, trace_id: str, expected: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The trace's spans once at least `expected` have arrived."""
        deadline = time.monotonic() + timeout
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/v1/projects/default/spans", params={"limit": 1000}, timeout=10)
            response.raise_for_status()
            found = [s for s in response.json()["data"] if s["context"]["trace_id"] == trace_id]
            if len(found) >= expected:
                return found
            time.sleep(0.5)
        raise AssertionError(f"{len(found)} spans of trace {trace_id} reached phoenix, expected {expected}")

    def stop(self) -> None:
        stop_service(self.process, self.log, self.folder)


def phoenix_binary() -> str:
    local = ROOT / ".venv-phoenix" / "bin" / "phoenix"
    binary = str(local) if local.exists() else shutil.which("phoenix")
    if binary is None:
        reason = "Arize Phoenix is not installed (`make phoenix` installs it in .venv-phoenix)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def phoenix() -> Iterator[Phoenix]:
    server = Phoenix(phoenix_binary()).wait_ready()
    yield server
    server.stop()


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def run_composed(fake: FakeBackend, phoenix: Phoenix, **telemetry: Any) -> tuple[str, str, dict[str, Any]]:
    trace_id, client_span, header = traceparent()
    config = fake_config(fake, telemetry={"otlp_endpoint": phoenix.url, **telemetry})
    with ProxyServer(config) as server:  # leaving it shuts the exporter down: every span is sent
        response = httpx.post(server.url + "/v1/chat/completions", timeout=60, headers={"traceparent": header},
                              json={"model": "bon:n=4>cot-fake-model", "messages": user(), "seed": 3})
        assert response.status_code == 200, response.text
    return trace_id, client_span, response.json()


def test_a_composed_run_reaches_phoenix_with_its_parent_links(fake: FakeBackend, phoenix: Phoenix) -> None:
    trace_id, client_span, body = run_composed(fake, phoenix)
    calls = [r for r in fake.requests if r.path == "/v1/chat/completions"]
    assert len(calls) == 4  # bon's 4 samples, each cot's one call (seeded: one call each)
    spans = phoenix.spans(trace_id, expected=1 + 1 + 4 + 4)
    by_id = {s["context"]["span_id"]: s for s in spans}
    request = next(s for s in spans if s["attributes"].get("url.path") == "/v1/chat/completions")
    assert request["parent_id"] == client_span  # the client's traceparent
    assert request["name"] == "chat bon:n=4>cot-fake-model"
    assert request["attributes"]["gen_ai.usage.input_tokens"] == body["usage"]["prompt_tokens"]
    assert request["attributes"]["gen_ai.usage.output_tokens"] == body["usage"]["completion_tokens"]
    bon = next(s for s in spans if s["name"] == "strategy bon")
    assert bon["parent_id"] == request["context"]["span_id"]
    assert bon["attributes"]["ttc.composition"] == "bon:n=4>cot"
    assert bon["attributes"]["ttc.trace_id"] == body["ttc"]["trace_id"]
    cots = [s for s in spans if s["name"] == "strategy cot"]
    assert len(cots) == 4
    call_spans = [s for s in spans if s["attributes"].get("gen_ai.operation.name") == "chat"
                  and s["name"].startswith("chat fake-model")]
    assert len(call_spans) == 4
    for call in call_spans:
        parent = by_id[call["parent_id"]]
        # a call's parent is a cot run (or a span inside it), which hangs under bon
        while parent["name"] != "strategy cot":
            parent = by_id[parent["parent_id"]]
        assert parent["parent_id"] == bon["context"]["span_id"]
        assert call["attributes"]["gen_ai.request.model"] == "fake-model"
        assert call["attributes"]["gen_ai.usage.output_tokens"] > 0
    # each engine call carried its own span as parent: the engine joins the same trace there
    sent = {r.headers["traceparent"] for r in calls}
    assert sent == {f"00-{trace_id}-{c['context']['span_id']}-01" for c in call_spans}
    # no text without capture_content
    assert not any("ttc.outputs" in s["attributes"] or "gen_ai.input.messages" in s["attributes"] for s in spans)


def test_capture_content_puts_prompts_and_outputs_into_spans(fake: FakeBackend, phoenix: Phoenix) -> None:
    trace_id, _, body = run_composed(fake, phoenix, capture_content=True)
    spans = phoenix.spans(trace_id, expected=10)
    bon = next(s for s in spans if s["name"] == "strategy bon")
    assert "What is 6 times 7?" in bon["attributes"]["gen_ai.input.messages"]
    outputs = [s["attributes"]["ttc.outputs"] for s in spans if "ttc.outputs" in s["attributes"]]
    assert len(outputs) == 4 and all("42" in o for o in outputs)


def test_telemetry_is_off_unless_configured(fake: FakeBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    _, _, header = traceparent()
    with ProxyServer(fake_config(fake)) as server:
        assert httpx.post(server.url + "/v1/chat/completions", headers={"traceparent": header},
                          json={"model": "fake-model", "messages": user()}).status_code == 200
    assert "traceparent" not in fake.requests[-1].headers
