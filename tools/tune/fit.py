"""Fitting a cascade policy to per-task measurements, and judging it by k-fold cross-validation over tasks. Pure:
no I/O.

The input is one table per chain of stages (a fixed candidate is a chain of one): for each task and stage, whether
the stage's answer was right, the tokens spent up to and including the stage (a cascade that stops there spends
exactly that), and the signals the stage exposed. A cascade is a chain cut to its first `length` stages with a stop
rule (signal >= threshold, or never) on each stage but the last. At a budget, the fit picks the cascade with the
highest accuracy among those whose mean tokens per task stay within it (fewer tokens break ties).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MAX_THRESHOLDS = 12  # threshold candidates per signal and stage: quantiles of the training values
MIN_SIGNAL_SHARE = 0.9  # a signal is offered at a stage only when this share of training tasks has it


@dataclass(frozen=True)
class StageRecord:
    correct: bool
    tokens: float  # spent up to and including this stage
    signals: Mapping[str, float]


@dataclass(frozen=True)
class Chain:
    name: str
    stages: tuple[str, ...]
    rows: Sequence[Sequence[StageRecord]]  # rows[task][stage]


@dataclass(frozen=True)
class Rule:
    signal: str
    threshold: float


@dataclass(frozen=True)
class Cascade:
    chain: int  # index into the chains
    length: int  # stages run at most
    rules: tuple[Rule | None, ...]  # one per stage but the last; None: never stop there

    def describe(self, chains: Sequence[Chain]) -> str:
        names = chains[self.chain].stages
        parts = []
        for i in range(self.length):
            rule = self.rules[i] if i < self.length - 1 else None
            parts.append(names[i] + (f" [stop: {rule.signal} >= {rule.threshold:.4g}]" if rule else ""))
        return " → ".join(parts)


@dataclass(frozen=True)
class Outcome:
    correct: np.ndarray  # per task, bool
    tokens: np.ndarray  # per task
    stopped_at: np.ndarray  # per task, the stage index that answered

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else math.nan

    @property
    def mean_tokens(self) -> float:
        return float(self.tokens.mean()) if len(self.tokens) else math.nan


class ChainArrays:
    """A chain's table as arrays: correct[task, stage], tokens[task, stage], signals[name][task, stage] (nan where
    the stage did not expose it)."""

    def __init__(self, chain: Chain) -> None:
        stages = len(chain.stages)
        if any(len(row) != stages for row in chain.rows):
            raise ValueError(f"chain {chain.name!r}: every task needs one record per stage")
        self.correct = np.array([[r.correct for r in row] for row in chain.rows], dtype=bool).reshape(-1, stages)
        self.tokens = np.array([[r.tokens for r in row] for row in chain.rows], dtype=float).reshape(-1, stages)
        names = sorted({name for row in chain.rows for r in row for name in r.signals})
        self.signals = {name: np.array([[r.signals.get(name, np.nan) for r in row] for row in chain.rows],
                                       dtype=float).reshape(-1, stages) for name in names}


def evaluate(arrays: ChainArrays, cascade: Cascade, tasks: np.ndarray) -> Outcome:
    """What the cascade answers and spends on these tasks."""
    stop = np.full(len(tasks), cascade.length - 1)
    for stage in reversed(range(cascade.length - 1)):
        rule = cascade.rules[stage]
        if rule is None:
            continue
        values = arrays.signals[rule.signal][tasks, stage]
        stop = np.where(values >= rule.threshold, stage, stop)  # nan compares False: no signal, no stop
    rows = np.arange(len(tasks))
    return Outcome(arrays.correct[tasks][rows, stop], arrays.tokens[tasks][rows, stop], stop)


def stage_rules(arrays: ChainArrays, stage: int, tasks: np.ndarray) -> list[Rule | None]:
    """The stop rules worth trying at a stage: never, and each offered signal at quantiles of its training values
    (each threshold a value seen, so `>=` splits the tasks where they differ)."""
    rules: list[Rule | None] = [None]
    for name, values in arrays.signals.items():
        seen = values[tasks, stage]
        present = seen[~np.isnan(seen)]
        if len(present) == 0 or len(present) < MIN_SIGNAL_SHARE * len(tasks):
            continue
        distinct = np.unique(present)
        if len(distinct) > MAX_THRESHOLDS:
            distinct = np.unique(np.quantile(present, np.linspace(0, 1, MAX_THRESHOLDS), method="lower"))
        rules.extend(Rule(name, float(t)) for t in distinct)
    return rules


def cascades(chains: Sequence[ChainArrays], tasks: np.ndarray) -> list[Cascade]:
    """Every cascade the fit considers on these training tasks."""
    found: list[Cascade] = []
    for index, arrays in enumerate(chains):
        stages = arrays.correct.shape[1]
        options = [stage_rules(arrays, s, tasks) for s in range(stages - 1)]
        for length in range(1, stages + 1):
            for rules in itertools.product(*options[: length - 1]):
                found.append(Cascade(index, length, tuple(rules)))
    return found


@dataclass(frozen=True)
class Scored:
    cascade: Cascade
    accuracy: float
    mean_tokens: float


def score_all(chains: Sequence[ChainArrays], tasks: np.ndarray) -> list[Scored]:
    scored = []
    for cascade in cascades(chains, tasks):
        outcome = evaluate(chains[cascade.chain], cascade, tasks)
        scored.append(Scored(cascade, outcome.accuracy, outcome.mean_tokens))
    return scored


def best_within(scored: Sequence[Scored], budget: float) -> Scored | None:
    """The most accurate cascade whose mean tokens stay within the budget (fewer tokens, then fewer stages break
    ties); None when none does."""
    fitting = [s for s in scored if s.mean_tokens <= budget]
    if not fitting:
        return None
    return max(fitting, key=lambda s: (s.accuracy, -s.mean_tokens, -s.cascade.length))


def fit(chains: Sequence[Chain], budgets: Sequence[float], tasks: Sequence[int] | None = None) -> dict[float, Scored]:
    """The cascade fitted at each budget on these tasks (default: all); budgets no cascade fits are left out."""
    arrays = [ChainArrays(c) for c in chains]
    chosen = np.arange(arrays[0].correct.shape[0]) if tasks is None else np.asarray(tasks, dtype=int)
    scored = score_all(arrays, chosen)
    fitted = {b: best_within(scored, b) for b in budgets}
    return {b: s for b, s in fitted.items() if s is not None}


@dataclass(frozen=True)
class CrossValidated:
    """Held-out results at one budget: each task answered by the cascade fitted without its fold."""

    budget: float
    correct: np.ndarray
    tokens: np.ndarray
    chosen: tuple[str, ...]  # the cascade each fold chose, described

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_tokens(self) -> float:
        return float(self.tokens.mean())


def folds_of(n_tasks: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Tasks split into `folds` folds of near-equal size, shuffled with a fixed seed."""
    if folds < 2 or folds > n_tasks:
        raise ValueError(f"cross-validation needs 2 to {n_tasks} folds, got {folds}")
    order = np.random.default_rng(seed).permutation(n_tasks)
    return [np.sort(part) for part in np.array_split(order, folds)]


