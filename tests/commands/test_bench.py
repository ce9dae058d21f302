"""`ttc-proxy bench` end to end in a tiny configuration: the machinery works and its numbers are sane.

Not a timing assertion: on a busy machine the proxy may well miss its targets; the command must still run,
answer every request with 200 and report positive latencies and throughput."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from ttc_proxy.tools import bench
from ttc_proxy.tools.rawhttp import carries_content
from ttc_proxy.proxy.backends import Backend, new_client_session
from ttc_proxy.tools.cli import main
from ttc_proxy.proxy.config import config_for_backend_url
from ttc_proxy.proxy.errors import BackendUnreachable


def test_bench_command_runs_and_reports_sane_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "overhead.json"
    code = main(["bench", "--requests", "50", "--warmup", "10", "--duration", "1", "--concurrency", "4",
                 "--output", str(output)])
    assert code == 0

    report = json.loads(output.read_text())
    assert report["all_answered_ok"] is True
    phases = report["phases"]
    assert set(phases) == {"sequential", "streaming", "concurrent"}
    for name, pair in phases.items():
        assert set(pair) == {"direct", "proxy"}
        for target, result in pair.items():
            assert result["requests"] > 0, (name, target)
            assert result["ok"] == result["requests"], (name, target, result["statuses"])
            assert set(result["statuses"]) == {"200"}, (name, target)
            latency = result["latency_ms"]
            assert 0 < latency["min"] <= latency["p50"] <= latency["p99"] <= latency["max"], (name, target)
            assert result["rps"] > 0, (name, target)
    for phase in ("sequential", "streaming"):
        assert phases[phase]["direct"]["requests"] == 50
        assert phases[phase]["proxy"]["requests"] == 50
    for target in ("direct", "proxy"):
        ttft = phases["streaming"][target]["ttft_ms"]
        assert ttft is not None and ttft["count"] == 50
        # The first content event comes before the end of the stream.
        assert 0 < ttft["p50"] <= phases["streaming"][target]["latency_ms"]["p50"]
        assert phases["concurrent"][target]["concurrency"] == 4
    summary = report["summary"]
    assert summary["proxy_rps"] > 0 and summary["direct_rps"] > 0
    assert summary["sequential_added_p50_ms"] is not None and summary["ttft_added_p50_ms"] is not None
    assert [t["name"] for t in report["targets"]] == [
        "added p50 latency, 1 connection, non-streaming",
        "added p50 TTFT, 1 connection, streaming",
        "requests/s via proxy, 4 connections",
    ]
    assert report["machine"]["nproc"] >= 1 and report["machine"]["python"]

    table = capsys.readouterr().out
    assert "via proxy" in table and "requests/s" in table and "TTFT p50" in table


def test_load_generator_parses_sse_content_events() -> None:
    role = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    token = b'data: {"choices":[{"index":0,"delta":{"content":"The"}}]}'
    text = b'data: {"choices":[{"index":0,"text":"4"}]}'
    assert not carries_content(role)
    assert carries_content(token)
    assert carries_content(text)
    assert not carries_content(b"data: [DONE]")
    assert not carries_content(b": keep-alive")


def test_metrics_on_and_off_in_rounds_give_a_difference_per_round(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`--metrics-off-too --rounds 2`: each phase runs on, off, off, on twice; the report has one on-minus-off
    difference per round and their mean with an interval."""
    output = tmp_path / "overhead.json"
    code = main(["bench", "--requests", "20", "--warmup", "5", "--duration", "0.3", "--concurrency", "2",
                 "--metrics-off-too", "--rounds", "2", "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    names = ["proxy", "proxy_metrics_off", "proxy_metrics_off#2", "proxy#2",
             "proxy#3", "proxy_metrics_off#3", "proxy_metrics_off#4", "proxy#4"]
    for phase in report["phases"].values():
        assert list(phase) == ["direct", *names]
        assert all(result["ok"] == result["requests"] > 0 for result in phase.values())
    metrics = report["summary"]["metrics"]
    assert metrics["rounds"] == 2
    sequential = metrics["detail"]["sequential_p50"]
    assert len(sequential["rounds"]) == 2
    assert sequential["mean"] == pytest.approx(sum(sequential["rounds"]) / 2)
    low, high = sequential["interval"]
    assert low <= sequential["mean"] <= high
    seq = report["phases"]["sequential"]
    first = (seq["proxy"]["latency_ms"]["p50"] + seq["proxy#2"]["latency_ms"]["p50"]) / 2 \
        - (seq["proxy_metrics_off"]["latency_ms"]["p50"] + seq["proxy_metrics_off#2"]["latency_ms"]["p50"]) / 2
    assert sequential["rounds"][0] == pytest.approx(first)
    assert len(metrics["detail"]["cpu"]["concurrent"]["rounds"]) == 2
    assert "added by metrics" in capsys.readouterr().out


def test_rounds_without_the_metrics_comparison_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--rounds", "3"]) == 2
    assert "--metrics-off-too" in capsys.readouterr().err


def test_t_interval() -> None:
    assert bench.t_interval([1.0]) is None
    low, high = bench.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2 df) 4.303
    assert low == pytest.approx(2 - 4.303 / 3 ** 0.5) and high == pytest.approx(2 + 4.303 / 3 ** 0.5)
    low, high = bench.t_interval([0.0, 1.0] * 6)  # 11 df: the table's 10 df quantile, the wider
    assert high - low == pytest.approx(2 * 2.228 * (12 / 11) ** 0.5 * 0.5 / 12 ** 0.5)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        bench.run_benchmark(requests=0)
    with pytest.raises(ValueError):
        bench.run_benchmark(duration=0)
    with pytest.raises(ValueError):
        bench.run_benchmark(concurrency=0)
    with pytest.raises(ValueError):
        bench.run_benchmark(metrics_off_too=True, rounds=0)


# ---- the backend client (proxy/backends.py, aiohttp) ----


async def test_backend_maps_connection_failures() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    async with new_client_session() as client:
        backend = Backend(config_for_backend_url(base).backends[0], base, client)
        with pytest.raises(BackendUnreachable):
            await backend.call("/chat/completions", {}, owner="o", content=b"{}")
        assert backend.scheduler.in_use == 0


def test_bench_against_an_engine_pairs_direct_and_proxy_requests(fake_backend) -> None:
    """`ttc-proxy bench --backend URL`: the same request straight to the engine and through the proxy, paired."""
    from ttc_proxy.tools.engine_bench import format_engine_report, run_engine_overhead

    fake_backend.reset()
    report = run_engine_overhead(backend_url=fake_backend.base_url, kind="llama_cpp", engine_model="fake-model",
                                 pairs=5, warmup=1)
    for phase in ("non_streaming", "streaming_ttft"):
        assert report[phase]["pairs"] == 5 and report[phase]["failed"] == 0
        low, high = report[phase]["added_ci95_ms"]
        assert low <= report[phase]["added_p50_ms"] <= high
    models = {r.body["model"] for r in fake_backend.chat_requests()}
    assert models == {"fake-model"}  # the proxy mapped its client name to the engine's
    assert len(fake_backend.chat_requests()) == 2 * 2 * 6  # two phases, both sides, warm-up included
    assert "added p50" in format_engine_report(report)
