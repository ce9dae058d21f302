"""Statistics of an eval: accuracy with Wilson intervals, paired differences against a baseline and between every
pair of model strings, percentiles, and one summary row per model string."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .runner import Record

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
ACCURACY_METHOD = "accuracy = correct / tasks (a failed request counts as wrong), 95% Wilson score interval"
DIFF_METHOD = ("paired per-task difference d_i = correct(model) - correct(baseline) on the same tasks, "
               "mean ± 1.96·sd/√n (normal approximation)")
PAIRWISE_METHOD = ("row − column on the tasks both were asked (paired by task id; a failed request counts as "
                   "wrong), in percentage points, "
                   "with Newcombe's square-and-add 95% interval for paired proportions (Wilson score limits, "
                   "correlation corrected)")


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


def wilson_interval(successes: int, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval for a binomial proportion; (nan, nan, nan) when n is 0."""
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(model: Sequence[bool], baseline: Sequence[bool], z: float = Z95) -> Interval:
    """Mean of d_i = model_i - baseline_i with mean ± z·sd/√n (sd with n - 1); nan bounds when n < 2."""
    if len(model) != len(baseline):
        raise ValueError("paired samples must have the same length")
    n = len(model)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    diffs = [int(a) - int(b) for a, b in zip(model, baseline)]
    mean = sum(diffs) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = z * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half)


def newcombe_paired_interval(model: Sequence[bool], baseline: Sequence[bool], z: float = Z95) -> Interval:
    """p(model) - p(baseline) on paired outcomes with Newcombe's square-and-add interval (method 10, the
    correlation term corrected as in Fagerland, Lydersen & Laake's paired 2x2 chapter); nan when n is 0."""
    if len(model) != len(baseline):
        raise ValueError("paired samples must have the same length")
    n = len(model)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    both = sum(1 for a, b in zip(model, baseline) if a and b)
    only_model = sum(1 for a, b in zip(model, baseline) if a and not b)
    only_baseline = sum(1 for a, b in zip(model, baseline) if b and not a)
    neither = n - both - only_model - only_baseline
    model_right, baseline_right = both + only_model, both + only_baseline
    first, second = wilson_interval(model_right, n, z), wilson_interval(baseline_right, n, z)
    margins = model_right * (n - model_right) * baseline_right * (n - baseline_right)
    psi = 0.0
    if margins:
        cross = both * neither - only_model * only_baseline
        if cross > n / 2:
            psi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            psi = cross / math.sqrt(margins)
    p1, p2 = first.estimate, second.estimate
    estimate = p1 - p2
    below = (p1 - first.low) ** 2 + (second.high - p2) ** 2 - 2 * psi * (p1 - first.low) * (second.high - p2)
    above = (p2 - second.low) ** 2 + (first.high - p1) ** 2 - 2 * psi * (p2 - second.low) * (first.high - p1)
    return Interval(estimate, estimate - math.sqrt(max(below, 0.0)), estimate + math.sqrt(max(above, 0.0)))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _mean(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True)
class Summary:
    model: str
    tasks: int
    answered: int
    errors: int
    correct: int
    accuracy: Interval
    diff_vs_baseline: Interval | None  # None for the baseline itself
    mean_prompt_tokens: float | None  # per answered task
    mean_completion_tokens: float | None
    mean_total_tokens: float | None
    mean_cached_tokens: float | None  # of the prompt tokens, served from the engine's prefix cache
    mean_backend_calls: float | None
    latency_p50_ms: float | None  # over answered requests
    latency_p95_ms: float | None
    ttft_p50_ms: float | None = None  # streamed runs: time to the first content token


def summarise(model: str, records: Sequence[Record], baseline: Sequence[Record] | None) -> Summary:
    """One model string's row; `baseline` is the baseline's records (None when this is the baseline)."""
    answered = [r for r in records if r.answered]
    correct = sum(r.correct for r in records)
    diff = None
    if baseline is not None:
        base_by_id = {r.id: r.correct for r in baseline}
        pairs = [(r.correct, base_by_id[r.id]) for r in records if r.id in base_by_id]
        diff = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    latencies = [r.latency_ms for r in answered]
    return Summary(
        model=model,
        tasks=len(records),
        answered=len(answered),
        errors=len(records) - len(answered),
        correct=correct,
        accuracy=wilson_interval(correct, len(records)),
        diff_vs_baseline=diff,
        mean_prompt_tokens=_mean([r.tokens("prompt_tokens") for r in answered]),
        mean_completion_tokens=_mean([r.tokens("completion_tokens") for r in answered]),
        mean_total_tokens=_mean([r.tokens("total_tokens") for r in answered]),
        mean_cached_tokens=_mean([r.tokens("cached_tokens") for r in answered]),
        mean_backend_calls=_mean([r.backend_calls for r in answered]),
        ttft_p50_ms=percentile([r.ttft_ms for r in answered if r.ttft_ms is not None], 50),
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
    )


def summarise_all(results: Mapping[str, Sequence[Record]], baseline: str) -> list[Summary]:
    return [summarise(model, records, None if model == baseline else results[baseline])
            for model, records in results.items()]



@dataclass(frozen=True)
class PairwiseDifference:
    """Row model minus column model on the tasks both were asked."""

    row: str
    column: str
    pairs: int
    only_row: int  # tasks the row model got right and the column model wrong
    only_column: int
    difference: Interval


def pairwise_differences(results: Mapping[str, Sequence[Record]]) -> list[PairwiseDifference]:
    """Every ordered pair of distinct model strings, in the order of `results`, paired by task id."""
    correct = {model: {r.id: r.correct for r in records} for model, records in results.items()}
    differences = []
    for row, row_correct in correct.items():
        for column, column_correct in correct.items():
            if row == column:
                continue
            ids = [task for task in row_correct if task in column_correct]
            row_outcomes = [row_correct[task] for task in ids]
            column_outcomes = [column_correct[task] for task in ids]
            differences.append(PairwiseDifference(
                row=row, column=column, pairs=len(ids),
                only_row=sum(a and not b for a, b in zip(row_outcomes, column_outcomes)),
                only_column=sum(b and not a for a, b in zip(row_outcomes, column_outcomes)),
                difference=newcombe_paired_interval(row_outcomes, column_outcomes),
            ))
    return differences
