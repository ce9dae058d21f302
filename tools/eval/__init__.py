"""`ttc-proxy eval`: accuracy, tokens, backend calls and latency of model strings on a task file.

Each model string (`smollm2`, `sc:n=8-smollm2`, ...) answers every task through the proxy, with the official
OpenAI SDK. The proxy is either one already running (`--proxy URL`) or one this command starts in-process
(uvicorn in a background thread, with `--config FILE`, `--backend URL` or the default config: the embedded
local engine).

The parts: tasks (task files), checks (grading replies), runner (live and pooled runs, the in-process proxy),
pooled (strategies scored on shared pools of samples), stats (intervals, summaries, pairwise differences), report
(tables, files, plot); `ttc-proxy report` (regenerate.py) rebuilds the tables from saved results.json files.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ttc_proxy.proxy.errors import ProxyError
from ttc_proxy.proxy.registry import load_registry
from ttc_proxy.strategies.framework import Strategy

from ..argtypes import json_object, positive_float, positive_int
from .report import render_errors, render_matrix, render_table, write_json, write_tables
from .pooled import parse_strategy_string
from .runner import Progress, Record, RunSettings, add_engine_arguments, proxy_endpoint, run_eval, run_pooled
from .stats import ACCURACY_METHOD, DIFF_METHOD, PAIRWISE_METHOD, pairwise_differences, summarise_all
from .tasks import EvalError, Task, add_subset_arguments, load_tasks

DEFAULT_OUT = Path("eval-results")


def _model_budget(text: str) -> tuple[str, dict[str, Any]]:
    model, sep, budget = text.partition("={")  # model strings hold '=' but never '{'
    if not sep or not model:
        raise argparse.ArgumentTypeError("expected MODEL={...}")
    return model, json_object("{" + budget)


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "eval", help="accuracy, tokens, calls and latency of model strings on a task file",
        description="Runs every task of a JSONL task file against each model string through the proxy (one "
                    "already running with --proxy, else one started in-process) and prints, per model string, "
                    "accuracy with a 95% Wilson interval, mean tokens and backend calls per task, latency and "
                    "errors, plus the paired accuracy difference against a baseline model string and between "
                    "every pair. Writes results.json (every request), summary.csv, pairwise.csv, report.md and "
                    "accuracy_vs_tokens.png to --out (`ttc-proxy report` regenerates all but results.json).",
    )
    parser.add_argument("tasks", help="JSONL task file: id, question or messages, answer, check "
                                      "(number | exact | regex | boxed)")
    parser.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                        help="model strings to compare, e.g. smollm2 sc:n=8-smollm2 'bon:n=8-smollm2'")
    parser.add_argument("--baseline", help="the model string the others are compared with (default: the first)")
    add_engine_arguments(parser)
    parser.add_argument("--max-tokens", type=positive_int, default=48, help="max_tokens per request (default 48)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: not sent)")
    parser.add_argument("--seed", type=int, help="task i (0-based, file order) is sent with seed SEED+i, the same "
                                                 "for every model string (default: no seed)")
    add_subset_arguments(parser)
    parser.add_argument("--concurrency", type=positive_int, default=4,
                        help="requests in flight at once (default 4); model strings run one after another")
    parser.add_argument("--timeout", type=positive_float, default=300.0,
                        help="seconds per request before it counts as an error (default 300)")
    parser.add_argument("--extra-body", type=json_object, default={}, metavar="JSON",
                        help="a JSON object merged into every request body, e.g. '{\"top_k\": 20}'")
    parser.add_argument("--budget", action="append", default=[], metavar="MODEL=JSON", type=_model_budget,
                        help="a ttc.budget for one model string, e.g. 'mcts-smollm2={\"max_total_tokens\": 555}' "
                             "(repeatable)")
    parser.add_argument("--stream", action="store_true",
                        help="stream every live request and report the time to its first content token (TTFT)")
    parser.add_argument("--pool", type=positive_int, metavar="N",
                        help="score strategy model strings on one pool of N samples per task (seeded, with "
                             "logprobs), so every strategy sees the same samples; plain model strings run live")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"output directory (default {DEFAULT_OUT}/, git-ignored; the Makefile's eval targets "
                             "write to docs/results/DATE-NAME/, which is committed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=eval_command)
    return parser


async def run_all(base_url: str, api_key: str, models: Sequence[str], tasks: Sequence[Task], settings: RunSettings,
                  progress: Progress, pool_size: int | None,
                  registry: Mapping[str, type[Strategy]]) -> dict[str, list[Record]]:
    """Live model strings, then (with a pool) the strategy model strings scored on the pool."""
    pooled = [m for m in models if pool_size is not None and parse_strategy_string(m, registry) is not None]
    live = [m for m in models if m not in pooled]
    try:
        results = await run_eval(base_url, api_key, live, tasks, settings, progress) if live else {}
        if pooled and pool_size is not None:
            results.update(await run_pooled(base_url, api_key, pooled, tasks, settings, pool_size, progress,
                                            registry))
    finally:
        progress.close()
    return results


def eval_command(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 every request failed, 2 bad input or no proxy, 130 interrupted."""
    models: list[str] = list(dict.fromkeys(args.models))
    baseline = args.baseline or models[0]
    try:
        if baseline not in models:
            raise EvalError(f"--baseline {baseline!r} is not one of --models")
        registry = load_registry()[0]
        for model in models:
            try:
                parse_strategy_string(model, registry)
            except ProxyError as exc:
                raise EvalError(f"--models: {exc.message}") from exc
        unknown = [m for m, _ in args.budget if m not in models]
        if unknown:
            raise EvalError(f"--budget names model strings not in --models: {unknown}")
        tasks = load_tasks(args.tasks, args.limit, args.every, args.start)
    except EvalError as exc:
        print(f"ttc-proxy eval: {exc}", file=sys.stderr)
        return 2
    settings = RunSettings(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                           timeout=args.timeout, concurrency=args.concurrency, extra_body=args.extra_body,
                           budgets=dict(args.budget), stream=args.stream)
    progress = Progress(len(tasks) * len(models), enabled=not args.no_progress)
    started_at = datetime.now(timezone.utc)
    started = time.monotonic()
    try:
        with proxy_endpoint(args) as (base_url, api_key):
            progress.started = time.monotonic()
            results = asyncio.run(run_all(base_url, api_key, models, tasks, settings, progress, args.pool,
                                          registry))
    except EvalError as exc:
        print(f"ttc-proxy eval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nttc-proxy eval: interrupted", file=sys.stderr)
        return 130

    summaries = summarise_all(results, baseline)
    differences = pairwise_differences(results)
    source = args.proxy or "in-process proxy"
    print(f"ttc-proxy eval: {len(tasks)} tasks from {args.tasks} via {source}; max_tokens {settings.max_tokens}, "
          f"temperature {'default' if settings.temperature is None else settings.temperature}, "
          f"seed {'-' if settings.seed is None else f'{settings.seed}+i'}, concurrency {settings.concurrency}")
    print(render_table(summaries, baseline))
    if differences:
        print()
        print(render_matrix(differences))
    errors = render_errors(results)
    if errors:
        print(errors)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "tasks_file": str(args.tasks), "tasks": len(tasks), "models": models, "baseline": baseline,
        "proxy": source, "settings": asdict(settings), "pool": args.pool, "started_at": started_at.isoformat(),
        "duration_s": round(time.monotonic() - started, 3), "accuracy_method": ACCURACY_METHOD,
        "diff_method": DIFF_METHOD, "pairwise_method": PAIRWISE_METHOD,
    }
    write_json(out / "results.json", meta, summaries, baseline, results)
    written = [out / "results.json", *write_tables(out, meta, summaries, baseline, differences,
                                                   f"{Path(args.tasks).name}, {len(tasks)} tasks")]
    if out / "accuracy_vs_tokens.png" not in written:
        print("plot skipped: matplotlib is not installed (pip install 'ttc-proxy[plot]' or pip install matplotlib)")
    print("written: " + ", ".join(str(p) for p in written))
    if all(s.answered == 0 for s in summaries):
        print(f"ttc-proxy eval: every request failed; the most frequent error: "
              f"{errors.splitlines()[1].strip()}", file=sys.stderr)
        return 1
    return 0
