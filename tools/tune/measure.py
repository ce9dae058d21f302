"""Measuring candidates for `tune` on the eval's pooled sampling: every model string on one task shares that task's
pools, so each sample is drawn once (tools/eval/pooled.py).

A fixed candidate is scored as itself. A chain of stages is scored as `auto` with a policy that never stops, so
each stage's answer, signals and tokens so far are exactly what a cascade stopping there would have (the reuse of
earlier stages' runs included).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ttc_proxy.strategies.framework import Strategy, StrategySpec
from ttc_proxy.strategies.policy import CascadePolicy, OperatingPoint, SpecModel, Stage

from ..eval.runner import Progress, RunSettings
from ..eval.tasks import Task
from .fit import StageRecord


@dataclass(frozen=True)
class Candidate:
    """A chain of stages (a fixed candidate is a chain of one), each stage the strategy part of a model string."""

    name: str
    stages: tuple[str, ...]
    specs: tuple[StrategySpec, ...]

    def spec(self) -> StrategySpec:
        """What is scored: the strategy itself, or `auto` running the chain without ever stopping early."""
        if len(self.specs) == 1:
            return self.specs[0]
        return StrategySpec("auto", {"policy": never_stopping(self).model_dump()})


def never_stopping(candidate: Candidate) -> CascadePolicy:
    stages = [Stage(name=name, spec=SpecModel.of(spec)) for name, spec in zip(candidate.stages, candidate.specs)]
    return CascadePolicy(model="tune", points=[OperatingPoint(budget=1e12, stages=stages)])


@dataclass
class Measured:
    """Per candidate, per task: its stage records, or the error that kept it from an answer."""

    rows: dict[str, list[list[StageRecord] | None]] = field(default_factory=dict)
    errors: dict[str, list[str | None]] = field(default_factory=dict)
    tasks_done: list[bool] = field(default_factory=list)
    tokens_accounted: float = 0.0
    stopped_early: bool = False


def _total(usage: Mapping[str, Any] | None) -> float:
    return float((usage or {}).get("total_tokens") or 0)


def stage_records(candidate: Candidate, task: Task, reply: str | None, usage: Mapping[str, Any] | None,
                  details: Mapping[str, Any] | None) -> list[StageRecord]:
    """A scored outcome as one record per stage (graded against the task's answer)."""
    if len(candidate.specs) == 1:
        return [StageRecord(reply is not None and task.grade(reply).correct, _total(usage), {})]
    stages = (details or {}).get("stages") or []
    ran = [s for s in stages if "answer" in s]
    if len(ran) != len(candidate.stages):
        skipped = "; ".join(f"{s.get('stage')}: {s.get('skipped') or s.get('stopped')}" for s in stages
                            if "answer" not in s)
        raise ValueError(f"only {len(ran)} of {len(candidate.stages)} stages answered ({skipped})")
    records, spent = [], 0.0
    for stage in ran:
        spent += float(stage.get("tokens") or 0)
        records.append(StageRecord(task.grade(stage["answer"]).correct, spent, dict(stage.get("signals") or {})))
    return records


async def measure(base_url: str, api_key: str, model: str, candidates: Sequence[Candidate], tasks: Sequence[Task],
                  settings: RunSettings, pool_size: int, registry: Mapping[str, type[Strategy]],
                  progress: Progress, max_tokens_total: float | None = None) -> Measured:
    """Every candidate on every task, tasks `settings.concurrency` at a time; with `max_tokens_total`, no task
    starts once the scored runs have accounted that many tokens (the tasks begun are finished)."""
    import aiohttp

    from ttc_proxy.proxy.backends import new_client_session
    from ttc_proxy.proxy.config import StrategySettings
    from ttc_proxy.strategies.framework import Sampling

    from ..eval.pooled import PooledScorer, TaskPools

    measured = Measured({c.name: [None] * len(tasks) for c in candidates},
                        {c.name: [None] * len(tasks) for c in candidates}, [False] * len(tasks))
    strategy_settings = StrategySettings(default_max_tokens=settings.max_tokens, max_samples=max(64, pool_size))
    sampling = Sampling(settings.temperature, None, settings.max_tokens, None, None, dict(settings.extra_body))

    async def one_task(index: int, task: Task, scorer: PooledScorer) -> None:
        pools = TaskPools((settings.seed or 0) + task.index, pool_size, task.messages)
        for candidate in candidates:
            try:
                outcome = await scorer.score(candidate.spec(), model, pools)
                if outcome.error is not None:
                    raise ValueError(outcome.error)
                measured.rows[candidate.name][index] = stage_records(candidate, task, outcome.reply, outcome.usage,
                                                                     outcome.details)
                measured.tokens_accounted += _total(outcome.usage)
                ok = True
            except Exception as exc:  # noqa: BLE001 - one failed candidate is that task's gap, not the run's
                measured.errors[candidate.name][index] = f"{type(exc).__name__}: {exc}"
                ok = False
            progress.advance(ok)
        measured.tasks_done[index] = True

    async with new_client_session(timeout=aiohttp.ClientTimeout(total=settings.timeout)) as client:
        scorer = PooledScorer(base_url, api_key, client, strategy_settings, sampling, registry)
        gate = asyncio.Semaphore(settings.concurrency)

        async def bounded(index: int, task: Task) -> None:
            async with gate:
                if max_tokens_total is not None and measured.tokens_accounted >= max_tokens_total:
                    measured.stopped_early = True
                    return
                await one_task(index, task, scorer)

        progress.start(f"{len(candidates)} candidates, pool of {pool_size}")
        await asyncio.gather(*(bounded(i, t) for i, t in enumerate(tasks)))
    return measured
