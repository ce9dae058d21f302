"""`ttc-proxy pts`: the command line, and one task's search through the proxy (search.py holds the algorithm).

Per task: render and tokenize the chat (POST /v1/tokenize), sample `rollouts` replies from the prompt's ids
(p(success) of the question), and if min_p <= p <= max_p search up to `answers_per_task` of those replies (right
and wrong alternately) for pivotal tokens. p(success | prefix) is the share of `rollouts` continuations of the
exact ids prompt + prefix (max_tokens minus the prefix's length, so every reply has the same length limit) whose
text, prefix included, the task's check accepts; a whole sampled reply is terminal, its p its own grade. Each
pivot's DPO counterpart is looked for among the engine's top `dpo_candidates` next tokens at the pivot, by
measuring their p with the same cached estimator.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..argtypes import json_object, positive_float, positive_int
from ..eval.runner import Progress, add_engine_arguments, proxy_endpoint
from ..eval.tasks import EvalError, Task, add_subset_arguments, load_tasks
from .engine import BudgetSpent, EngineError, ProxyEngine
from .records import (
    DPO_FILE,
    PIVOTS_FILE,
    PROGRESS_FILE,
    SUMMARY_FILE,
    OutputDir,
    OutputError,
    PivotalTokenRecord,
    Spend,
    TaskDone,
    dpo_pair,
    summarise,
)
from .search import Estimate, Ids, SuccessCache, find_counterpart, find_pivots, select_answers


class PtsError(Exception):
    """The search cannot run: bad options or task file."""


@dataclass(frozen=True)
class PtsSettings:
    model: str
    tasks_file: str
    rollouts: int = 16
    threshold: float = 0.2
    min_p: float = 0.2
    max_p: float = 0.8
    answers_per_task: int = 4
    temperature: float = 0.8
    max_tokens: int = 48
    dpo_candidates: int = 5
    seed: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    task_type: str | None = None  # None: "math" for number/boxed checks, else "generic"
    dataset_id: str | None = None  # None: the task file's name without its extension
    concurrency: int = 2
    max_tokens_total: int | None = None

    def task_type_of(self, task: Task) -> str:
        return self.task_type or ("math" if task.check in ("number", "boxed") else "generic")


def query_of(task: Task) -> str:
    """The question as codelion/pts's `query`: the last user message's text."""
    for message in reversed(task.messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


def rollout_seed(seed: int, task: Task, prefix: Ids) -> int:
    """A seed per (run seed, task, prefix): reruns draw the same rollouts, different prefixes different ones."""
    return seed + zlib.crc32(f"{task.index}:{','.join(map(str, prefix))}".encode()) % (1 << 30)


@dataclass
class Live:
    """What the progress line shows while tasks run."""

    pivots: int = 0
    positive: int = 0

    def label(self, engine: ProxyEngine) -> str:
        return (f"pivots {self.pivots} (+{self.positive}/-{self.pivots - self.positive})  "
                f"tokens {engine.spent.total_tokens}")


async def search_task(task: Task, engine: ProxyEngine, settings: PtsSettings, out: OutputDir, live: Live,
                      progress: Progress) -> TaskDone:
    """One task: its p, and if in range, its pivotal tokens (appended to DIR as found) and their DPO pairs."""
    started = time.monotonic()
    spend = Spend()
    prompt = await engine.tokenize_chat(task.messages, spend)
    texts: dict[Ids, str] = {}

    async def text_of(prefix: Ids) -> str:
        if prefix not in texts:
            texts[prefix] = await engine.detokenize(prefix, spend)
        return texts[prefix]

    async def estimate(prefix: Ids) -> Estimate:
        head = await text_of(prefix)
        seed = None if settings.seed is None else rollout_seed(settings.seed, task, prefix)
        replies = await engine.sample(prompt + prefix, settings.rollouts, max(1, settings.max_tokens - len(prefix)),
                                      spend, seed)
        graded = tuple((head + r.text, task.grade(head + r.text).correct) for r in replies)
        return Estimate(sum(ok for _, ok in graded), len(graded), graded)

    cache = SuccessCache(estimate)
    root = await cache.get(())
    done = TaskDone(task.id, task.index, "skipped", root.p, root.samples)
    if settings.min_p <= root.p <= settings.max_p:
        done.status = "searched"
        found: set[tuple[Ids, int]] = set()
        for text, correct in select_answers(root.replies, settings.answers_per_task):
            answer = await engine.tokenize(text, spend)
            if not answer:
                continue
            done.answers += 1
            cache.know(answer, Estimate.known(correct))
            for pivot in await find_pivots(cache.p, answer, settings.threshold):
                if (pivot.prefix, pivot.token_id) in found:  # another reply with the same prefix found it too
                    continue
                found.add((pivot.prefix, pivot.token_id))
                record = PivotalTokenRecord.make(
                    model_id=settings.model, query=query_of(task),
                    pivot_context=await engine.detokenize(prompt + pivot.prefix, spend),
                    pivot_token=await engine.detokenize((pivot.token_id,), spend), pivot_token_id=pivot.token_id,
                    prob_before=pivot.prob_before, prob_after=pivot.prob_after,
                    task_type=settings.task_type_of(task),
                    dataset_id=settings.dataset_id or Path(settings.tasks_file).stem, dataset_item_id=task.id)
                out.add_pivot(record)
                done.pivots += 1
                done.positive += int(record.is_positive)
                live.pivots += 1
                live.positive += int(record.is_positive)
                progress.label = live.label(engine)
                progress.draw()
                if settings.dpo_candidates:
                    alternatives = await engine.alternatives(prompt + pivot.prefix, settings.dpo_candidates, spend)
                    other = await find_counterpart(cache.p, pivot, [a.token_id for a in alternatives],
                                                   settings.threshold)
                    if other is not None:
                        other_text = await engine.detokenize((other.token_id,), spend)
                        out.add_pair(dpo_pair(record, other_text, other.token_id, other.prob))
                        done.dpo_pairs += 1
    done.estimates = cache.estimated
    done.spend = spend
    done.seconds = round(time.monotonic() - started, 2)
    return done


@dataclass
class RunOutcome:
    stopped: str | None = None  # "budget" | "interrupted" | None (every task attempted)
    errors: dict[str, str] = field(default_factory=dict)


async def run_search(base_url: str, api_key: str, tasks: list[Task], settings: PtsSettings, out: OutputDir,
                     progress: Progress, outcome: RunOutcome, timeout: float = 300.0) -> Spend:
    """Every task not yet done, `concurrency` at a time; stops starting tasks once the budget is spent. Returns
    this run's spend."""
    engine = ProxyEngine(base_url, api_key, settings.model, temperature=settings.temperature, timeout=timeout,
                         max_total_tokens=settings.max_tokens_total, extra_body=settings.extra_body)
    gate = asyncio.Semaphore(settings.concurrency)
    live = Live()

    async def one(task: Task) -> None:
        async with gate:
            if outcome.stopped is not None:
                return
            progress.label = f"{live.label(engine)}  task {task.id}"
            try:
                done = await search_task(task, engine, settings, out, live, progress)
            except BudgetSpent:
                outcome.stopped = "budget"
                return
            except EngineError as exc:
                outcome.errors[task.id] = str(exc)
                progress.advance(False)
                return
            out.finish(done)
            progress.label = live.label(engine)
            progress.advance(True)

    try:
        await asyncio.gather(*(one(task) for task in tasks))
    finally:
        await engine.close()
    return engine.spent


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "pts", help="offline pivotal-token search on a task file (codelion/pts records, DPO pairs)",
        description="For each task, estimates p(success) from sampled replies; where min-p <= p <= max-p, finds "
                    "the pivotal tokens of some replies by recursive subdivision (Phi-4 report), each p(success | "
                    "prefix) measured by sampling continuations of the exact token-id prefix through the proxy's "
                    "/v1/completions, cached by prefix. Writes pivotal_tokens.jsonl (codelion/pts fields), "
                    "dpo_pairs.jsonl, progress.jsonl (a rerun with the same --out skips finished tasks) and "
                    "summary.json to --out.")
    parser.add_argument("tasks", help="JSONL task file (the eval's format: id, question or messages, answer, check)")
    parser.add_argument("--model", required=True, help="a plain model name the proxy serves, e.g. smollm2")
    parser.add_argument("--out", help="output directory (default: pivots/MODEL)")
    add_engine_arguments(parser)
    parser.add_argument("--rollouts", type=positive_int, default=16,
                        help="continuations per p(success) estimate, the question's included (default 16)")
    parser.add_argument("--threshold", type=float, default=0.2,
                        help="|change in p| that makes a token pivotal (default 0.2, the Phi-4 report's)")
    parser.add_argument("--min-p", type=float, default=0.2, help="search tasks with p >= this (default 0.2)")
    parser.add_argument("--max-p", type=float, default=0.8, help="search tasks with p <= this (default 0.8)")
    parser.add_argument("--answers-per-task", type=positive_int, default=4,
                        help="sampled replies searched per task, right and wrong alternately (default 4)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature of every rollout (default 0.8, the proxy's sampling default)")
    parser.add_argument("--max-tokens", type=positive_int, default=48,
                        help="the length limit of a reply, prefix included (default 48, as the eval)")
    parser.add_argument("--dpo-candidates", type=int, default=5, metavar="K",
                        help="top-K next tokens tried as a pivot's DPO counterpart (default 5; 0: no DPO pairs)")
    parser.add_argument("--max-tokens-total", type=positive_int, metavar="N",
                        help="token budget of this run (prompt + completion); stops cleanly when spent")
    add_subset_arguments(parser)
    parser.add_argument("--seed", type=int, help="seed the rollouts (derived per task and prefix; default: none)")
    parser.add_argument("--concurrency", type=positive_int, default=2, help="tasks searched at once (default 2)")
    parser.add_argument("--timeout", type=positive_float, default=300.0, help="seconds per request (default 300)")
    parser.add_argument("--extra-body", type=json_object, default={}, metavar="JSON",
                        help="merged into every completions request, e.g. '{\"top_k\": 20}'")
    parser.add_argument("--task-type", help="records' task_type (default: math for number/boxed checks, else "
                                            "generic)")
    parser.add_argument("--dataset-id", help="records' dataset_id (default: the task file's name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=pts_command)
    return parser


def settings_from(args: argparse.Namespace) -> PtsSettings:
    if not 0 < args.threshold <= 1:
        raise PtsError("--threshold must be in (0, 1]")
    if not 0 <= args.min_p <= args.max_p <= 1:
        raise PtsError("need 0 <= --min-p <= --max-p <= 1")
    if args.dpo_candidates < 0:
        raise PtsError("--dpo-candidates must be >= 0")
    if args.temperature < 0:
        raise PtsError("--temperature must be >= 0")
    return PtsSettings(
        model=args.model, tasks_file=str(Path(args.tasks).resolve()), rollouts=args.rollouts,
        threshold=args.threshold, min_p=args.min_p, max_p=args.max_p, answers_per_task=args.answers_per_task,
        temperature=args.temperature, max_tokens=args.max_tokens, dpo_candidates=args.dpo_candidates,
        seed=args.seed, extra_body=dict(args.extra_body), task_type=args.task_type, dataset_id=args.dataset_id,
        concurrency=args.concurrency, max_tokens_total=args.max_tokens_total)


def pts_command(args: argparse.Namespace) -> int:
    """Exit status: 0 done (or stopped by the budget), 1 every attempted task failed, 2 bad input or no proxy,
    130 interrupted."""
    try:
        settings = settings_from(args)
        tasks = load_tasks(args.tasks, args.limit, args.every, args.start)
    except (PtsError, EvalError) as exc:
        print(f"ttc-proxy pts: {exc}", file=sys.stderr)
        return 2
    out = OutputDir(args.out or Path("pivots") / args.model.replace("/", "_"))
    try:
        out.open(asdict(settings))
    except OutputError as exc:
        print(f"ttc-proxy pts: {exc}", file=sys.stderr)
        return 2
    todo = [t for t in tasks if t.id not in out.done]
    if len(todo) < len(tasks):
        print(f"pts: {len(tasks) - len(todo)} of {len(tasks)} tasks already done in {out.path}", file=sys.stderr)
    progress = Progress(len(todo), enabled=not args.no_progress, name="pts")
    outcome = RunOutcome()
    spent = Spend()
    started = time.monotonic()
    status = 0
    try:
        if todo:
            with proxy_endpoint(args) as (base_url, api_key):
                progress.started = time.monotonic()
                progress.start("")
                spent = asyncio.run(run_search(base_url, api_key, todo, settings, out, progress, outcome,
                                               args.timeout))
    except EvalError as exc:
        print(f"ttc-proxy pts: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        outcome.stopped = "interrupted"
        status = 130
    finally:
        progress.close()
        out.close()
    seconds = time.monotonic() - started
    summary = summarise(out.done.values(), out.pivots(), settings=asdict(settings), tasks_selected=len(tasks),
                        errors=outcome.errors, this_run=spent, seconds=seconds, stopped=outcome.stopped)
    out.write_summary(summary)
    if status:
        if status == 130:
            print("\nttc-proxy pts: interrupted; finished tasks are kept (rerun to continue)", file=sys.stderr)
        return status
    print(f"ttc-proxy pts: {summary['tasks_done']} of {len(tasks)} tasks done ({summary['tasks_searched']} "
          f"searched with {settings.min_p} <= p <= {settings.max_p}, {summary['tasks_skipped']} skipped, "
          f"{len(outcome.errors)} failed); {summary['pivots']} pivotal tokens (+{summary['positive']}/"
          f"-{summary['negative']}), {summary['dpo_pairs']} DPO pairs; this run: {spent.calls} calls, "
          f"{spent.prompt_tokens} prompt + {spent.completion_tokens} completion tokens"
          f"{'' if spent.cached_prompt_tokens is None else f' ({spent.cached_prompt_tokens} prompt tokens cached)'}"
          f", {seconds:.1f} s" + (f"; stopped: {outcome.stopped}" if outcome.stopped else ""))
    print("written: " + ", ".join(str(out.path / name) for name in (PIVOTS_FILE, DPO_FILE, PROGRESS_FILE,
                                                                     SUMMARY_FILE)))
    for task_id, error in list(outcome.errors.items())[:3]:
        print(f"ttc-proxy pts: task {task_id} failed: {error}", file=sys.stderr)
    if outcome.errors and len(outcome.errors) == len(todo):
        return 1
    return 0
