"""`ttc-proxy bench` end to end in a tiny configuration: the machinery works and its numbers are sane.

Not a timing assertion: on a busy machine the proxy may well miss its targets; the command must still run,
answer every request with 200 and report positive latencies and throughput."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest

from proxy import bench
from proxy.backends import Backend
from proxy.cli import main
from proxy.config import config_for_backend_url
from proxy.errors import BackendUnreachable


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
    assert not bench._carries_content(role)
    assert bench._carries_content(token)
    assert bench._carries_content(text)
    assert not bench._carries_content(b"data: [DONE]")
    assert not bench._carries_content(b": keep-alive")


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        bench.run_benchmark(requests=0)
    with pytest.raises(ValueError):
        bench.run_benchmark(duration=0)
    with pytest.raises(ValueError):
        bench.run_benchmark(concurrency=0)


# ---- the pass-through fast path in proxy/backends.py (a performance edit the benchmark led to) ----


async def _capture_server(replies: list[bytes]) -> tuple[asyncio.Server, list[bytes]]:
    """A raw HTTP server that records each request's bytes and answers with the next canned reply."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                seen.append(head + await reader.readexactly(length))
                writer.write(replies[min(len(seen), len(replies)) - 1])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


def _reply(extra_headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + extra_headers + b"content-length: 2\r\n\r\n{}"


async def test_fast_path_sends_what_the_client_would() -> None:
    server, seen = await _capture_server([_reply(b"set-cookie: a=b; Path=/\r\n"), _reply()])
    port = server.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    try:
        async with httpx.AsyncClient() as client:
            backend = Backend(config_for_backend_url(base).backends[0], base, client)
            assert backend._transport is not None  # the fast path is on for a plain client
            reference = client.build_request("POST", f"{base}/chat/completions", content=b'{"x":1}',
                                             headers={"content-type": "application/json", "x-request-id": "r1"},
                                             timeout=backend.timeout)
            response, payload = await backend.call("/chat/completions", {"x": 1}, owner="o", request_id="r1",
                                                   content=b'{"x":1}')
            assert (response.status_code, payload) == (200, b"{}")
            assert dict(client.cookies) == {"a": "b"}  # cookies are still kept ...
            await backend.call("/chat/completions", {"x": 1}, owner="o", content=b'{"x":1}')
            # ... and sent again, as client.build_request + client.send do.
    finally:
        server.close()
    expected = b"".join([b"POST /v1/chat/completions HTTP/1.1\r\n"]
                        + [name + b": " + value + b"\r\n" for name, value in reference.headers.raw]
                        + [b"\r\n", b'{"x":1}'])
    assert seen[0] == expected
    assert b"\r\nCookie: a=b\r\n" in seen[1] and b"x-request-id" not in seen[1]


async def test_fast_path_steps_aside_for_client_features() -> None:
    base = "http://127.0.0.1:9/v1"
    config = config_for_backend_url(base).backends[0]
    async with httpx.AsyncClient(auth=("user", "secret")) as client:
        assert Backend(config, base, client)._transport is None
    async with httpx.AsyncClient() as client:
        with_credentials = "http://user:secret@127.0.0.1:9/v1"
        assert Backend(config_for_backend_url(with_credentials).backends[0], with_credentials,
                       client)._transport is None


async def test_fast_path_maps_transport_errors() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    async with httpx.AsyncClient() as client:
        backend = Backend(config_for_backend_url(base).backends[0], base, client)
        assert backend._transport is not None
        with pytest.raises(BackendUnreachable):
            await backend.call("/chat/completions", {}, owner="o", content=b"{}")
        assert backend.scheduler.in_use == 0
