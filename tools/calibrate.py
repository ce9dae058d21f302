"""`ttc-proxy calibrate`: measure where a model's entropy and varentropy count as low or high.

The model answers sample prompts (a task file, e.g. the half of the dev set the eval does not use) through the
proxy with `top_logprobs` at its maximum; every generated position's entropy and varentropy (strategies/
uncertainty.py) is measured, and the thresholds of the `entropy` strategy are set at quantiles of what was seen
(by default: low at the median, high at the 90th percentile), so "high" means "rarer than 1 position in 10 for this
model under these conditions". The file written holds the thresholds as that model's `entropy` defaults;
config.yaml names it under `strategies.calibration`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ttc_proxy.strategies.uncertainty import Thresholds, Uncertainty, uncertainty

from .argtypes import positive_int
from .eval.runner import Progress, add_engine_arguments, proxy_endpoint
from .eval.tasks import EvalError, Task, add_subset_arguments, load_tasks

QUANTILES = (10, 25, 50, 75, 90, 95, 99)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "calibrate", help="measure a model's entropy thresholds for the entropy strategy",
        description="Runs a model on sample prompts through the proxy with top_logprobs, measures the entropy and "
                    "varentropy of every generated position, and writes that model's entropy thresholds (quantiles "
                    "of what it saw) to a file config.yaml can name under strategies.calibration.")
    parser.add_argument("tasks", help="JSONL task file of sample prompts (the eval's format; answers unused)")
    parser.add_argument("--model", required=True, help="the model to calibrate (a plain model name)")
    parser.add_argument("--out", help="the file to write (default: calibration/MODEL.json)")
    add_engine_arguments(parser)
    add_subset_arguments(parser)
    parser.add_argument("--max-tokens", type=positive_int, default=48, help="max_tokens per prompt (default 48)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    parser.add_argument("--top-logprobs", type=positive_int, default=20,
                        help="alternatives per position (default 20, llama.cpp's maximum)")
    parser.add_argument("--low-quantile", type=float, default=50.0, help="percentile for low (default 50)")
    parser.add_argument("--high-quantile", type=float, default=90.0, help="percentile for high (default 90)")
    parser.add_argument("--concurrency", type=positive_int, default=4)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=calibrate_command)
    return parser


async def measure(base_url: str, api_key: str, model: str, tasks: Sequence[Task], *, max_tokens: int,
                  temperature: float, top_logprobs: int, concurrency: int,
                  progress: Progress) -> tuple[list[Uncertainty], int]:
    """Every generated position's uncertainty over all tasks, and the number of failed requests."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    measured: list[Uncertainty] = []
    failed = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(task: Task) -> None:
        nonlocal failed
        async with gate:
            ok = True
            try:
                response = await client.chat.completions.create(
                    model=model, messages=task.messages, max_tokens=max_tokens, temperature=temperature,
                    logprobs=True, top_logprobs=top_logprobs)
            except openai.OpenAIError:
                failed += 1
                ok = False
            else:
                for choice in response.choices:
                    for entry in (choice.logprobs.content if choice.logprobs and choice.logprobs.content else []):
                        value = uncertainty([t.logprob for t in entry.top_logprobs])
                        if value is not None:
                            measured.append(value)
            progress.advance(ok)

    try:
        await asyncio.gather(*(one(t) for t in tasks))
    finally:
        await client.close()
    return measured, failed


def thresholds_from(measured: Sequence[Uncertainty], low: float, high: float) -> Thresholds:
    entropy = np.array([m.entropy for m in measured])
    varentropy = np.array([m.varentropy for m in measured])
    return Thresholds(low_entropy=round(float(np.percentile(entropy, low)), 4),
                      high_entropy=round(float(np.percentile(entropy, high)), 4),
                      low_varentropy=round(float(np.percentile(varentropy, low)), 4),
                      high_varentropy=round(float(np.percentile(varentropy, high)), 4))


def calibration_record(model: str, measured: Sequence[Uncertainty], thresholds: Thresholds,
                       source: dict[str, Any]) -> dict[str, Any]:
    """The file's content: the thresholds as the model's `entropy` defaults, and what they were measured on."""
    def quantiles(values: Sequence[float]) -> dict[str, float]:
        return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in QUANTILES}

    regimes: dict[str, int] = {}
    for m in measured:
        regime = thresholds.regime(m)
        regimes[regime] = regimes.get(regime, 0) + 1
    return {
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "defaults": {"entropy": thresholds.model_dump()},
        "measured": {
            **source,
            "positions": len(measured),
            "entropy": quantiles([m.entropy for m in measured]),
            "varentropy": quantiles([m.varentropy for m in measured]),
            "tail_mass": quantiles([m.tail_mass for m in measured]),
            "entropy_upper_bound": quantiles([m.entropy_high for m in measured]),
            "regime_shares": {k: round(v / len(measured), 4) for k, v in sorted(regimes.items())},
        },
    }


def calibrate_command(args: argparse.Namespace) -> int:
    """Exit status: 0 written, 1 nothing measured, 2 bad input or no proxy, 130 interrupted."""
    if not 0 <= args.low_quantile <= args.high_quantile <= 100:
        print("ttc-proxy calibrate: need 0 <= --low-quantile <= --high-quantile <= 100", file=sys.stderr)
        return 2
    try:
        tasks = load_tasks(args.tasks, args.limit, args.every, args.start)
    except EvalError as exc:
        print(f"ttc-proxy calibrate: {exc}", file=sys.stderr)
        return 2
    progress = Progress(len(tasks), enabled=not args.no_progress, name="calibrate")
    started = time.monotonic()
    try:
        with proxy_endpoint(args) as (base_url, api_key):
            progress.started = time.monotonic()
            progress.start(args.model)
            measured, failed = asyncio.run(measure(
                base_url, api_key, args.model, tasks, max_tokens=args.max_tokens, temperature=args.temperature,
                top_logprobs=args.top_logprobs, concurrency=args.concurrency, progress=progress))
    except EvalError as exc:
        print(f"ttc-proxy calibrate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nttc-proxy calibrate: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.close()
    if not measured:
        print(f"ttc-proxy calibrate: no position measured ({failed} of {len(tasks)} requests failed; does the "
              f"engine return top_logprobs?)", file=sys.stderr)
        return 1
    thresholds = thresholds_from(measured, args.low_quantile, args.high_quantile)
    source = {"tasks_file": str(args.tasks), "tasks": len(tasks), "every": args.every, "start": args.start,
              "failed": failed, "max_tokens": args.max_tokens, "temperature": args.temperature,
              "top_logprobs": args.top_logprobs, "low_quantile": args.low_quantile,
              "high_quantile": args.high_quantile, "seconds": round(time.monotonic() - started, 1)}
    record = calibration_record(args.model, measured, thresholds, source)
    out = Path(args.out or f"calibration/{args.model.replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"ttc-proxy calibrate: {len(measured)} positions from {len(tasks)} prompts ({failed} failed); "
          f"thresholds {thresholds.model_dump()}; regimes {record['measured']['regime_shares']}; wrote {out}")
    return 0