def cross_validate(chains: Sequence[Chain], budgets: Sequence[float], folds: int,
                   seed: int = 0) -> list[CrossValidated]:
    """k-fold cross-validation over tasks: at each budget, every fold's tasks are answered by the cascade fitted on
    the other folds (never the same tasks for choosing and for reporting). A fold whose training tasks fit no
    cascade within a budget uses the cheapest one."""
    arrays = [ChainArrays(c) for c in chains]
    n_tasks = arrays[0].correct.shape[0]
    parts = folds_of(n_tasks, folds, seed)
    results = {b: (np.zeros(n_tasks, dtype=bool), np.zeros(n_tasks), []) for b in budgets}
    for held_out in parts:
        training = np.setdiff1d(np.arange(n_tasks), held_out)
        scored = score_all(arrays, training)
        cheapest = min(scored, key=lambda s: s.mean_tokens)
        for budget in budgets:
            pick = best_within(scored, budget) or cheapest
            outcome = evaluate(arrays[pick.cascade.chain], pick.cascade, held_out)
            correct, tokens, chosen = results[budget]
            correct[held_out] = outcome.correct
            tokens[held_out] = outcome.tokens
            chosen.append(pick.cascade.describe(chains))
    return [CrossValidated(b, c, t, tuple(ch)) for b, (c, t, ch) in results.items()]


def budget_grid(low: float, high: float, points: int = 12) -> list[float]:
    """`points` budgets spaced geometrically from `low` to `high`, rounded to whole tokens."""
    if points < 2 or low <= 0 or high <= low:
        return [round(high)]
    ratio = (high / low) ** (1 / (points - 1))
    return sorted({round(low * ratio ** i) for i in range(points)})
