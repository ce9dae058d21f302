"""Fitting a cascade policy to per-task measurements, and judging it by k-fold cross-validation over tasks. Pure:
no I/O.

The input is one table per chain of stages (a fixed candidate is a chain of one): for each task and stage, whether
the stage's answer was right, the tokens spent up to and including the stage (a cascade that stops there spends
exactly that), and the signals the stage exposed. A cascade is a chain cut to its first `length` stages with a stop
rule (signal >= threshold, or never) on each stage but the last. At a budget, the fit walks up the cascades that
stay within it from the cheapest, and a dearer cascade replaces the one chosen so far only when its gain on the
training tasks exceeds a margin (in standard errors of the paired gain), the margin chosen by cross-validation: the
most accurate cascade within the budget wins only when its gain over the cheaper ones is more than noise.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

MAX_THRESHOLDS = 12  # threshold candidates per signal and stage: quantiles of the training values
MIN_SIGNAL_SHARE = 0.9  # a signal is offered at a stage only when this share of training tasks has it
# The guard's margins offered to cross-validation, in standard errors of a dearer cascade's paired gain over the
# cheaper one chosen so far: thresholds picked from many on few tasks find gains that are not there.
MARGINS = (0.0, 0.5, 1.0, 1.5, 2.0)


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
    correct: np.ndarray = field(compare=False, repr=False)  # per task scored on


def score_all(chains: Sequence[ChainArrays], tasks: np.ndarray) -> list[Scored]:
    scored = []
    for cascade in cascades(chains, tasks):
        outcome = evaluate(chains[cascade.chain], cascade, tasks)
        scored.append(Scored(cascade, outcome.accuracy, outcome.mean_tokens, outcome.correct))
    return scored


def beats(dearer: Scored, cheaper: Scored, margin: float) -> bool:
    """Whether the dearer cascade's gain over the cheaper one, paired per task, exceeds `margin` standard errors
    of that gain (margin 0: any gain)."""
    gain = dearer.correct.astype(float) - cheaper.correct.astype(float)
    mean = float(gain.mean())
    if mean <= 0:
        return False
    spread = float(gain.std(ddof=1)) / math.sqrt(len(gain)) if len(gain) > 1 else 0.0
    return mean > margin * spread


class Ranked:
    """The cascades scored on training tasks, cheapest first (the more accurate first among equally dear ones),
    and the guarded choice within any budget: walking up in cost, a dearer cascade replaces the one chosen so far
    only when it beats it by more than the margin (`beats`). Margin 0 is the plain most-accurate-within-budget."""

    def __init__(self, scored: Sequence[Scored]) -> None:
        self.scored = sorted(scored, key=lambda s: (s.mean_tokens, -s.accuracy, s.cascade.length))
        self.costs = [s.mean_tokens for s in self.scored]
        self.walks: dict[float, list[int]] = {}

    def walk(self, margin: float) -> list[int]:
        """walk[i]: the index chosen among the i+1 cheapest cascades."""
        if margin not in self.walks:
            chosen, steps = 0, []
            for i, candidate in enumerate(self.scored):
                current = self.scored[chosen]
                if candidate.accuracy > current.accuracy and beats(candidate, current, margin):
                    chosen = i
                steps.append(chosen)
            self.walks[margin] = steps
        return self.walks[margin]

    def within(self, budget: float, margin: float) -> Scored | None:
        """The guarded choice among the cascades whose mean tokens stay within the budget; None when none does."""
        affordable = bisect.bisect_right(self.costs, budget)
        return self.scored[self.walk(margin)[affordable - 1]] if affordable else None

    def cheapest(self) -> Scored:
        return self.scored[0]


def choose_margin(arrays: Sequence[ChainArrays], tasks: np.ndarray, budgets: Sequence[float],
                  margins: Sequence[float], folds: int, seed: int = 0) -> float:
    """The margin chosen by k-fold cross-validation on these tasks alone (inside an outer fold, this is nested
    cross-validation), with the one-standard-error rule: the largest margin whose held-out accuracy (per task, the
    share of budgets answered right) is within one standard error of the best margin's, paired per task. A cross-
    validation is itself noisy, and a smaller margin must beat a larger one by more than that noise."""
    if len(margins) == 1:
        return margins[0]
    if len(tasks) < 4:
        return max(margins)
    right = {m: np.zeros(len(tasks)) for m in margins}
    for held in folds_of(len(tasks), min(folds, len(tasks)), seed):
        training = np.delete(tasks, held)
        ranked = Ranked(score_all(arrays, training))
        for margin in margins:
            for budget in budgets:
                pick = ranked.within(budget, margin) or ranked.cheapest()
                right[margin][held] += evaluate(arrays[pick.cascade.chain], pick.cascade, tasks[held]).correct
    best = right[max(margins, key=lambda m: (right[m].mean(), m))]
    for margin in sorted(margins, reverse=True):
        loss = best - right[margin]
        if loss.mean() <= loss.std(ddof=1) / math.sqrt(len(loss)):
            return margin
    return max(margins)  # not reached: the best margin's own loss is 0


@dataclass(frozen=True)
class Fitted:
    margin: float  # the guard the fit used (chosen by cross-validation when several were offered)
    points: dict[float, Scored]  # per budget; budgets no cascade fits are left out


def fit(chains: Sequence[Chain], budgets: Sequence[float], tasks: Sequence[int] | None = None,
        margins: Sequence[float] = MARGINS, folds: int = 5, seed: int = 0) -> Fitted:
    """The guarded cascade at each budget, fitted on these tasks (default: all), its margin chosen from `margins`
    by cross-validation on the same tasks."""
    arrays = [ChainArrays(c) for c in chains]
    chosen = np.arange(arrays[0].correct.shape[0]) if tasks is None else np.asarray(tasks, dtype=int)
    margin = choose_margin(arrays, chosen, budgets, margins, folds, seed)
    ranked = Ranked(score_all(arrays, chosen))
    fitted = {b: ranked.within(b, margin) for b in budgets}
    return Fitted(margin, {b: s for b, s in fitted.items() if s is not None})


@dataclass(frozen=True)
class CrossValidated:
    """Held-out results at one budget: each task answered by the cascade fitted without its fold."""

    budget: float
    correct: np.ndarray
    tokens: np.ndarray
    chosen: tuple[str, ...]  # the cascade each fold chose, described
    margins: tuple[float, ...]  # the margin each fold's nested cross-validation chose

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())

    @property
    def mean_tokens(self) -> float:
        return float(self.tokens.mean())


def folds_of(n_tasks: int, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Tasks split into `folds` folds of near-equal size, shuffled with a fixed seed: positions 0..n_tasks-1."""
    if folds < 2 or folds > n_tasks:
        raise ValueError(f"cross-validation needs 2 to {n_tasks} folds, got {folds}")
    order = np.random.default_rng(seed).permutation(n_tasks)
    return [np.sort(part) for part in np.array_split(order, folds)]


