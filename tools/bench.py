"""`ttc-proxy bench`: what the proxy itself adds in pass-through.

Three processes, so that none shares an event loop (or the GIL) with another:

* the backend: tools.fakebackend.FakeBackend on raw asyncio (uvloop when installed), answering at once;
* the proxy: create_app(config_for_backend_url(backend)) under one uvicorn worker (uvloop + httptools);
* the load generator: a minimal raw-asyncio HTTP/1.1 keep-alive client (an asyncio.Protocol that writes
  request bytes and parses status line, headers, content-length bodies and chunked server-sent events).
  A full client such as httpx would spend more CPU per request than the proxy does, on a 2-core machine.

Each scenario runs once straight at the backend and once through the proxy; the difference is the proxy's cost:

* 1 connection, sequential, non-streaming: latency p50/p99;
* 1 connection, sequential, streaming: time to first token (the first `data:` event carrying content);
* N connections (default 16) for a fixed time, non-streaming: requests per second.

Everything stays on 127.0.0.1, every phase is bounded in count and time, and the child processes are ended
on the way out, including on errors and Ctrl-C (and they end themselves if this process dies).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ttc_proxy.proxy.config import TelemetrySettings, config_for_backend_url

from .argtypes import positive_float, positive_int
from .rawhttp import HTTPConnection, Tally, connect, post_bytes
from .servers import (
    BENCH_MODEL,
    HOST,
    ChildFailed,
    child_env,
    exit_with_parent,
    has_module,
    load_average,
    proxy_runtime,
    report_header,
    process_cpu_seconds,
    run_loop,
    sigterm_as_interrupt,
    start_backend,
    start_proxy,
)

DEFAULT_OUTPUT = Path("bench-results/overhead.json")

# Pass-through targets on the reference machine (2 cores, one proxy worker).
TARGET_ADDED_P50_MS = 1.0
TARGET_PROXY_RPS = 500.0

MAX_REQUESTS = 1_000_000
MAX_DURATION = 600.0
MAX_CONCURRENCY = 1024


def request_body(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}],
                            "max_tokens": 16}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def request_bytes(port: int, stream: bool) -> bytes:
    return post_bytes(port, request_body(stream), stream)


def loadgen_main() -> None:
    """Child: reads one phase's spec as JSON on stdin, runs it, prints the result as JSON on stdout."""
    spec = json.loads(sys.stdin.read())
    exit_with_parent(int(spec["parent_pid"]))
    result = run_loop(run_phase(spec))
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()


async def _sequential(port: int, stream: bool, requests: int, warmup: int) -> dict[str, Any]:
    data = request_bytes(port, stream)
    conn = await connect(port)
    try:
        for _ in range(warmup):
            await conn.request(data, stream)
        tally = Tally()
        gc.collect()
        started = time.perf_counter()
        for _ in range(requests):
            tally.add(*await conn.request(data, stream))
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    return {**tally.result(), "sent": warmup + requests, "seconds": elapsed,
            "rps": requests / elapsed if elapsed > 0 else 0.0}


async def _concurrent(port: int, stream: bool, concurrency: int, duration: float, warmup: int) -> dict[str, Any]:
    data = request_bytes(port, stream)
    conns = await asyncio.gather(*(connect(port) for _ in range(concurrency)))
    tally = Tally()
    late = 0
    deadline = 0.0

    async def warm(conn: HTTPConnection) -> None:
        for _ in range(warmup):
            await conn.request(data, stream)

    async def worker(conn: HTTPConnection) -> None:
        nonlocal late
        while True:
            result = await conn.request(data, stream)
            if time.perf_counter() > deadline:
                late += 1  # finished after the window closed: not counted
                return
            tally.add(*result)

    try:
        await asyncio.gather(*(warm(conn) for conn in conns))
        gc.collect()
        deadline = time.perf_counter() + duration
        await asyncio.gather(*(worker(conn) for conn in conns))
    finally:
        for conn in conns:
            conn.close()
    counted = tally.result()
    return {**counted, "sent": warmup * concurrency + counted["requests"] + late, "seconds": duration,
            "rps": counted["requests"] / duration, "concurrency": concurrency, "late": late}


