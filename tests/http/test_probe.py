"""`ttc-proxy probe` and `backends[].probe: true`: what an engine supports, measured with tiny requests."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from ttc_proxy.proxy.config import ProxyConfig
from ttc_proxy.tools import cli
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer


def probe_json(url: str, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert cli.main(["probe", url, "--json", *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    return {c["name"]: c["value"] for c in report["checks"]}


def test_probe_measures_a_llama_server_like_engine(fake: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    checks = probe_json(fake.base_url, capsys)
    assert checks["models"] == ["fake-model"] and checks["kind"] == "llama_cpp"
    assert checks["max_n"] == 4  # the fake refuses n above its 4 slots
    assert checks["logprobs"] is True and checks["max_top_logprobs"] == 20 and checks["token_ids"] is True
    assert checks["usage_counts_one_choice"] is True
    assert checks["completions"] is True and checks["completions_token_ids"] is True
    assert checks["tokenize"] is True and checks["render"] is True
    assert checks["stream_done"] is True and checks["stream_usage"] is True
    assert checks["seed_determinism"] is True
    # Every probe request was tiny.
    assert all((r.body.get("max_tokens") or 0) <= 8 for r in fake.requests if "max_tokens" in r.body)


def test_probe_sees_an_engine_without_n_logprobs_or_prefill(fake: FakeBackend,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def script(body: dict[str, Any]) -> FakeReply:
        if int(body.get("n") or 1) > 1:  # like transformers serve: n ignored, one choice
            return FakeReply(texts=["a"], ignore_n=True)
        if body.get("logprobs"):
            return FakeReply(texts=["no logprobs here"], logprobs_fn=lambda c, i, t: [])
        return FakeReply(texts=["fresh answer"])

    fake.script = script
    fake.echo_prefill = False
    try:
        checks = probe_json(fake.base_url, capsys)
    finally:
        fake.echo_prefill = True
    assert checks["max_n"] == 1
    assert checks["prefill"] is False and checks["prefill_echo"] is None


def test_probe_prints_a_table_and_the_config_entry(fake: FakeBackend, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", fake.base_url]) == 0
    out = capsys.readouterr().out
    assert "max_n" in out and "backends:\n  - name: probed\n    kind: llama_cpp" in out
    assert "capabilities: {max_n: 4, logprobs: true, max_top_logprobs: 20" in out


def test_probe_of_an_engine_that_does_not_answer_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    from ttc_proxy.proxy.backends.engine import free_port

    assert cli.main(["probe", f"http://127.0.0.1:{free_port('127.0.0.1')}/v1", "--json"]) == 1
    checks = {c["name"]: c["value"] for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["chat"] is False


def test_probe_true_replaces_the_preset_with_what_was_measured() -> None:
    engine = FakeBackend(slots=3, owned_by="somebody").start_in_thread()  # not recognisable: the generic preset
    try:
        config = ProxyConfig.model_validate({"backends": [
            {"name": "b", "base_url": engine.base_url, "probe": True, "capabilities": {"logit_bias": True}}]})
        with ProxyServer(config) as server:
            backend = server.server.config.app.state.proxy.backends["b"]
            capabilities = backend.capabilities
            health = httpx.get(f"{server.url}/health").json()
        assert capabilities.kind == "generic"  # the preset's name stays; what it can do was measured
        assert capabilities.max_n == 3 and capabilities.logprobs and capabilities.max_top_logprobs == 20
        assert capabilities.completions and capabilities.tokenize and capabilities.render
        assert capabilities.logit_bias is True  # the configured override wins over the measurement
        assert health["backends"]["b"]["max_n"] == 3
    finally:
        engine.stop_thread()
