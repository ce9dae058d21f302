"""The policy fit (tools/tune/fit.py) on synthetic per-task tables whose optimum is known."""

from __future__ import annotations

import numpy as np
import pytest

from ttc_proxy.tools.tune.fit import (
    Chain,
    StageRecord,
    budget_grid,
    cross_validate,
    fit,
    folds_of,
)

UNGUARDED = (0.0,)  # the plain most-accurate-within-budget fit


def two_stage_chain(n: int = 40, wrong_every: int = 4) -> Chain:
    """Stage 1 costs 10 tokens and is wrong on every 4th task, where its logprob is 0.2 (0.9 elsewhere); stage 2
    costs 100 more and is always right."""
    rows = []
    for i in range(n):
        wrong = i % wrong_every == 0
        rows.append([StageRecord(not wrong, 10.0, {"logprob": 0.2 if wrong else 0.9}),
                     StageRecord(True, 110.0, {"logprob": 0.95})])
    return Chain("cheap|dear", ("cheap", "dear"), rows)


def fixed(name: str, correct: list[bool], tokens: float) -> Chain:
    return Chain(name, (name,), [[StageRecord(c, tokens, {})] for c in correct])


def test_the_fit_escalates_exactly_the_tasks_whose_signal_is_low() -> None:
    chain = two_stage_chain()
    # All right at 10 + 100/4 = 35 tokens per task: stop on logprob >= some threshold in (0.2, 0.9].
    (scored,) = fit([chain], [40.0]).points.values()
    assert scored.accuracy == 1.0
    assert scored.mean_tokens == pytest.approx(35.0)
    assert scored.cascade.length == 2
    rule = scored.cascade.rules[0]
    assert rule is not None and rule.signal == "logprob" and 0.2 < rule.threshold <= 0.9


def test_below_the_cascades_cost_the_fit_keeps_the_cheap_stage_alone() -> None:
    (scored,) = fit([two_stage_chain()], [20.0]).points.values()
    assert scored.cascade.length == 1
    assert scored.accuracy == pytest.approx(0.75)
    assert scored.mean_tokens == 10.0


def test_a_budget_nothing_fits_is_left_out() -> None:
    assert fit([two_stage_chain()], [5.0]).points == {}


def test_a_useless_signal_is_not_worth_its_tokens_and_a_better_fixed_candidate_wins() -> None:
    rng = np.random.default_rng(0)
    n = 60
    rows = []
    for i in range(n):
        right = bool(rng.random() < 0.5)
        rows.append([StageRecord(right, 10.0, {"logprob": float(rng.random())}),
                     StageRecord(bool(rng.random() < 0.6), 60.0, {})])
    noisy = Chain("a|b", ("a", "b"), rows)
    strong = fixed("strong", [i % 10 != 0 for i in range(n)], 30.0)  # 90 % at 30 tokens
    (scored,) = fit([noisy, strong], [40.0]).points.values()
    assert scored.cascade.chain == 1 and scored.accuracy == pytest.approx(0.9)


def test_ties_go_to_fewer_tokens() -> None:
    same = [True, False] * 10
    (scored,) = fit([fixed("dear", same, 50.0), fixed("cheap", same, 20.0)], [100.0]).points.values()
    assert scored.cascade.chain == 1


def test_the_fitted_accuracy_never_falls_as_the_budget_grows() -> None:
    chains = [two_stage_chain(), fixed("mid", [i % 3 != 0 for i in range(40)], 25.0)]
    budgets = budget_grid(10, 120, 10)
    fitted = fit(chains, budgets).points
    accuracies = [fitted[b].accuracy for b in sorted(fitted)]
    assert accuracies == sorted(accuracies)
    assert all(fitted[b].mean_tokens <= b for b in fitted)


def test_cross_validation_reports_each_task_from_a_fit_that_never_saw_it() -> None:
    # The signal separates right from wrong identically in every fold, so held-out results equal the optimum.
    (result,) = cross_validate([two_stage_chain()], [40.0], folds=4, seed=3)
    assert result.accuracy == 1.0
    assert result.mean_tokens == pytest.approx(35.0)
    assert len(result.chosen) == 4


def test_cross_validation_does_not_reward_thresholds_fitted_to_noise() -> None:
    # Stage 1's signal is pure noise; stage 2 is no better on average. Held out, the cascade cannot beat chance by
    # much, while the fit on all tasks (which picks thresholds on the same tasks) looks better than it is.
    rng = np.random.default_rng(1)
    rows = [[StageRecord(bool(rng.random() < 0.5), 10.0, {"logprob": float(rng.random())}),
             StageRecord(bool(rng.random() < 0.5), 20.0, {})] for _ in range(80)]
    chain = Chain("a|b", ("a", "b"), rows)
    (in_sample,) = fit([chain], [20.0], margins=UNGUARDED).points.values()
    (held_out,) = cross_validate([chain], [20.0], folds=5, margins=UNGUARDED)
    assert held_out.accuracy < in_sample.accuracy


def test_folds_partition_the_tasks() -> None:
    parts = folds_of(23, 5, seed=2)
    assert sorted(np.concatenate(parts).tolist()) == list(range(23))
    assert {len(p) for p in parts} <= {4, 5}
    with pytest.raises(ValueError):
        folds_of(3, 5)