async def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """One phase against one port: `sequential` (requests, warmup) or `concurrent` (concurrency, duration)."""
    gc.disable()
    try:
        if spec["kind"] == "sequential":
            return await _sequential(spec["port"], spec["stream"], spec["requests"], spec["warmup"])
        return await _concurrent(spec["port"], spec["stream"], spec["concurrency"], spec["duration"],
                                 spec["warmup"])
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------------------------
# Orchestration



def _run_loadgen(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    spec = {**spec, "parent_pid": os.getpid()}
    stderr = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", "from ttc_proxy.tools.bench import loadgen_main; loadgen_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=child_env())
    try:
        out, _ = proc.communicate(json.dumps(spec).encode(), timeout=timeout)
    except BaseException as exc:
        proc.kill()
        proc.wait(5)
        stderr.close()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise ChildFailed(f"the {spec['kind']} phase on port {spec['port']} did not finish within {timeout:.0f} s")
        raise
    try:
        if proc.returncode != 0:
            stderr.seek(0)
            raise ChildFailed(f"load generator failed ({proc.returncode}):\n"
                             f"{stderr.read().decode('utf-8', 'replace')[-3000:]}")
        return json.loads(out)
    finally:
        stderr.close()


def _p(result: dict[str, Any], key: str, stat: str) -> float | None:
    summary = result.get(key)
    return None if summary is None else summary[stat]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


# --metrics-off-too: a second proxy without metrics, measured in both orders in each round of each phase (on, off,
# off, on), so neither gains from running second; a round's difference is the mean of its two runs on minus off.
# Rounds repeat that, so the difference gets an interval.
TARGET_METRICS_ADDED_MS = 0.1
MAX_ROUNDS = 50


def metrics_rounds(rounds: int) -> list[tuple[str, str, str, str]]:
    """Each round's run names, in the order they run: (on, off, off, on). Round 1's first runs are named
    "proxy" and "proxy_metrics_off", the names the rest of the report reads."""
    names = []
    for r in range(rounds):
        first, second = ("", "#2") if r == 0 else (f"#{2 * r + 1}", f"#{2 * r + 2}")
        names.append((f"proxy{first}", f"proxy_metrics_off{first}", f"proxy_metrics_off{second}", f"proxy{second}"))
    return names


def run_benchmark(*, requests: int = 2000, warmup: int = 200, duration: float = 5.0, concurrency: int = 16,
                  loop: str | None = None, http: str | None = None,
                  progress: Any = None, metrics_off_too: bool = False, rounds: int = 1) -> dict[str, Any]:
    """Start the backend and the proxy, run every phase direct and through the proxy, return all numbers."""
    _check_limits(requests, duration, concurrency, rounds)
    warmup = max(0, min(warmup, MAX_REQUESTS))
    loop, http = proxy_runtime(loop, http)
    started = time.time()
    load_before = load_average()
    phases = _measure_phases(requests=requests, warmup=warmup, duration=duration, concurrency=concurrency,
                             loop=loop, http=http, say=progress or (lambda message: None),
                             metrics_off_too=metrics_off_too, rounds=rounds)
    summary, checks = _summary_and_checks(phases, concurrency, metrics_off_too, rounds)
    answered = all(result["requests"] > 0 and result["ok"] == result["requests"]
                   for phase in phases.values() for result in phase.values())
    return {
        **report_header("pass-through overhead", started, load_before),
        "setup": {
            "model": BENCH_MODEL,
            "request_body": json.loads(request_body(False)),
            "backend": "ttc_proxy.tools.fakebackend.FakeBackend, own process, " + ("uvloop" if has_module("uvloop") else "asyncio"),
            "proxy": f"create_app(config_for_backend_url(...)), uvicorn, 1 worker, loop={loop}, http={http}, "
                     "access log off",
            "client": "raw asyncio HTTP/1.1 keep-alive, own process",
            "requests": requests,
            "warmup": warmup,
            "duration_s": duration,
            "concurrency": concurrency,
            "metrics_off_too": metrics_off_too,
            "rounds": rounds if metrics_off_too else None,
        },
        "phases": phases,
        "summary": summary,
        "targets": checks,
        "all_answered_ok": answered,
    }