def cross_validate(chains: Sequence[Chain], budgets: Sequence[float], folds: int, seed: int = 0,
                   margins: Sequence[float] = MARGINS) -> list[CrossValidated]:
    """k-fold cross-validation over tasks: at each budget, every fold's tasks are answered by the cascade fitted on
    the other folds (never the same tasks for choosing and for reporting), the guard's margin chosen by a
    cross-validation inside those other folds (nested). A fold whose training tasks fit no cascade within a budget
    uses the cheapest one."""
    arrays = [ChainArrays(c) for c in chains]
    n_tasks = arrays[0].correct.shape[0]
    results = {b: (np.zeros(n_tasks, dtype=bool), np.zeros(n_tasks), []) for b in budgets}
    fold_margins = []
    for held_out in folds_of(n_tasks, folds, seed):
        training = np.setdiff1d(np.arange(n_tasks), held_out)
        margin = choose_margin(arrays, training, budgets, margins, folds, seed)
        fold_margins.append(margin)
        ranked = Ranked(score_all(arrays, training))
        for budget in budgets:
            pick = ranked.within(budget, margin) or ranked.cheapest()
            outcome = evaluate(arrays[pick.cascade.chain], pick.cascade, held_out)
            correct, tokens, chosen = results[budget]
            correct[held_out] = outcome.correct
            tokens[held_out] = outcome.tokens
            chosen.append(pick.cascade.describe(chains))
    return [CrossValidated(b, c, t, tuple(ch), tuple(fold_margins)) for b, (c, t, ch) in results.items()]


def budget_grid(low: float, high: float, points: int = 12) -> list[float]:
    """`points` budgets spaced geometrically from `low` to `high`, rounded to whole tokens."""
    if points < 2 or low <= 0 or high <= low:
        return [round(high)]
    ratio = (high / low) ** (1 / (points - 1))
    return sorted({round(low * ratio ** i) for i in range(points)})
