"""`ttc-proxy bench-strategy`: what a strategy adds in wall time over asking the engine for the same samples.

For each task, the same n samples are asked for twice, alternating which goes first: once from the engine
directly in one request (`n`, logprobs), once through the proxy with a strategy prefix that draws n samples
(default `bon:n=8,select=confidence`). The proxy starts its own embedded engine (or uses --backend), and the
direct requests go to that same engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp

from ttc_proxy.proxy.config import resolve_config

from .eval.runner import InProcessProxy
from .eval.tasks import load_tasks


async def _timed_post(client: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with client.post(url, json=body) as response:
        response.raise_for_status()
        await response.read()
    return time.perf_counter() - started


async def measure(proxy_url: str, engine_url: str, model: str, questions: list[str], n: int, strategy: str,
                  max_tokens: int, top_logprobs: int) -> list[tuple[float, float]]:
    pairs = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as client:
        for i, question in enumerate(questions):
            messages = [{"role": "user", "content": question}]
            direct = {"model": model, "messages": messages, "n": n, "temperature": 0.8, "max_tokens": max_tokens,
                      "logprobs": True, "top_logprobs": top_logprobs}
            proxied = {"model": f"{strategy}-{model}", "messages": messages, "temperature": 0.8,
                       "max_tokens": max_tokens}
            calls = [(f"{engine_url}/chat/completions", direct), (f"{proxy_url}/chat/completions", proxied)]
            if i % 2:
                calls.reverse()
            times = {url: await _timed_post(client, url, body) for url, body in calls}
            pairs.append((times[f"{engine_url}/chat/completions"], times[f"{proxy_url}/chat/completions"]))
    return pairs


def bench_strategy_command(args: argparse.Namespace) -> int:
    config = resolve_config(args.config, args.backend)
    tasks = load_tasks(args.tasks, args.limit)
    strategy = args.strategy
    with InProcessProxy(config, args.log_level) as server:
        state = server.server.config.app.state.proxy  # the running app's backends: where the engine listens
        backend = next(iter(state.backends.values()))
        model = next(iter(backend.served_models), "default")  # a backend that lists nothing takes any name
        pairs = asyncio.run(measure(server.base_url, backend.base_url, model, [t.messages[-1]["content"] for t in tasks],
                                    args.n, strategy, args.max_tokens, args.top_logprobs))
    direct = [d for d, _ in pairs]
    proxied = [p for _, p in pairs]
    ratios = [p / d for d, p in pairs]
    result = {
        "strategy": strategy, "tasks": len(pairs), "max_tokens": args.max_tokens,
        "direct_median_s": round(statistics.median(direct), 3),
        "proxied_median_s": round(statistics.median(proxied), 3),
        "ratio_of_medians": round(statistics.median(proxied) / statistics.median(direct), 3),
        "median_ratio": round(statistics.median(ratios), 3),
        "total_ratio": round(sum(proxied) / sum(direct), 3),
    }
    print(f"{strategy} through the proxy vs {args.n} samples from the engine in one request "
          f"({len(pairs)} tasks, max_tokens {args.max_tokens}, alternating order)")
    print(f"  direct  median {result['direct_median_s']:.3f} s")
    print(f"  proxied median {result['proxied_median_s']:.3f} s")
    print(f"  ratio: median of per-task ratios {result['median_ratio']:.3f}, of totals {result['total_ratio']:.3f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("bench-strategy", help="wall time of a strategy against the same N samples direct")
    parser.add_argument("tasks", help="JSONL task file (question or messages)")
    parser.add_argument("--strategy", default="bon:n=8,select=confidence",
                        help="the strategy prefix through the proxy (default bon:n=8,select=confidence)")
    parser.add_argument("--n", type=int, default=8, help="samples in the direct request: the strategy's sample count")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--top-logprobs", type=int, default=5, help="as bon's confidence selector asks (default 5)")
    parser.add_argument("--config")
    parser.add_argument("--backend")
    parser.add_argument("--output", default="bench-results/strategy.json")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=bench_strategy_command)

