"""`ttc-proxy load`: many concurrent clients through the proxy, against the scripted fake backend, on loopback.

Three processes (see tools/servers.py): the fake backend, the proxy (one uvicorn worker, so its peak RSS is its
own: VmHWM in /proc/PID/status), and the clients here, on the raw HTTP client of tools/rawhttp.py (500 clients
cost this process far less CPU than the proxy spends on them; the report shows how much). The fake answers
`fake-paced` in `chunks` chunks `chunk_delay` apart (non-streaming: after as long), like an engine generating,
and `fake-model` at once.

Phases, each bounded in count and time:

* streaming: `clients` concurrent streaming pass-through requests, straight at the backend and through the proxy:
  wall time, requests/s, latency and time to first token p50/p99, errors;
* non-streaming: the same without streaming;
* mix: `clients` concurrent requests through the proxy, cycling through pass-through and strategy prefixes,
  streaming and not;
* isolation: pass-through latency (instant backend, a few connections in a loop) idle and while `background`
  strategy requests (`sc:n=16` over the paced model) run, in alternating windows: the p99 ratio;
* disconnect: a streaming `sc:n=8` request whose client leaves once its 8 backend calls are in flight: the time
  until the fake backend has seen every one of those calls closed (both clocks are CLOCK_MONOTONIC, one clock for
  every process on Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ttc_proxy.proxy.config import BackendConfig, ProxyConfig

from .argtypes import positive_float, positive_int
from .rawhttp import HTTPConnection, Tally, connect, post_bytes, summarize_ms
from .servers import (
    BENCH_MODEL,
    HOST,
    PACED_MODEL,
    ChildFailed,
    ChildServer,
    load_average,
    proxy_runtime,
    report_header,
    process_cpu_seconds,
    run_loop,
    sigterm_as_interrupt,
    start_backend,
    start_proxy,
)

DEFAULT_OUTPUT = Path("bench-results/load.json")
MAX_CLIENTS = 2000

# Targets on the reference machine (2 cores, one proxy worker), from issue 11.
TARGET_TIME_RATIO = 1.5  # streaming wall time through the proxy / straight at the backend
TARGET_PEAK_RSS_MB = 300.0
TARGET_CANCEL_MS = 100.0  # client gone -> every backend call of its request closed
TARGET_P99_RATIO = 2.0  # pass-through p99 with strategies running / idle

# The proxy's bounds for the load run. The fake backend has no in-flight limit of its own (an engine configured
# with a high one), so the proxy's scheduler must not be what the run measures: up to 1024 calls in flight, the
# size of the proxy's backend connection pool (proxy/app.py), so every call that holds a slot also gets a
# connection at once (above it a call would wait for one and time out after timeouts.connect); 4096 more queue
# in the scheduler instead of being refused with 429 (a mix of 500 clients x sc:n=4 asks for 2,000 calls at once).
PROXY_MAX_IN_FLIGHT = 1024
PROXY_MAX_QUEUE = 4096
BACKEND_SLOTS = 1024  # what the fake's /props reports: the engine's n cap the proxy learns


@dataclass(frozen=True)
class LoadSettings:
    clients: int = 500
    chunks: int = 20
    chunk_delay: float = 0.2
    mix: tuple[str, ...] = ("none", "sc:n=4", "bon:n=4")  # strategy prefixes; "none" is pass-through
    background: int = 16
    background_strategy: str = "sc:n=16"
    probe_connections: int = 4
    probe_seconds: float = 3.0  # each window
    probe_rounds: int = 3  # idle and loaded windows, alternating
    disconnects: int = 5
    disconnect_n: int = 8
    timeout: float = 120.0  # bound on each phase

    def check(self) -> None:
        if not 1 <= self.clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be in 1..{MAX_CLIENTS}")
        if not 1 <= self.chunks <= 10_000 or not 0 <= self.chunk_delay <= 10:
            raise ValueError("chunks must be in 1..10000 and chunk_delay in 0..10 s")
        if not self.mix:
            raise ValueError("the mix needs at least one entry")
        if self.background < 0 or self.disconnects < 0 or not 1 <= self.disconnect_n <= 64:
            raise ValueError("background and disconnects must be >= 0, disconnect_n in 1..64")
        if not 0 < self.probe_seconds <= 600 or not 1 <= self.probe_rounds <= 100 or not 0 < self.timeout <= 3600:
            raise ValueError("probe_seconds must be in (0, 600], probe_rounds in 1..100, timeout in (0, 3600]")


def proxy_config(backend_url: str) -> ProxyConfig:
    backend = BackendConfig(name="fake", kind="llama_cpp", base_url=backend_url, models=[BENCH_MODEL, PACED_MODEL],
                            max_in_flight=PROXY_MAX_IN_FLIGHT, max_queue=PROXY_MAX_QUEUE)
    return ProxyConfig(backends=[backend])


def _body(model: str, stream: bool, max_tokens: int) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "What is 2+2?"}],
                            "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    if model not in (BENCH_MODEL, PACED_MODEL):
        body["seed"] = 1  # seeded, a strategy draws every sample in its own backend call: its largest fan-out
    return json.dumps(body, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) so far, in MB (Linux); None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _CPU:
    """CPU seconds each process spent during a phase."""

    def __init__(self, children: dict[str, ChildServer]) -> None:
        self.children = children
        self.before = {name: process_cpu_seconds(child.proc.pid) for name, child in children.items()}
        self.own = _own_cpu_seconds()

    def spent(self) -> dict[str, float | None]:
        spent: dict[str, float | None] = {"clients": _own_cpu_seconds() - self.own}
        for name, child in self.children.items():
            end, start = process_cpu_seconds(child.proc.pid), self.before[name]
            spent[name] = None if end is None or start is None else end - start
        return spent


class _Errors:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def _one(port: int, data: bytes, stream: bool, tally: Tally, errors: _Errors, deadline: float) -> None:
    """One client: connect, send one request, read the whole answer; every failure is counted by kind."""
    conn: HTTPConnection | None = None
    try:
        async with asyncio.timeout_at(deadline):
            conn = await connect(port)
            status, seconds, ttft, ok = await conn.request(data, stream)
        tally.add(status, seconds, ttft, ok)
        if not ok:
            errors.add(f"status {status}" if status != 200 else "malformed body")
    except TimeoutError:
        errors.add("timeout")
    except OSError as exc:
        errors.add(type(exc).__name__)
    finally:
        if conn is not None:
            conn.close()


async def concurrent_requests(port: int, requests: Sequence[tuple[bytes, bool]], timeout: float) -> dict[str, Any]:
    """All `requests` (body bytes, stream) at once, one connection each: wall time, rates, latencies, errors."""
    tally, errors = Tally(), _Errors()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(_one(port, data, stream, tally, errors, started + timeout) for data, stream in requests))
    wall = loop.time() - started
    counted = tally.result()
    return {"clients": len(requests), **counted, "errors": errors.counts, "error_count": errors.total,
            "wall_s": wall, "rps": counted["ok"] / wall if wall > 0 else 0.0}


async def _sequential_until(port: int, data: bytes, stop: asyncio.Event, tally: Tally, errors: _Errors) -> None:
    """Requests one after another on one keep-alive connection until `stop` is set."""
    conn = await connect(port)
    try:
        while not stop.is_set():
            status, seconds, ttft, ok = await conn.request(data, False)
            tally.add(status, seconds, ttft, ok)
            if not ok:
                errors.add(f"status {status}")
    except OSError as exc:
        errors.add(type(exc).__name__)
    finally:
        conn.close()


async def _probe_latency(port: int, connections: int, seconds: float, tally: Tally, errors: _Errors) -> None:
    """Instant non-streaming pass-through requests in a loop on `connections` connections for `seconds`."""
    data = post_bytes(port, _body(BENCH_MODEL, False, 16), False)
    stop = asyncio.Event()
    workers = [asyncio.create_task(_sequential_until(port, data, stop, tally, errors)) for _ in range(connections)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*workers)


async def _background(port: int, model: str, start_after: float, stop: asyncio.Event, tally: Tally,
                      errors: _Errors) -> None:
    """Strategy requests one after another until `stop`; the one running then is abandoned (the proxy cancels it)."""
    data = post_bytes(port, _body(model, False, 32), False)
    try:
        await asyncio.wait_for(stop.wait(), start_after)
        return
    except TimeoutError:
        pass
    while not stop.is_set():
        conn = await connect(port)
        request = asyncio.ensure_future(conn.request(data, False))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({request, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if request.done():
                status, seconds, ttft, ok = request.result()
                tally.add(status, seconds, ttft, ok)
                if not ok:
                    errors.add(f"status {status}")
        except OSError as exc:
            errors.add(type(exc).__name__)
        finally:
            stopped.cancel()
            request.cancel()
            conn.close()


async def isolation(port: int, settings: LoadSettings) -> dict[str, Any]:
    """Pass-through latency idle and beside `background` strategy requests, in alternating windows (idle, loaded,
    idle, loaded, ...), so that whatever else the machine does weighs on both alike. In a loaded window every
    background request is running, their starts spread over one run's length so that runs start and finish
    throughout the window, as they would under steady use."""
    model = f"{settings.background_strategy}-{PACED_MODEL}"
    run_seconds = settings.chunks * settings.chunk_delay  # how long one sample, so one strategy run, takes
    idle, idle_errors = Tally(), _Errors()
    loaded, loaded_errors = Tally(), _Errors()
    background, background_errors = Tally(), _Errors()
    for _ in range(settings.probe_rounds):
        await _probe_latency(port, settings.probe_connections, settings.probe_seconds, idle, idle_errors)
        stop = asyncio.Event()
        workers = [asyncio.create_task(_background(port, model, i * run_seconds / settings.background, stop,
                                                   background, background_errors))
                   for i in range(settings.background)]
        try:
            await asyncio.sleep(run_seconds + 0.1)  # every one of them has started
            await _probe_latency(port, settings.probe_connections, settings.probe_seconds, loaded, loaded_errors)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        await asyncio.sleep(0.2)  # the abandoned runs are cancelled before the next idle window

    def probe(tally: Tally, errors: _Errors) -> dict[str, Any]:
        seconds = settings.probe_rounds * settings.probe_seconds
        return {**tally.result(), "errors": errors.counts, "error_count": errors.total, "seconds": seconds,
                "rps": len(tally.latencies) / seconds}

    result = {"idle": probe(idle, idle_errors), "loaded": probe(loaded, loaded_errors),
              "background": {"requests": settings.background, "model": model, "completed": background.result(),
                             "errors": background_errors.counts, "error_count": background_errors.total}}
    idle_p99 = (result["idle"]["latency_ms"] or {}).get("p99")
    loaded_p99 = (result["loaded"]["latency_ms"] or {}).get("p99")
    result["p99_ratio"] = loaded_p99 / idle_p99 if idle_p99 and loaded_p99 is not None else None
    return result


async def _get_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return json.loads(await reader.readexactly(length))
    finally:
        writer.close()


async def _calls(backend_port: int, request_id: str) -> list[dict[str, Any]]:
    return await _get_json(backend_port, f"/calls?request_id={request_id}")


async def _disconnect_once(proxy_port: int, backend_port: int, settings: LoadSettings) -> dict[str, Any]:
    """A streaming sc:n request; once all its backend calls are in flight the client closes its connection.
    How long until the backend saw the last of them closed."""
    request_id = f"load-disconnect-{uuid.uuid4().hex}"
    model = f"sc:n={settings.disconnect_n}-{PACED_MODEL}"
    conn = await connect(proxy_port)
    answer = conn.request(post_bytes(proxy_port, _body(model, True, 32), True, {"x-request-id": request_id}), True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    calls: list[dict[str, Any]] = []
    try:
        while len(calls) < settings.disconnect_n and loop.time() < deadline:
            calls = await _calls(backend_port, request_id)
            await asyncio.sleep(0.002)
        open_before = sum(1 for c in calls if c["ended"] is None)
    finally:
        left_at = time.monotonic()
        conn.close()
        answer.cancel()  # nobody reads it: the client is gone
        if not answer.cancelled():
            answer.exception()  # an answer that had already ended (or failed) is read, so nothing is left unseen
    while loop.time() < deadline:
        calls = await _calls(backend_port, request_id)
        if all(c["ended"] is not None for c in calls):
            break
        await asyncio.sleep(0.002)
    closed = [c["ended"] for c in calls if c["ended"] is not None and c["ended"] >= left_at]
    still_open = sum(1 for c in calls if c["ended"] is None)
    return {
        "calls": len(calls),
        "open_at_disconnect": open_before,
        "aborted": sum(1 for c in calls if c["aborted"]),
        "still_open": still_open,
        "all_closed_ms": (max(closed) - left_at) * 1000.0 if closed and not still_open else None,
    }


async def disconnects(proxy_port: int, backend_port: int, settings: LoadSettings) -> dict[str, Any]:
    runs = [await _disconnect_once(proxy_port, backend_port, settings) for _ in range(settings.disconnects)]
    measured = [r["all_closed_ms"] for r in runs if r["all_closed_ms"] is not None and r["open_at_disconnect"]]
    return {"model": f"sc:n={settings.disconnect_n}-{PACED_MODEL}", "stream": True, "runs": runs,
            "all_closed_ms": summarize_ms([m / 1000.0 for m in measured]),
            "complete": len(measured) == len(runs) and all(r["still_open"] == 0 for r in runs)}


# ---------------------------------------------------------------------------------------------------------------
# The run


def _mix_requests(port: int, settings: LoadSettings) -> tuple[list[tuple[bytes, bool]], list[str]]:
    """Client i runs mix entry i mod len(mix), streaming on every other round through the mix."""
    requests, kinds = [], []
    for i in range(settings.clients):
        prefix = settings.mix[i % len(settings.mix)]
        stream = (i // len(settings.mix)) % 2 == 0
        model = PACED_MODEL if prefix == "none" else f"{prefix}-{PACED_MODEL}"
        requests.append((post_bytes(port, _body(model, stream, 32), stream), stream))
        kinds.append(f"{prefix}{' stream' if stream else ''}")
    return requests, kinds


async def _phases(backend: ChildServer, proxy: ChildServer, settings: LoadSettings,
                  say: Any) -> dict[str, Any]:
    children = {"proxy": proxy, "backend": backend}
    targets = {"direct": backend.port, "proxy": proxy.port}
    phases: dict[str, Any] = {}

    async def measured(name: str, target: str, work: Any) -> dict[str, Any]:
        say(f"{name:<14} {target:<6} ...")
        cpu = _CPU(children)
        result = await work
        result["cpu_s"] = cpu.spent()
        if target == "proxy":
            result["proxy_peak_rss_mb"] = peak_rss_mb(proxy.proc.pid)
        backend.check_alive()
        proxy.check_alive()
        return result

    for name, stream in (("streaming", True), ("non_streaming", False)):
        phases[name] = {}
        for target, port in targets.items():
            data = post_bytes(port, _body(PACED_MODEL, stream, 32), stream)
            phases[name][target] = await measured(
                name, target, concurrent_requests(port, [(data, stream)] * settings.clients, settings.timeout))
        direct, proxied = phases[name]["direct"], phases[name]["proxy"]
        phases[name]["time_ratio"] = proxied["wall_s"] / direct["wall_s"] if direct["wall_s"] else None

    requests, kinds = _mix_requests(proxy.port, settings)
    mix = await measured("mix", "proxy", concurrent_requests(proxy.port, requests, settings.timeout))
    mix["kinds"] = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
    phases["mix"] = mix
    planned = settings.probe_rounds * (2 * settings.probe_seconds + settings.chunks * settings.chunk_delay + 0.3)
    phases["isolation"] = await measured("isolation", "proxy",
                                         asyncio.wait_for(isolation(proxy.port, settings), planned + settings.timeout))
    phases["disconnect"] = await measured("disconnect", "proxy",
                                          asyncio.wait_for(disconnects(proxy.port, backend.port, settings),
                                                           settings.timeout))
    return phases


def _targets(phases: dict[str, Any], settings: LoadSettings, peak_rss: float | None) -> list[dict[str, Any]]:
    streaming = phases["streaming"]
    cancel = phases["disconnect"]["all_closed_ms"]
    checks = [
        (f"{settings.clients} streaming clients: errors via proxy", streaming["proxy"]["error_count"], "== 0",
         lambda v: v == 0),
        ("streaming wall time, via proxy / direct", streaming["time_ratio"], f"<= {TARGET_TIME_RATIO:g}",
         lambda v: v <= TARGET_TIME_RATIO),
        ("proxy peak RSS (MB)", peak_rss, f"<= {TARGET_PEAK_RSS_MB:g}", lambda v: v <= TARGET_PEAK_RSS_MB),
        (f"client gone -> all sc:n={settings.disconnect_n} backend calls closed, max ms",
         cancel["max"] if cancel and phases["disconnect"]["complete"] else None, f"<= {TARGET_CANCEL_MS:g}",
         lambda v: v <= TARGET_CANCEL_MS),
        (f"pass-through p99 with {settings.background} x {settings.background_strategy} / idle",
         phases["isolation"]["p99_ratio"], f"<= {TARGET_P99_RATIO:g}", lambda v: v <= TARGET_P99_RATIO),
    ]
    return [{"name": name, "value": value, "target": target, "met": value is not None and bool(test(value))}
            for name, value, target, test in checks]


def _error_count(phases: dict[str, Any]) -> int:
    total = 0
    for name in ("streaming", "non_streaming"):
        total += phases[name]["direct"]["error_count"] + phases[name]["proxy"]["error_count"]
    isolation = phases["isolation"]
    total += phases["mix"]["error_count"] + isolation["idle"]["error_count"] + isolation["loaded"]["error_count"]
    return total + isolation["background"]["error_count"]


def run_load(settings: LoadSettings, *, loop: str | None = None, http: str | None = None,
             progress: Any = None) -> dict[str, Any]:
    """Start the backend and the proxy, run every phase, return all numbers."""
    settings.check()
    loop, http = proxy_runtime(loop, http)
    say = progress or (lambda message: None)
    started = time.time()
    load_before = load_average()
    backend = proxy = None
    try:
        backend = start_backend(BACKEND_SLOTS, settings.chunks, settings.chunk_delay)
        config = proxy_config(f"http://{HOST}:{backend.port}/v1")
        proxy = start_proxy(config, loop, http)
        phases = run_loop(_phases(backend, proxy, settings, say))
        peak_rss = peak_rss_mb(proxy.proc.pid)
    finally:
        for child in (proxy, backend):
            if child is not None:
                child.stop()
    errors = _error_count(phases)
    return {
        **report_header("load", started, load_before),
        "setup": {
            **asdict(settings),
            "backend": "ttc_proxy.tools.fakebackend.FakeBackend, own process; "
                       f"{PACED_MODEL}: {settings.chunks} chunks {settings.chunk_delay * 1000:g} ms apart",
            "proxy": f"own process, uvicorn 1 worker, loop={loop}, http={http}, its access log at INFO (as serve); "
                     f"max_in_flight={PROXY_MAX_IN_FLIGHT}, max_queue={PROXY_MAX_QUEUE}",
            "client_side": f"{settings.clients} in this process, raw asyncio HTTP/1.1, one connection each",
        },
        "phases": phases,
        "proxy_peak_rss_mb": peak_rss,
        "errors": errors,
        "targets": _targets(phases, settings, peak_rss),
    }


# ---------------------------------------------------------------------------------------------------------------
# Output


def _ms(summary: dict[str, Any] | None, stat: str) -> str:
    return "-" if not summary else f"{summary[stat]:,.1f}"


def _num(value: float | None, fmt: str = ",.2f") -> str:
    return "-" if value is None else format(value, fmt)


def format_report(report: dict[str, Any]) -> str:
    m, setup, phases = report["machine"], report["setup"], report["phases"]
    load = m.get("load_average_before")
    lines = [
        "ttc-proxy load",
        f"machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['implementation']} {m['python']}",
        f"         load average before {' '.join(f'{x:.2f}' for x in load) if load else '-'}",
        f"backend: {setup['backend']}",
        f"proxy:   {setup['proxy']}",
        f"clients: {setup['client_side']}",
        "",
        (f"{'phase':<24}{'target':<8}{'ok/sent':>11}{'errors':>8}{'wall s':>8}{'req/s':>8}"
         f"{'p50 ms':>9}{'p99 ms':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'CPU s c/p/b':>17}"),
        "-" * 122,
    ]

    def row(name: str, target: str, r: dict[str, Any]) -> None:
        cpu = r.get("cpu_s") or {}
        shown = "/".join(_num(cpu.get(k), ".1f") for k in ("clients", "proxy", "backend"))
        lines.append(f"{name:<24}{target:<8}{r['ok']:>5}/{r['clients'] if 'clients' in r else r['requests']:<5}"
                     f"{r['error_count']:>8}{_num(r.get('wall_s'), '.2f'):>8}{_num(r.get('rps'), ',.0f'):>8}"
                     f"{_ms(r['latency_ms'], 'p50'):>9}{_ms(r['latency_ms'], 'p99'):>9}"
                     f"{_ms(r['ttft_ms'], 'p50'):>10}{_ms(r['ttft_ms'], 'p99'):>10}{shown:>17}")

    for name in ("streaming", "non_streaming"):
        for target in ("direct", "proxy"):
            row(f"{setup['clients']} {name.replace('_', '-')}", target, phases[name][target])
    row(f"mix {'/'.join(setup['mix'])}", "proxy", phases["mix"])
    iso = phases["isolation"]
    row("pass-through, idle", "proxy", iso["idle"])
    row(f"  + {setup['background']} x {setup['background_strategy']}", "proxy", iso["loaded"])
    lines.append("")
    for name in ("streaming", "non_streaming"):
        lines.append(f"{name.replace('_', '-')} wall time via proxy / direct: {_num(phases[name]['time_ratio'])}")
    lines.append(f"pass-through p99 with background / idle: {_num(iso['p99_ratio'])}")
    disconnect = phases["disconnect"]
    closed = disconnect["all_closed_ms"]
    lines.append(f"disconnect ({disconnect['model']}, {len(disconnect['runs'])} runs): all backend calls closed "
                 f"within p50 {_ms(closed, 'p50')} ms, max {_ms(closed, 'max')} ms; "
                 f"calls open at disconnect {[r['open_at_disconnect'] for r in disconnect['runs']]}")
    lines.append(f"proxy peak RSS (VmHWM): {_num(report['proxy_peak_rss_mb'], '.1f')} MB")
    lines.append(f"errors in all phases: {report['errors']}")
    lines.append("")
    lines.append("targets:")
    for check in report["targets"]:
        lines.append(f"  {check['name']:<62}{check['target']:>8}  {_num(check['value']):>10}  "
                     f"{'met' if check['met'] else 'MISSED'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_parser(commands: Any) -> argparse.ArgumentParser:
    defaults = LoadSettings()
    parser = commands.add_parser(
        "load", help="many concurrent clients through the proxy against the scripted fake backend",
        description="Runs the fake backend and the proxy each in its own process on 127.0.0.1 and many concurrent "
                    "clients here: streaming and non-streaming, direct and through the proxy, a strategy mix, "
                    "pass-through latency beside strategies, and cancellation on disconnect.",
    )
    parser.add_argument("--clients", type=positive_int, default=defaults.clients,
                        help=f"concurrent clients per phase (default {defaults.clients})")
    parser.add_argument("--chunks", type=positive_int, default=defaults.chunks,
                        help=f"chunks per paced answer (default {defaults.chunks})")
    parser.add_argument("--chunk-delay", type=float, default=defaults.chunk_delay,
                        help=f"seconds between chunks (default {defaults.chunk_delay:g})")
    parser.add_argument("--mix", nargs="+", default=list(defaults.mix),
                        help="strategy prefixes the mix phase cycles through; none: pass-through "
                             f"(default {' '.join(defaults.mix)})")
    parser.add_argument("--background", type=int, default=defaults.background,
                        help=f"strategy requests beside the pass-through probe (default {defaults.background})")
    parser.add_argument("--background-strategy", default=defaults.background_strategy,
                        help=f"their strategy prefix (default {defaults.background_strategy})")
    parser.add_argument("--probe-connections", type=positive_int, default=defaults.probe_connections,
                        help=f"pass-through probe connections (default {defaults.probe_connections})")
    parser.add_argument("--probe-seconds", type=positive_float, default=defaults.probe_seconds,
                        help=f"seconds of each pass-through probe window (default {defaults.probe_seconds:g})")
    parser.add_argument("--probe-rounds", type=positive_int, default=defaults.probe_rounds,
                        help=f"idle and loaded probe windows, alternating (default {defaults.probe_rounds})")
    parser.add_argument("--disconnects", type=int, default=defaults.disconnects,
                        help=f"disconnect measurements (default {defaults.disconnects})")
    parser.add_argument("--disconnect-n", type=positive_int, default=defaults.disconnect_n,
                        help=f"n of the sc request whose client leaves (default {defaults.disconnect_n})")
    parser.add_argument("--timeout", type=positive_float, default=defaults.timeout,
                        help=f"bound on each phase, seconds (default {defaults.timeout:g})")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help=f"where to write the JSON results (default {DEFAULT_OUTPUT})")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], help="the proxy's event loop (default uvloop)")
    parser.add_argument("--http", choices=["httptools", "h11"], help="the proxy's HTTP parser (default httptools)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=load_command)
    return parser


def load_command(args: argparse.Namespace) -> int:
    settings = LoadSettings(clients=args.clients, chunks=args.chunks, chunk_delay=args.chunk_delay,
                            mix=tuple(args.mix), background=args.background,
                            background_strategy=args.background_strategy, probe_connections=args.probe_connections,
                            probe_seconds=args.probe_seconds, probe_rounds=args.probe_rounds,
                            disconnects=args.disconnects,
                            disconnect_n=args.disconnect_n, timeout=args.timeout)
    try:
        with sigterm_as_interrupt():
            report = run_load(settings, loop=args.loop, http=args.http,
                              progress=lambda message: print(message, file=sys.stderr, flush=True))
    except (ChildFailed, ValueError) as exc:
        print(f"ttc-proxy load: {exc}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"ttc-proxy load: a phase did not finish within its bound (--timeout {settings.timeout:g} s)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ttc-proxy load: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {output}")
    if report["errors"]:
        print(f"ttc-proxy load: {report['errors']} requests failed", file=sys.stderr)
        return 1
    if args.check and not all(check["met"] for check in report["targets"]):
        return 1
    return 0
