"""`ttc-proxy tune TASKS --model M`: measure candidate strategies and chains of them on tasks, fit an `auto`
policy (tools/tune/fit.py) with k-fold cross-validation over tasks, and write the policy file, the frontier table,
a per-task table and a plot of accuracy against tokens per task."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ttc_proxy.proxy.errors import ProxyError
from ttc_proxy.proxy.registry import load_registry
from ttc_proxy.strategies.framework import Strategy
from ttc_proxy.strategies.policy import CascadePolicy, OperatingPoint, SpecModel, Stage, StopRule

from ..argtypes import positive_float, positive_int
from ..eval.pooled import parse_strategy_string
from ..eval.runner import Progress, RunSettings, add_engine_arguments, proxy_endpoint
from ..eval.stats import Interval, paired_difference, wilson_interval
from ..eval.tasks import EvalError, add_subset_arguments, load_tasks
from .fit import MARGINS, Chain, CrossValidated, Fitted, Scored, StageRecord, budget_grid, cross_validate, fit
from .measure import Candidate, Measured, measure

LOGPROB = "select=confidence,confidence=logprob"
DEFAULT_CANDIDATES = ("cot", f"bon:n=4,{LOGPROB}>cot", f"bon:n=8,{LOGPROB}>cot", f"bon:n=16,{LOGPROB}>cot")
DEFAULT_CHAINS = (f"cot|bon:n=4,{LOGPROB}>cot|bon:n=16,{LOGPROB}>cot",
                  f"cot|bon:n=8,{LOGPROB}>cot|bon:n=16,{LOGPROB}>cot")


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "tune", help="fit an auto policy: the most accuracy per token, from measurements on your tasks",
        description="Scores candidate strategies and chains of them on a task file (the eval's format and pooled "
                    "sampling: each sample drawn once), records per task correctness, tokens and each stage's "
                    "signals, and fits a cascade policy for `auto-MODEL`: stages with stop rules whose thresholds "
                    "maximise accuracy at each token budget, judged by k-fold cross-validation over tasks. Writes "
                    "the policy (--out), and frontier.csv, per_task.csv, tune.json and frontier.png (--results).")
    parser.add_argument("tasks", nargs="?", help="JSONL task file with checkable answers (the eval's format); "
                                                  "not needed with --refit")
    parser.add_argument("--model", required=True, help="the model to tune for (a plain model name)")
    parser.add_argument("--out", help="the policy file to write (default: policies/MODEL.json)")
    parser.add_argument("--results", help="folder for the frontier table, plot and per-task table "
                                          "(default: eval-results/tune-MODEL)")
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), metavar="STRATEGY",
                        help="fixed candidates: the strategy part of model strings, e.g. cot 'bon:n=8>cot' "
                             f"(default: {' '.join(DEFAULT_CANDIDATES)})")
    parser.add_argument("--chains", nargs="*", default=list(DEFAULT_CHAINS), metavar="S1|S2|...",
                        help="chains of stages a cascade may cut and stop early in, stages separated by '|' "
                             "(default: the two cot-first chains below)")
    add_engine_arguments(parser)
    add_subset_arguments(parser)
    parser.add_argument("--pool", type=positive_int, default=16, help="samples per task and prompt (default 16)")
    parser.add_argument("--seed", type=int, default=1, help="task i's pool uses seeds SEED+i+j (default 1)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="the requests' temperature (default 0: single calls greedy, samples at 0.8)")
    parser.add_argument("--max-tokens", type=positive_int, default=48, help="max_tokens per call (default 48)")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="tasks in flight (default 4)")
    parser.add_argument("--timeout", type=positive_float, default=300.0, help="seconds per call (default 300)")
    parser.add_argument("--folds", type=positive_int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--margin", type=float, nargs="+", default=list(MARGINS), metavar="Z",
                        help="the guard: a dearer cascade replaces a cheaper one only when its paired gain on the "
                             "training tasks exceeds Z standard errors; several values: cross-validation on the "
                             "training tasks chooses (nested inside the reported cross-validation) "
                             f"(default: {' '.join(f'{m:g}' for m in MARGINS)})")
    parser.add_argument("--refit", metavar="TUNE_JSON",
                        help="measure nothing: fit again on the per-task tables of an earlier run's tune.json (its "
                             "candidates, tasks and settings)")
    parser.add_argument("--budgets", type=positive_float, nargs="+",
                        help="token budgets per task for the frontier (default: 12 from the cheapest to the "
                             "dearest candidate)")
    parser.add_argument("--default-budget", type=positive_float,
                        help="the default operating point's budget (default: a third of the tokens of the most "
                             "accurate fixed candidate)")
    parser.add_argument("--max-tokens-total", type=positive_float,
                        help="start no task once the scored runs have accounted this many tokens; fit on those done")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=tune_command)
    return parser


def parse_candidates(strings: Sequence[str], chains: Sequence[str], model: str,
                     registry: Mapping[str, type[Strategy]]) -> list[Candidate]:
    """Fixed candidates and chains as Candidates; EvalError names what does not parse."""
    found: list[Candidate] = []
    for text in [*strings, *chains]:
        stages = tuple(s.strip() for s in text.split("|"))
        specs = []
        for stage in stages:
            try:
                parsed = parse_strategy_string(f"{stage}-{model}", registry)
            except ProxyError as exc:
                raise EvalError(f"{stage!r}: {exc.message}") from exc
            if parsed is None:
                raise EvalError(f"{stage!r} is not a strategy (give the strategy part of a model string)")
            if parsed[0].slug == "auto":
                raise EvalError(f"{stage!r}: auto cannot be a candidate")
            specs.append(parsed[0])
        name = " | ".join(stages)
        if name not in {c.name for c in found}:
            found.append(Candidate(name, stages, tuple(specs)))
    return found


def tables(candidates: Sequence[Candidate], measured: Measured) -> tuple[list[Chain], list[int]]:
    """The chains' tables over the tasks every candidate answered, and those tasks' positions."""
    usable = [i for i, done in enumerate(measured.tasks_done)
              if done and all(measured.rows[c.name][i] is not None for c in candidates)]
    chains = [Chain(c.name, c.stages, [measured.rows[c.name][i] for i in usable]) for c in candidates]  # type: ignore[misc]
    return chains, usable


def tune_command(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 no task measured, 2 bad input or no proxy, 130 interrupted."""
    model = args.model
    out = Path(args.out or f"policies/{model}.json")
    results_dir = Path(args.results or f"eval-results/tune-{model}")
    try:
        registry = load_registry()[0]
        if args.refit:
            candidates, chains, task_ids, meta, errors = load_measurements(args.refit, model, registry)
        else:
            measured_run = measure_candidates(args, model, registry)
            if isinstance(measured_run, int):
                return measured_run
            candidates, chains, task_ids, meta, errors = measured_run
    except EvalError as exc:
        print(f"ttc-proxy tune: {exc}", file=sys.stderr)
        return 2
    if len(task_ids) < max(2, args.folds):
        print(f"ttc-proxy tune: only {len(task_ids)} tasks were answered by every candidate; nothing to fit with "
              f"{args.folds} folds (first errors: {'; '.join(e for errs in errors.values() for e in errs)[:500] or 'none'})",
              file=sys.stderr)
        return 1

    fit_started = time.monotonic()
    fixed = [i for i, c in enumerate(candidates) if len(c.stages) == 1]
    fixed_summary = [_fixed_row(chains[i]) for i in fixed]
    costs = [row["mean_tokens"] for row in fixed_summary]
    budgets = sorted(set(args.budgets or budget_grid(min(costs), max(costs))))
    best_fixed = max(fixed_summary, key=lambda r: (r["accuracy"], -r["mean_tokens"]))
    default_budget = float(args.default_budget or round(best_fixed["mean_tokens"] / 3))
    budgets = sorted(set(budgets) | {default_budget})
    margins = sorted(set(args.margin))
    validated = cross_validate(chains, budgets, args.folds, seed=args.seed, margins=margins)
    fitted = fit(chains, budgets, margins=margins, folds=args.folds, seed=args.seed)
    frontier = [_frontier_row(cv, chains, fixed, fixed_summary, fitted.points.get(cv.budget)) for cv in validated]
    meta.update(folds=args.folds, margins_offered=margins, margin=fitted.margin,
                fold_margins=list(validated[0].margins) if validated else [], default_budget=default_budget,
                fit_seconds=round(time.monotonic() - fit_started, 1))

    policy = build_policy(model, candidates, chains, fitted, validated, default_budget, meta, frontier)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(policy.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    results_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(results_dir / "frontier.csv", frontier)
    _write_csv(results_dir / "fixed.csv", fixed_summary)
    _write_per_task(results_dir / "per_task.csv", chains, task_ids)
    (results_dir / "tune.json").write_text(json.dumps(
        {"meta": meta, "frontier": frontier, "fixed": fixed_summary, "errors": errors,
         "per_task": {c.name: [[asdict(r) for r in row] for row in c.rows] for c in chains},
         "task_ids": list(task_ids)}, indent=1) + "\n", encoding="utf-8")
    written = [out, results_dir / "frontier.csv", results_dir / "fixed.csv", results_dir / "per_task.csv",
               results_dir / "tune.json"]
    if write_plot(results_dir / "frontier.png", frontier, fixed_summary, default_budget,
                  f"{Path(meta['tasks_file']).name}, {len(task_ids)} tasks, {args.folds}-fold cross-validated"):
        written.append(results_dir / "frontier.png")
    else:
        print("plot skipped: matplotlib is not installed (pip install 'ttc-proxy[plot]')")
    source = f"refitted from {args.refit}" if args.refit else f"{meta['seconds']:.0f} s"
    print(f"ttc-proxy tune: {model} on {len(task_ids)} of {meta['tasks']} tasks from {meta['tasks_file']}, pool "
          f"{meta['pool']}, seed {meta['seed']}, temperature {meta['temperature']:g}, max_tokens {meta['max_tokens']}, "
          f"{args.folds} folds, margin {fitted.margin:g} (folds: {', '.join(f'{m:g}' for m in meta['fold_margins'])}); "
          f"{source}" + (" (stopped early: --max-tokens-total)" if meta.get("stopped_early") else ""))
    print(render_frontier(frontier, fixed_summary, default_budget))
    print("written: " + ", ".join(str(p) for p in written))
    return 0


Measurements = tuple[list[Candidate], list[Chain], list[str], dict[str, Any], dict[str, list[str]]]


def measure_candidates(args: argparse.Namespace, model: str,
                       registry: Mapping[str, type[Strategy]]) -> Measurements | int:
    """Every candidate measured on the tasks through the engine; an exit status when the run cannot finish."""
    if not args.tasks:
        raise EvalError("give a task file (or --refit an earlier run's tune.json)")
    candidates = parse_candidates(args.candidates, args.chains, model, registry)
    tasks = load_tasks(args.tasks, args.limit, args.every, args.start)
    if args.folds > len(tasks):
        raise EvalError(f"--folds {args.folds} needs at least as many tasks ({len(tasks)} given)")
    settings = RunSettings(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                           timeout=args.timeout, concurrency=args.concurrency)
    progress = Progress(len(tasks) * len(candidates), enabled=not args.no_progress, name="tune")
    started_at = datetime.now(timezone.utc)
    started = time.monotonic()
    try:
        with proxy_endpoint(args) as (base_url, api_key):
            progress.started = time.monotonic()
            try:
                measured = asyncio.run(measure(base_url, api_key, model, candidates, tasks, settings, args.pool,
                                               registry, progress, args.max_tokens_total))
            finally:
                progress.close()
    except KeyboardInterrupt:
        print("\nttc-proxy tune: interrupted", file=sys.stderr)
        return 130
    seconds = time.monotonic() - started
    chains, usable = tables(candidates, measured)
    meta: dict[str, Any] = {
        "model": model, "tasks_file": str(args.tasks), "tasks": len(tasks), "tasks_used": len(usable),
        "every": args.every, "start": args.start, "limit": args.limit, "pool": args.pool, "seed": args.seed,
        "temperature": args.temperature, "max_tokens": args.max_tokens,
        "candidates": [c.name for c in candidates], "started_at": started_at.isoformat(),
        "seconds": round(seconds, 1), "stopped_early": measured.stopped_early,
        "proxy": args.proxy or "in-process proxy",
    }
    errors = {name: [e for e in errs if e] for name, errs in measured.errors.items()}
    return candidates, chains, [tasks[i].id for i in usable], meta, errors


def load_measurements(path: str, model: str, registry: Mapping[str, type[Strategy]]) -> Measurements:
    """An earlier run's candidates, per-task tables and settings, from its tune.json."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        meta = dict(saved["meta"])
        candidates = parse_candidates([], meta["candidates"], model, registry)
        chains = [Chain(c.name, c.stages, [[StageRecord(**record) for record in row]
                                           for row in saved["per_task"][c.name]]) for c in candidates]
        task_ids = list(saved["task_ids"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"--refit {path}: not a tune.json ({type(exc).__name__}: {exc})") from exc
    if meta.get("model") != model:
        raise EvalError(f"--refit {path} was measured for {meta.get('model')!r}, not {model!r}")
    meta["refit_of"] = str(path)
    return candidates, chains, task_ids, meta, saved.get("errors") or {}


def _interval(interval: Interval) -> dict[str, float]:
    return {"estimate": round(interval.estimate, 4), "low": round(interval.low, 4), "high": round(interval.high, 4)}


def _fixed_row(chain: Chain) -> dict[str, Any]:
    correct = [row[0].correct for row in chain.rows]
    accuracy = wilson_interval(sum(correct), len(correct))
    return {"candidate": chain.name, "accuracy": round(accuracy.estimate, 4), "accuracy_low": round(accuracy.low, 4),
            "accuracy_high": round(accuracy.high, 4),
            "mean_tokens": round(float(np.mean([row[0].tokens for row in chain.rows])), 1)}


def _frontier_row(cv: CrossValidated, chains: Sequence[Chain], fixed: Sequence[int],
                  fixed_summary: Sequence[Mapping[str, Any]], fitted: Scored | None) -> dict[str, Any]:
    """One budget: auto's cross-validated accuracy and tokens, against the most accurate fixed candidate that
    spends no more than the budget (or than auto did, where auto spent more), paired on the same tasks."""
    accuracy = wilson_interval(int(cv.correct.sum()), len(cv.correct))
    limit = max(cv.budget, cv.mean_tokens)
    affordable = [(i, s) for i, s in zip(fixed, fixed_summary) if s["mean_tokens"] <= limit]
    row: dict[str, Any] = {
        "budget": cv.budget, "auto_accuracy": round(accuracy.estimate, 4), "auto_low": round(accuracy.low, 4),
        "auto_high": round(accuracy.high, 4), "auto_mean_tokens": round(cv.mean_tokens, 1),
        "best_fixed_within": None, "fixed_accuracy": None, "fixed_mean_tokens": None,
        "diff": None, "diff_low": None, "diff_high": None,
        "policy_fit_on_all": fitted.cascade.describe(chains) if fitted else None,
        "fold_choices": " || ".join(sorted(set(cv.chosen))),
    }
    if affordable:
        index, summary = max(affordable, key=lambda p: (p[1]["accuracy"], -p[1]["mean_tokens"]))
        diff = paired_difference(list(cv.correct), [r[0].correct for r in chains[index].rows])
        row.update(best_fixed_within=summary["candidate"], fixed_accuracy=summary["accuracy"],
                   fixed_mean_tokens=summary["mean_tokens"], diff=round(diff.estimate, 4),
                   diff_low=round(diff.low, 4), diff_high=round(diff.high, 4))
    return row


def build_policy(model: str, candidates: Sequence[Candidate], chains: Sequence[Chain], fitted: Fitted,
                 validated: Sequence[CrossValidated], default_budget: float, meta: Mapping[str, Any],
                 frontier: Sequence[Mapping[str, Any]]) -> CascadePolicy:
    """The policy file: one operating point per budget (the cascade fitted on every task), each with what
    cross-validation expects of it; the default is the point at the default budget."""
    points: list[OperatingPoint] = []
    by_budget = {cv.budget: cv for cv in validated}
    default = 0
    for budget in sorted(fitted.points):
        scored = fitted.points[budget]
        cascade = scored.cascade
        candidate = candidates[cascade.chain]
        stages = []
        for i in range(cascade.length):
            rule = cascade.rules[i] if i < cascade.length - 1 else None
            stages.append(Stage(name=candidate.stages[i], spec=SpecModel.of(candidate.specs[i]),
                                stop=StopRule(signal=rule.signal, threshold=rule.threshold) if rule else None))  # type: ignore[arg-type]
        cv = by_budget[budget]
        accuracy = wilson_interval(int(cv.correct.sum()), len(cv.correct))
        if budget == default_budget:
            default = len(points)
        points.append(OperatingPoint(budget=budget, stages=stages, expected={
            "cross_validated": {"accuracy": _interval(accuracy), "mean_tokens": round(cv.mean_tokens, 1)},
            "fit": {"accuracy": round(scored.accuracy, 4), "mean_tokens": round(scored.mean_tokens, 1)},
        }))
    return CascadePolicy(model=model, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         points=points, default=default, tuned_on=dict(meta), frontier=list(frontier))


def render_frontier(frontier: Sequence[Mapping[str, Any]], fixed: Sequence[Mapping[str, Any]],
                    default_budget: float) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.1f}"

    lines = ["fixed candidates:", f"  {'accuracy % [95% Wilson]':<26} {'tokens/task':>11}  candidate"]
    for row in sorted(fixed, key=lambda r: r["mean_tokens"]):
        lines.append(f"  {pct(row['accuracy']):>5} [{pct(row['accuracy_low'])}, {pct(row['accuracy_high'])}]"
                     f"{'':<11} {row['mean_tokens']:>11.0f}  {row['candidate']}")
    lines += ["auto, cross-validated frontier (vs the best fixed candidate within the budget, paired):",
              f"  {'budget':>7} {'auto % [95%]':<20} {'tokens':>7}  {'diff pts [95%]':<22} fixed (%, tokens)"]
    for row in frontier:
        mark = " *default" if row["budget"] == default_budget else ""
        diff = ("-" if row["diff"] is None else
                f"{row['diff'] * 100:+.1f} [{row['diff_low'] * 100:+.1f}, {row['diff_high'] * 100:+.1f}]")
        fixed_text = ("none spends so little" if row["best_fixed_within"] is None else
                      f"{row['best_fixed_within']} ({pct(row['fixed_accuracy'])}, {row['fixed_mean_tokens']:.0f})")
        lines.append(f"  {row['budget']:>7.0f} {pct(row['auto_accuracy']):>5} [{pct(row['auto_low'])}, "
                     f"{pct(row['auto_high'])}]{'':<4} {row['auto_mean_tokens']:>7.0f}  {diff:<22} {fixed_text}{mark}")
    return "\n".join(lines)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def _write_per_task(path: Path, chains: Sequence[Chain], task_ids: Sequence[str]) -> None:
    """One row per task: every candidate's stages' correctness, tokens so far and signals."""
    rows = []
    for t, task_id in enumerate(task_ids):
        row: dict[str, Any] = {"task": task_id}
        for chain in chains:
            for s, record in enumerate(chain.rows[t]):
                prefix = chain.name if len(chain.stages) == 1 else f"{chain.name} #{s + 1}"
                row[f"{prefix} correct"] = int(record.correct)
                row[f"{prefix} tokens"] = round(record.tokens, 1)
                for name, value in sorted(record.signals.items()):
                    row[f"{prefix} {name}"] = round(value, 4)
        rows.append(row)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: Path, frontier: Sequence[Mapping[str, Any]], fixed: Sequence[Mapping[str, Any]],
               default_budget: float, title: str) -> bool:
    """Accuracy against tokens per task: each fixed candidate (Wilson bars) and auto's cross-validated frontier;
    False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(11, 5.5))
    colours = plt.get_cmap("tab10").colors
    for number, row in enumerate(fixed, start=1):
        y = row["accuracy"] * 100
        axes.errorbar([row["mean_tokens"]], [y], yerr=[[y - row["accuracy_low"] * 100],
                                                       [row["accuracy_high"] * 100 - y]],
                      fmt="o", capsize=3, color=colours[number % len(colours)], label=f"{number}. {row['candidate']}")
        axes.annotate(str(number), (row["mean_tokens"], y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    points = sorted(frontier, key=lambda r: r["auto_mean_tokens"])
    xs = [r["auto_mean_tokens"] for r in points]
    ys = [r["auto_accuracy"] * 100 for r in points]
    axes.plot(xs, ys, "-s", color=colours[0], label="auto (cross-validated, one point per budget)")
    axes.fill_between(xs, [r["auto_low"] * 100 for r in points], [r["auto_high"] * 100 for r in points],
                      color=colours[0], alpha=0.12)
    for r in points:
        if r["budget"] == default_budget:
            axes.plot([r["auto_mean_tokens"]], [r["auto_accuracy"] * 100], "*", markersize=16, color=colours[0],
                      label=f"auto's default point (budget {default_budget:g})")
    axes.set_xscale("log")
    axes.set_xlabel("mean total tokens per task (prompt + completion)")
    axes.set_ylabel("accuracy % (95% Wilson interval)")
    axes.set_ylim(0, 100)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    axes.set_title(title, fontsize=10)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return True
