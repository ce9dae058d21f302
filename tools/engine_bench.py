"""`ttc-proxy bench --backend URL`: what the proxy adds in pass-through in front of a real engine.

The proxy runs in its own process (tools/servers.py) in front of the engine; this process sends pairs of the same
request, one straight to the engine and one through the proxy, in random order within each pair, one at a time
on one keep-alive connection each (tools/rawhttp.py), so that the engine's own drift hits both sides alike. The
report is each side's median and the median of the paired differences with a bootstrap 95 % interval:
non-streaming latency (max_tokens 1) and, streamed, the time to the first content.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ttc_proxy.proxy.config import ProxyConfig

from .rawhttp import connect, post_bytes
from .servers import HOST, load_average, proxy_runtime, report_header, start_proxy

CLIENT_MODEL = "bench-engine"  # what the client calls the model through the proxy (mapped to the engine's name)
QUESTION = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]


def _body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": QUESTION, "max_tokens": 1 if not stream else 4,
                            "temperature": 0}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The median and a bootstrap 95 % interval for it."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


async def paired_times(sides: Mapping[str, tuple[int, bytes]], *, stream: bool, pairs: int, warmup: int,
                       rng: random.Random) -> tuple[dict[str, list[float]], int]:
    """Each side's time in ms over `pairs` rounds after `warmup` (a stream's: to its first content), the sides sent
    in random order within each round, one at a time, on one keep-alive connection each; and how many requests
    failed. `sides` maps a name to (port, request bytes)."""
    conns = {side: await connect(port) for side, (port, _) in sides.items()}
    times: dict[str, list[float]] = {side: [] for side in sides}
    failed = 0
    try:
        for i in range(warmup + pairs):
            order = list(sides.items())
            rng.shuffle(order)
            measured: dict[str, float] = {}
            for side, (port, data) in order:
                try:
                    status, seconds, ttft, ok = await conns[side].request(data, stream)
                except ConnectionError:  # the server closed the kept-alive connection (llama-server may): again
                    conns[side] = await connect(port)
                    status, seconds, ttft, ok = await conns[side].request(data, stream)
                # A stream counts by its first content: transformers serve's lack no more than a final [DONE]
                if status != 200 or (stream and ttft is None) or (not stream and not ok):
                    failed += 1
                measured[side] = ttft if stream and ttft is not None else seconds
            if i >= warmup and len(measured) == len(sides):
                for side, value in measured.items():
                    times[side].append(value * 1000.0)
    finally:
        for conn in conns.values():
            conn.close()
    return times, failed


async def _pairs(engine_port: int, path: str, proxy_port: int, engine_model: str, stream: bool, pairs: int,
                 warmup: int, rng: random.Random) -> dict[str, Any]:
    sides = {"direct": (engine_port, post_bytes(engine_port, _body(engine_model, stream), stream, path=path)),
             "proxy": (proxy_port, post_bytes(proxy_port, _body(CLIENT_MODEL, stream), stream))}
    times, failed = await paired_times(sides, stream=stream, pairs=pairs, warmup=warmup, rng=rng)
    added = [p - d for p, d in zip(times["proxy"], times["direct"])]
    median, low, high = median_interval(added)
    return {"pairs": len(added), "failed": failed,
            "direct_p50_ms": statistics.median(times["direct"]), "proxy_p50_ms": statistics.median(times["proxy"]),
            "added_p50_ms": median, "added_ci95_ms": [low, high]}


def run_engine_overhead(*, backend_url: str, kind: str, engine_model: str, pairs: int = 200, warmup: int = 10,
                        seed: int = 1, progress: Any = None) -> dict[str, Any]:
    """Start the proxy in front of the engine at `backend_url` and measure it, paired (see the module's doc)."""
    url = urlsplit(backend_url)
    if url.hostname not in (HOST, "localhost") or url.port is None:
        raise ValueError("--backend must be an engine on this machine's loopback, with its port: "
                         "http://127.0.0.1:PORT/v1")
    say = progress or (lambda message: None)
    config = ProxyConfig.model_validate({"backends": [{
        "name": "engine", "kind": kind, "base_url": backend_url, "model_names": {CLIENT_MODEL: engine_model}}]})
    loop, http = proxy_runtime()
    started, load_before = time.time(), load_average()
    proxy = start_proxy(config, loop, http)
    rng = random.Random(seed)
    try:
        results = {}
        for name, stream in (("non_streaming", False), ("streaming_ttft", True)):
            say(f"{name}: {pairs} pairs ...")
            results[name] = asyncio.run(_pairs(url.port, f"{url.path.rstrip('/')}/chat/completions", proxy.port,
                                               engine_model, stream, pairs, warmup, rng))
            proxy.check_alive()
    finally:
        proxy.stop()
    return {**report_header("pass-through overhead in front of an engine", started, load_before),
            "backend": backend_url, "kind": kind, "engine_model": engine_model, "proxy": {"loop": loop, "http": http},
            **results}


def format_engine_report(report: dict[str, Any]) -> str:
    lines = [f"pass-through in front of {report['kind']} at {report['backend']} ({report['engine_model']})",
             f"{'':<16}{'pairs':>6}{'direct p50':>13}{'proxy p50':>12}{'added p50':>12}  95 % interval"]
    for name in ("non_streaming", "streaming_ttft"):
        r = report[name]
        low, high = r["added_ci95_ms"]
        lines.append(f"{name:<16}{r['pairs']:>6}{r['direct_p50_ms']:>10.2f} ms{r['proxy_p50_ms']:>9.2f} ms"
                     f"{r['added_p50_ms']:>+9.2f} ms  [{low:+.2f}, {high:+.2f}] ms"
                     + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    return "\n".join(lines)