def _check_limits(requests: int, duration: float, concurrency: int, rounds: int) -> None:
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests must be in 1..{MAX_REQUESTS}")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION}]")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be in 1..{MAX_CONCURRENCY}")
    if not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be in 1..{MAX_ROUNDS}")


def _measure_phases(*, requests: int, warmup: int, duration: float, concurrency: int, loop: str, http: str,
                    say: Any, metrics_off_too: bool, rounds: int) -> dict[str, dict[str, Any]]:
    """Each phase against each target (the backend direct, the proxy, the proxy with metrics off), with the CPU
    each process spent per request."""
    backend = proxy = quiet = None
    try:
        backend = start_backend(max(64, concurrency))
        config = config_for_backend_url(f"http://{HOST}:{backend.port}/v1")
        proxy = start_proxy(config, loop, http)
        backend_port, proxy_port = backend.port, proxy.port

        targets = {"direct": backend_port, "proxy": proxy_port}
        if metrics_off_too:
            quiet = start_proxy(config.model_copy(update={"telemetry": TelemetrySettings(metrics=False)}), loop, http)
            ports = {"proxy": proxy_port, "proxy_metrics_off": quiet.port}
            targets = {"direct": backend_port, **{name: ports[name.split("#")[0]]
                                                  for names in metrics_rounds(rounds) for name in names}}
        sequential_timeout = 60.0 + (requests + warmup) * 0.05
        concurrent_timeout = 60.0 + duration * 2 + warmup * 0.05
        phases: dict[str, dict[str, Any]] = {"sequential": {}, "streaming": {}, "concurrent": {}}
        plan = [
            ("sequential", {"kind": "sequential", "stream": False, "requests": requests, "warmup": warmup},
             sequential_timeout),
            ("streaming", {"kind": "sequential", "stream": True, "requests": requests, "warmup": warmup},
             sequential_timeout),
            ("concurrent", {"kind": "concurrent", "stream": False, "concurrency": concurrency, "duration": duration,
                            "warmup": max(1, min(warmup // 10, 50))}, concurrent_timeout),
        ]
        for name, spec, timeout in plan:
            for target, port in targets.items():
                say(f"{name:<11} {target:<6} ...")
                serving = quiet if quiet is not None and port == quiet.port else proxy
                before = {child.name: process_cpu_seconds(child.proc.pid) for child in (backend, serving)}
                result = _run_loadgen({**spec, "port": port}, timeout)
                cpu: dict[str, float | None] = {}
                for child in (backend, serving):
                    end, start = process_cpu_seconds(child.proc.pid), before[child.name]
                    cpu[child.key] = (None if end is None or start is None or not result["sent"]
                                      else (end - start) * 1000.0 / result["sent"])
                result["cpu_ms_per_request"] = cpu
                phases[name][target] = result
                backend.check_alive()
                proxy.check_alive()
        return phases
    finally:
        for child in (quiet, proxy, backend):
            if child is not None:
                child.stop()


def _summary_and_checks(phases: dict[str, dict[str, Any]], concurrency: int, metrics_off_too: bool,
                        rounds: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The added latency, TTFT and throughput, and each against its target."""
    seq, stream, conc = phases["sequential"], phases["streaming"], phases["concurrent"]
    summary = {
        "sequential_added_p50_ms": _diff(_p(seq["direct"], "latency_ms", "p50"), _p(seq["proxy"], "latency_ms", "p50")),
        "sequential_added_p99_ms": _diff(_p(seq["direct"], "latency_ms", "p99"), _p(seq["proxy"], "latency_ms", "p99")),
        "ttft_added_p50_ms": _diff(_p(stream["direct"], "ttft_ms", "p50"), _p(stream["proxy"], "ttft_ms", "p50")),
        "ttft_added_p99_ms": _diff(_p(stream["direct"], "ttft_ms", "p99"), _p(stream["proxy"], "ttft_ms", "p99")),
        "direct_rps": conc["direct"]["rps"],
        "proxy_rps": conc["proxy"]["rps"],
        "proxy_rps_fraction": conc["proxy"]["rps"] / conc["direct"]["rps"] if conc["direct"]["rps"] else None,
    }
    checks = [
        {"name": "added p50 latency, 1 connection, non-streaming", "value": summary["sequential_added_p50_ms"],
         "target": f"<= {TARGET_ADDED_P50_MS:g} ms", "unit": "ms"},
        {"name": "added p50 TTFT, 1 connection, streaming", "value": summary["ttft_added_p50_ms"],
         "target": f"<= {TARGET_ADDED_P50_MS:g} ms", "unit": "ms"},
        {"name": f"requests/s via proxy, {concurrency} connections", "value": summary["proxy_rps"],
         "target": f">= {TARGET_PROXY_RPS:g}", "unit": "req/s"},
    ]
    for check, limit, upper in zip(checks, (TARGET_ADDED_P50_MS, TARGET_ADDED_P50_MS, TARGET_PROXY_RPS),
                                   (True, True, False)):
        value = check["value"]
        check["met"] = value is not None and (value <= limit if upper else value >= limit)
    if metrics_off_too:
        summary["metrics"] = metrics_comparison(phases, rounds)
        for key, name in (("sequential_added_p50_ms", "latency p50, 1 connection, non-streaming"),
                          ("ttft_added_p50_ms", "TTFT p50, 1 connection, streaming")):
            value = summary["metrics"][key]
            checks.append({"name": f"metrics on vs off: {name}", "value": value,
                           "target": f"<= {TARGET_METRICS_ADDED_MS:g} ms", "unit": "ms",
                           "met": value is not None and value <= TARGET_METRICS_ADDED_MS})
    return summary, checks


def metrics_comparison(phases: dict[str, dict[str, Any]], rounds: int = 1) -> dict[str, Any]:
    """What metrics add: each measure with metrics on minus off, per round (each side the mean of its two runs in
    that round), then the mean over rounds with a 95 % t-interval when there are several."""
    order = metrics_rounds(rounds)

    def per_round(phase: str, measure: Any) -> list[float]:
        differences = []
        for on_a, off_a, off_b, on_b in order:
            values = [measure(phases[phase][name]) for name in (on_a, on_b, off_a, off_b)]
            if None not in values:
                differences.append((values[0] + values[1]) / 2 - (values[2] + values[3]) / 2)
        return differences

    def added(phase: str, measure: Any) -> dict[str, Any]:
        differences = per_round(phase, measure)
        return {"mean": sum(differences) / len(differences) if differences else None,
                "interval": t_interval(differences), "rounds": differences}

    conc = phases["concurrent"]
    on_names = [name for names in order for name in (names[0], names[3])]
    off_names = [name for names in order for name in (names[1], names[2])]
    latency = {stat: (lambda result, stat=stat: _p(result, "latency_ms", stat)) for stat in ("p50", "p99")}
    ttft = {stat: (lambda result, stat=stat: _p(result, "ttft_ms", stat)) for stat in ("p50", "p99")}
    proxy_cpu = lambda result: _cpu(result, "proxy")  # noqa: E731
    detail = {
        "sequential_p50": added("sequential", latency["p50"]),
        "sequential_p99": added("sequential", latency["p99"]),
        "ttft_p50": added("streaming", ttft["p50"]),
        "ttft_p99": added("streaming", ttft["p99"]),
        # the proxy process's CPU time per request: less moved by other processes on the machine than latency
        "cpu": {phase: added(phase, proxy_cpu) for phase in ("sequential", "streaming", "concurrent")},
    }
    return {
        "rounds": rounds,
        "sequential_added_p50_ms": detail["sequential_p50"]["mean"],
        "sequential_added_p99_ms": detail["sequential_p99"]["mean"],
        "ttft_added_p50_ms": detail["ttft_p50"]["mean"],
        "ttft_added_p99_ms": detail["ttft_p99"]["mean"],
        "cpu_added_ms": {phase: value["mean"] for phase, value in detail["cpu"].items()},
        "detail": detail,
        "rps_on": sum(conc[name]["rps"] for name in on_names) / len(on_names),
        "rps_off": sum(conc[name]["rps"] for name in off_names) / len(off_names),
        "runs": {name: {"sequential_p50_ms": _p(phases["sequential"][name], "latency_ms", "p50"),
                        "ttft_p50_ms": _p(phases["streaming"][name], "ttft_ms", "p50"),
                        "proxy_cpu_ms": _cpu(phases["sequential"][name], "proxy"),
                        "rps": conc[name]["rps"]} for names in order for name in names},
    }


# two-sided 95 % Student t quantiles by degrees of freedom (beyond 30, 30's: a little wide)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95 % t-interval of the mean of `values` (None with fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    t = [q for df, q in _T95.items() if df <= n - 1][-1]  # the nearest tabled df at or below: conservative
    half = t * sd / n ** 0.5
    return (mean - half, mean + half)


# ---------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, unit: str = "ms", sign: bool = False) -> str:
    if value is None or value != value:
        return "-"
    if unit == "ms":
        return f"{value:+.3f} ms" if sign else f"{value:.3f} ms"
    return f"{value:+,.0f}" if sign else f"{value:,.0f}"


def _cpu(result: dict[str, Any], key: str) -> float | None:
    return (result.get("cpu_ms_per_request") or {}).get(key)


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    setup = report["setup"]
    phases = report["phases"]
    seq, stream, conc = phases["sequential"], phases["streaming"], phases["concurrent"]
    load = m.get("load_average_before")
    lines = [
        "ttc-proxy pass-through overhead",
        f"machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['implementation']} {m['python']}, {m['platform']}",
        f"         load average before {' '.join(f'{x:.2f}' for x in load) if load else '-'}"
        f", after {' '.join(f'{x:.2f}' for x in m['load_average_after']) if m.get('load_average_after') else '-'}",
        f"proxy:   {setup['proxy']}",
        f"backend: {setup['backend']}; client: {setup['client']}",
        f"load:    {setup['requests']} sequential requests after {setup['warmup']} warm-up; "
        f"{setup['concurrency']} connections for {setup['duration_s']:g} s",
        "",
        f"{'scenario':<32}{'metric':<20}{'direct':>14}{'via proxy':>14}{'added':>14}",
        "-" * 94,
    ]

    def line(scenario: str, metric: str, direct: float | None, proxied: float | None, unit: str = "ms") -> None:
        lines.append(f"{scenario:<32}{metric:<20}{_fmt(direct, unit):>14}{_fmt(proxied, unit):>14}"
                     f"{_fmt(_diff(direct, proxied), unit, sign=True):>14}")

    def row(scenario: str, metric: str, key: str, stat: str, pair: dict[str, Any]) -> None:
        line(scenario, metric, _p(pair["direct"], key, stat), _p(pair["proxy"], key, stat))

    def cpu_rows(pair: dict[str, Any]) -> None:
        lines.append(f"{'':<32}{'proxy CPU/request':<20}{'':>14}{_fmt(_cpu(pair['proxy'], 'proxy')):>14}")

    row("1 connection, non-streaming", "latency p50", "latency_ms", "p50", seq)
    row("", "latency p99", "latency_ms", "p99", seq)
    cpu_rows(seq)
    row("1 connection, streaming", "TTFT p50", "ttft_ms", "p50", stream)
    row("", "TTFT p99", "ttft_ms", "p99", stream)
    row("", "complete p50", "latency_ms", "p50", stream)
    cpu_rows(stream)
    c = setup["concurrency"]
    line(f"{c} connections, non-streaming", "requests/s", conc["direct"]["rps"], conc["proxy"]["rps"], "rps")
    row("", "latency p50", "latency_ms", "p50", conc)
    row("", "latency p99", "latency_ms", "p99", conc)
    cpu_rows(conc)
    metrics = report["summary"].get("metrics")
    if metrics is not None:
        lines.append("")
        rounds = metrics.get("rounds", 1)
        lines.append(f"metrics on vs off (two proxies, same backend; {rounds} round(s) of on, off, off, on in each "
                     "phase):")
        for name, run in metrics["runs"].items():
            lines.append(f"  {name:<22} latency p50 {_fmt(run['sequential_p50_ms'])}   TTFT p50 "
                         f"{_fmt(run['ttft_p50_ms'])}   proxy CPU {_fmt(run.get('proxy_cpu_ms'))}   "
                         f"{_fmt(run['rps'], 'rps')} req/s")
        lines.append(f"  req/s {_fmt(metrics['rps_on'], 'rps')} on, {_fmt(metrics['rps_off'], 'rps')} off")
        lines.append("  added by metrics (on minus off; mean over rounds [95 % t-interval]):")
        detail = metrics.get("detail")
        if detail is not None:
            shown = [("latency p50, non-streaming", detail["sequential_p50"]),
                     ("latency p99, non-streaming", detail["sequential_p99"]),
                     ("TTFT p50, streaming", detail["ttft_p50"]), ("TTFT p99, streaming", detail["ttft_p99"]),
                     ("proxy CPU/request, non-streaming", detail["cpu"]["sequential"]),
                     ("proxy CPU/request, streaming", detail["cpu"]["streaming"]),
                     (f"proxy CPU/request, {c} connections", detail["cpu"]["concurrent"])]
            for label, value in shown:
                interval = value["interval"]
                around = f"  [{_fmt(interval[0], sign=True)}, {_fmt(interval[1], sign=True)}]" if interval else ""
                lines.append(f"    {label:<36}{_fmt(value['mean'], sign=True):>12}{around}")
    lines.append("")
    counts = []
    for name, pair in phases.items():
        for target, result in pair.items():
            counts.append(f"{name}/{target} {result['ok']}/{result['requests']}")
    lines.append("answered 200 with a well-formed body: " + ", ".join(counts))
    lines.append("")
    lines.append("targets:")
    for check in report["targets"]:
        value = check["value"]
        shown = "-" if value is None else (f"{value:.3f} ms" if check["unit"] == "ms" else f"{value:,.0f} req/s")
        lines.append(f"  {check['name']:<50}{check['target']:>12}  {shown:>14}  "
                     f"{'met' if check['met'] else 'MISSED'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "bench", help="measure what the proxy adds in pass-through (latency, TTFT, requests/s)",
        description="Runs a fake backend, the proxy (one uvicorn worker) and a raw HTTP load generator, each in "
                    "its own process on 127.0.0.1, and compares direct-to-backend with through-the-proxy.",
    )
    parser.add_argument("--requests", type=positive_int, default=2000,
                        help="sequential requests per one-connection phase, after warm-up (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per phase (default 200)")
    parser.add_argument("--duration", type=positive_float, default=5.0,
                        help="seconds of the concurrent phase (default 5)")
    parser.add_argument("--concurrency", type=positive_int, default=16,
                        help="connections in the concurrent phase (default 16)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help=f"where to write the JSON results (default {DEFAULT_OUTPUT})")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], help="the proxy's event loop (default uvloop)")
    parser.add_argument("--http", choices=["httptools", "h11"], help="the proxy's HTTP parser (default httptools)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--metrics-off-too", action="store_true",
                        help="also measure a proxy with metrics off (telemetry.metrics: false), both orders in "
                             "each phase, and report what metrics add")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="with --metrics-off-too: rounds of (on, off, off, on) per phase, for an interval on "
                             "what metrics add (default 1)")
    parser.add_argument("--log-level", default="warning")
    routing = parser.add_argument_group("auto's routing cost (tools/routing_bench.py): paired requests on the "
                                        "fake backend, auto running 1-3 stages against the same stages run fixed")
    routing.add_argument("--routing", action="store_true",
                         help="measure auto's routing cost instead of pass-through (pairs: --pairs; output default "
                              "bench-results/routing.json)")
    engine = parser.add_argument_group("in front of a real engine (tools/engine_bench.py): paired requests, "
                                       "direct and through the proxy")
    engine.add_argument("--backend", help="the engine's base URL on loopback, e.g. http://127.0.0.1:8201/v1")
    engine.add_argument("--kind", default="generic", help="the backend's kind in the proxy's config")
    engine.add_argument("--engine-model", default="smollm2", help="the model name the engine wants")
    engine.add_argument("--pairs", type=positive_int, default=200,
                        help="pairs per phase, with --backend or --routing (default 200)")
    parser.set_defaults(handler=bench_command)
    return parser


def bench_command(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.rounds != 1 and not args.metrics_off_too:
        print("ttc-proxy bench: --rounds repeats the metrics on/off comparison: use it with --metrics-off-too",
              file=sys.stderr)
        return 2
    if args.routing:
        from .routing_bench import format_routing_report, run_routing_overhead

        output = Path(args.output)
        if output == DEFAULT_OUTPUT:
            output = output.with_name("routing.json")
        report = _run_and_write(lambda: run_routing_overhead(pairs=args.pairs, warmup=min(args.warmup, args.pairs),
                                                             progress=say), format_routing_report, output)
        if isinstance(report, int):
            return report
        if not (report["all_answered_ok"] and report["same_backend_calls"]):
            print("ttc-proxy bench: some requests failed, or auto sent other backend calls than the fixed stages",
                  file=sys.stderr)
            return 1
        return 1 if args.check and not report["target"]["met"] else 0
    if args.backend:
        from .engine_bench import format_engine_report, run_engine_overhead

        output = Path(args.output)
        if output == DEFAULT_OUTPUT:
            output = output.with_name(f"overhead-{args.kind}.json")
        report = _run_and_write(lambda: run_engine_overhead(backend_url=args.backend, kind=args.kind,
                                                            engine_model=args.engine_model, pairs=args.pairs,
                                                            progress=say), format_engine_report, output)
        return report if isinstance(report, int) else \
            int(bool(report["non_streaming"]["failed"] + report["streaming_ttft"]["failed"]))
    report = _run_and_write(lambda: run_benchmark(requests=args.requests, warmup=args.warmup, duration=args.duration,
                                                  concurrency=args.concurrency, loop=args.loop, http=args.http,
                                                  progress=say, metrics_off_too=args.metrics_off_too,
                                                  rounds=args.rounds),
                                   format_report, Path(args.output))
    if isinstance(report, int):
        return report
    if not report["all_answered_ok"]:
        print("ttc-proxy bench: some requests were not answered 200 with a well-formed body", file=sys.stderr)
        return 1
    if args.check and not all(check["met"] for check in report["targets"]):
        return 1
    return 0


def _run_and_write(run: Any, format_report: Any, output: Path) -> dict[str, Any] | int:
    """Run a measurement, print its report and write it as JSON; an exit status if it could not run."""
    try:
        report = run()
    except (ChildFailed, ValueError) as exc:
        print(f"ttc-proxy bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ttc-proxy bench: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {output}")
    return report