def test_a_signal_most_tasks_lack_is_not_offered() -> None:
    rows = [[StageRecord(i % 2 == 0, 10.0, {"agreement": 0.9} if i == 0 else {}),
             StageRecord(True, 50.0, {})] for i in range(20)]
    fitted = fit([Chain("a|b", ("a", "b"), rows)], [1000.0])
    (scored,) = fitted.points.values()
    assert scored.cascade.length == 1 or scored.cascade.rules[0] is None


def escalation_that_does_not_pay(n: int, seed: int) -> list[Chain]:
    """A cheap stage right on 60 % of the tasks, and a dear stage right on 60 % of the cheap stage's right tasks and
    60 % of its wrong ones (as accurate, unrelated), the cheap stage's logprob a random order: escalating on any
    threshold trades tasks at random, so on these very tasks the optimum at every budget is the cheap stage alone,
    and any gain a fitted threshold finds is noise. The fixed candidates are the two stages alone."""
    rng = np.random.default_rng(seed)
    cheap = np.zeros(n, dtype=bool)
    cheap[: round(0.6 * n)] = True
    dear = np.zeros(n, dtype=bool)
    right, wrong = np.flatnonzero(cheap), np.flatnonzero(~cheap)
    dear[right[: round(0.6 * len(right))]] = True
    dear[wrong[: round(0.6 * len(wrong))]] = True
    order = rng.permutation(n)
    cheap, dear = cheap[order], dear[order]
    signal = rng.random(n)
    chain = Chain("cheap|dear", ("cheap", "dear"),
                  [[StageRecord(bool(c), 10.0, {"logprob": float(s)}), StageRecord(bool(d), 110.0, {})]
                   for c, d, s in zip(cheap, dear, signal)])
    return [chain, fixed("cheap", list(cheap), 10.0), fixed("dear", list(dear), 100.0)]


NOISE_BUDGETS = [10.0, 40.0, 80.0, 120.0]
DRAWS = range(20)


def test_the_guard_keeps_the_cheap_stage_where_escalating_does_not_pay() -> None:
    # Unguarded, thresholds fitted to the noise escalate in most draws; guarded, the fit on all 80 tasks keeps the
    # cheap stage alone at every budget in all but a few draws (the guard is a statistical rule, not a proof).
    unguarded_escalates = guarded_keeps = 0
    for seed in DRAWS:
        chains = escalation_that_does_not_pay(80, seed)
        unguarded = fit(chains, NOISE_BUDGETS, margins=UNGUARDED).points
        guarded = fit(chains, NOISE_BUDGETS, seed=seed).points
        unguarded_escalates += any(s.mean_tokens > 10.0 for s in unguarded.values())
        guarded_keeps += all(s.mean_tokens == 10.0 and s.accuracy == 0.6 for s in guarded.values())
    assert unguarded_escalates >= 18
    assert guarded_keeps >= 16


def test_held_out_the_guarded_fit_is_not_below_the_cheap_stage() -> None:
    # The bar: the cross-validated frontier at or above every fixed candidate that spends no more. Here the
    # cheap stage (60 %) is that candidate at every budget; unguarded, auto loses to it held out and spends more.
    guarded, unguarded, guarded_tokens, unguarded_tokens = [], [], [], []
    for seed in DRAWS:
        chains = escalation_that_does_not_pay(80, seed)
        for result in cross_validate(chains, NOISE_BUDGETS, folds=5, seed=seed):
            guarded.append(result.accuracy)
            guarded_tokens.append(result.mean_tokens)
        for result in cross_validate(chains, NOISE_BUDGETS, folds=5, seed=seed, margins=UNGUARDED):
            unguarded.append(result.accuracy)
            unguarded_tokens.append(result.mean_tokens)
    assert np.mean(guarded) >= 0.6 - 0.005
    assert np.mean(unguarded) < np.mean(guarded)
    assert np.mean(guarded_tokens) < 0.5 * np.mean(unguarded_tokens)


def test_the_guard_escalates_where_escalating_pays() -> None:
    # Stage 1 is wrong on a quarter of the tasks and says so in its logprob; stage 2 fixes them all: a gain of many
    # standard errors, so every margin offered escalates exactly those tasks, in the fit and held out.
    fitted = fit([two_stage_chain(80)], [40.0])
    (scored,) = fitted.points.values()
    assert scored.cascade.length == 2 and scored.accuracy == 1.0 and scored.mean_tokens == pytest.approx(35.0)
    (result,) = cross_validate([two_stage_chain(80)], [40.0], folds=5)
    assert result.accuracy == 1.0 and result.mean_tokens == pytest.approx(35.0)


def test_a_gain_within_the_margin_does_not_buy_a_dearer_cascade() -> None:
    # The dear candidate fixes 3 of 40 tasks and breaks 1: +5 points, about 1.4 standard errors of the paired gain.
    cheap = [i % 4 != 0 for i in range(40)]
    dear = list(cheap)
    for i in (0, 4, 8):
        dear[i] = True
    dear[1] = False
    chains = [fixed("cheap", cheap, 10.0), fixed("dear", dear, 50.0)]
    assert fit(chains, [60.0], margins=(1.0,)).points[60.0].cascade.chain == 1
    assert fit(chains, [60.0], margins=(2.0,)).points[60.0].cascade.chain == 0
