"""`ttc-proxy bench --routing`: what `auto`'s routing costs in proxy time, against the same stages run fixed.

The scripted fake backend (answering at once) and the proxy each run in their own process (tools/servers.py). For
k = 1, 2, 3 stages this process sends pairs of requests, in random order within each pair, one at a time on one
keep-alive connection each (tools/rawhttp.py):

* fixed: the strategy of the cascade's last stage on its own (`cot`, `bon:n=4,...>cot`, `bon:n=8,...>cot`);
* auto: `auto` with an inline policy that runs the k stages without stopping (`cot`, then `bon:n=4,...>cot`, then
  `bon:n=8,...>cot`), each later stage reusing the runs the earlier ones drew.

With reuse both sides send the same number of backend calls (checked once per k from `ttc.backend_calls`, and
reported), so the paired difference is the proxy's own cost of routing: the policy, every stage's set-up, signals
and decision, and the details it reports. The report is each side's median and the median of the paired
differences with a bootstrap 95 % interval, and that difference divided by k: the cost per stage.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
import urllib.request
from typing import Any

from ttc_proxy.proxy.config import config_for_backend_url

from .engine_bench import median_interval, paired_times
from .rawhttp import post_bytes
from .servers import BENCH_MODEL, HOST, load_average, proxy_runtime, report_header, start_backend, start_proxy

LOGPROB = "select=confidence,confidence=logprob"
# The stages of the cascades measured: stage k's strategy is also the fixed side of the k-stage pair.
STAGES = (("cot", {"strategy": "cot"}),
          (f"bon:n=4,{LOGPROB}>cot", {"strategy": "bon", "params": {"n": 4, "select": "confidence",
                                                                      "confidence": "logprob"},
                                      "over": {"strategy": "cot"}}),
          (f"bon:n=8,{LOGPROB}>cot", {"strategy": "bon", "params": {"n": 8, "select": "confidence",
                                                                      "confidence": "logprob"},
                                      "over": {"strategy": "cot"}}))
QUESTION = [{"role": "user", "content": "What is 2+2? Answer with just the number."}]
TARGET_MS_PER_STAGE = 1.0


def never_stopping_policy(stages: int) -> dict[str, Any]:
    """A policy running the first `stages` stages to the end: no stop rule, one operating point."""
    return {"model": BENCH_MODEL, "default": 0, "points": [{"budget": 1e12, "stages": [
        {"name": name, "spec": spec} for name, spec in STAGES[:stages]]}]}


def fixed_body(stages: int) -> dict[str, Any]:
    return {"model": f"{STAGES[stages - 1][0]}-{BENCH_MODEL}", "messages": QUESTION, "max_tokens": 16,
            "temperature": 0}


def auto_body(stages: int) -> dict[str, Any]:
    return {"model": f"auto-{BENCH_MODEL}", "messages": QUESTION, "max_tokens": 16, "temperature": 0,
            "ttc": {"params": {"policy": never_stopping_policy(stages)}}}


def backend_calls(port: int, body: dict[str, Any]) -> int:
    """One request through the proxy, checked: its `ttc.backend_calls`."""
    request = urllib.request.Request(f"http://{HOST}:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
        return int(reply["ttc"]["backend_calls"])
    except (OSError, ValueError, KeyError, TypeError) as exc:  # refused, not JSON, or no ttc: cannot measure
        raise ValueError(f"the proxy did not answer {body.get('model')!r} with its backend calls: {exc}") from exc


async def _pairs(port: int, stages: int, pairs: int, warmup: int, rng: random.Random) -> dict[str, Any]:
    sides = {side: (port, post_bytes(port, json.dumps(body, separators=(",", ":")).encode(), False))
             for side, body in (("fixed", fixed_body(stages)), ("auto", auto_body(stages)))}
    times, failed = await paired_times(sides, stream=False, pairs=pairs, warmup=warmup, rng=rng)
    added = [a - f for a, f in zip(times["auto"], times["fixed"])]
    median, low, high = median_interval(added)
    return {"stages": stages, "fixed": STAGES[stages - 1][0], "auto": " | ".join(n for n, _ in STAGES[:stages]),
            "pairs": len(added), "failed": failed,
            "fixed_p50_ms": statistics.median(times["fixed"]), "auto_p50_ms": statistics.median(times["auto"]),
            "added_p50_ms": median, "added_ci95_ms": [low, high],
            "added_per_stage_ms": median / stages, "added_per_stage_ci95_ms": [low / stages, high / stages]}


def run_routing_overhead(*, pairs: int = 200, warmup: int = 20, seed: int = 1,
                         progress: Any = None) -> dict[str, Any]:
    """Start the fake backend and the proxy and measure auto against fixed for 1, 2 and 3 stages, paired."""
    say = progress or (lambda message: None)
    loop, http = proxy_runtime()
    started, load_before = time.time(), load_average()
    rng = random.Random(seed)
    backend = start_backend(64)
    proxy = None
    try:
        proxy = start_proxy(config_for_backend_url(f"http://{HOST}:{backend.port}/v1"), loop, http)
        results = []
        for stages in range(1, len(STAGES) + 1):
            calls = {"fixed": backend_calls(proxy.port, fixed_body(stages)),
                     "auto": backend_calls(proxy.port, auto_body(stages))}
            say(f"{stages} stage(s): {pairs} pairs ...")
            result = asyncio.run(_pairs(proxy.port, stages, pairs, warmup, rng))
            results.append({**result, "backend_calls": calls})
            proxy.check_alive()
            backend.check_alive()
    finally:
        if proxy is not None:
            proxy.stop()
        backend.stop()
    worst = max(r["added_per_stage_ms"] for r in results)
    return {**report_header("auto's routing cost against the same stages run fixed", started, load_before),
            "setup": {"backend": "ttc_proxy.tools.fakebackend.FakeBackend, own process, answers at once",
                      "proxy": f"own process, 1 uvicorn worker, loop={loop}, http={http}",
                      "client": "raw asyncio HTTP/1.1 keep-alive, this process", "pairs": pairs, "warmup": warmup,
                      "seed": seed, "question": QUESTION[0]["content"], "max_tokens": 16},
            "cascades": results,
            "target": {"name": "added proxy time per stage (median of paired differences)",
                       "target": f"< {TARGET_MS_PER_STAGE:g} ms", "worst_ms": worst,
                       "met": worst < TARGET_MS_PER_STAGE},
            "same_backend_calls": all(r["backend_calls"]["fixed"] == r["backend_calls"]["auto"] for r in results),
            "all_answered_ok": all(r["failed"] == 0 for r in results)}


def format_routing_report(report: dict[str, Any]) -> str:
    machine = report["machine"]
    load = machine.get("load_average_before")
    lines = [f"auto's routing cost against the same stages run fixed (fake backend answering at once; "
             f"{report['setup']['pairs']} pairs after {report['setup']['warmup']} warm-up, random order per pair)",
             f"machine: {machine['nproc']} CPUs, {machine['cpu_model']}; load average before "
             f"{' '.join(f'{x:.2f}' for x in load) if load else '-'}",
             f"{'stages':<7}{'calls fixed/auto':>17}{'fixed p50':>12}{'auto p50':>11}{'added p50':>12}"
             f"{'  95 % interval':<22}{'per stage':>10}  fixed vs auto"]
    for r in report["cascades"]:
        low, high = r["added_ci95_ms"]
        calls = r["backend_calls"]
        lines.append(f"{r['stages']:<7}{calls['fixed']:>9}/{calls['auto']:<7}{r['fixed_p50_ms']:>9.2f} ms"
                     f"{r['auto_p50_ms']:>8.2f} ms{r['added_p50_ms']:>+9.2f} ms  [{low:+.2f}, {high:+.2f}] ms"
                     f"{r['added_per_stage_ms']:>+10.2f} ms  {r['fixed']} vs {r['auto']}"
                     + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    target = report["target"]
    lines.append(f"target: {target['name']} {target['target']}: worst {target['worst_ms']:+.2f} ms, "
                 f"{'met' if target['met'] else 'MISSED'}; the same backend calls on both sides: "
                 f"{'yes' if report['same_backend_calls'] else 'NO'}")
    return "\n".join(lines)
