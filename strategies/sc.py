"""Self-consistency: sample answers, extract each one's final answer, return a sample of the majority.

Adaptive mode samples in waves and stops as soon as the majority is settled, so easy questions cost few
samples. Two stopping rules: Adaptive-Consistency's Beta rule (is the leader the true majority?), and a
predictive rule (would drawing all n samples change the winner?).
"""

from __future__ import annotations

from math import comb
from typing import Literal

import numpy as np
from pydantic import Field

from .answers import Tally, candidate_answer, tally
from .framework import (
    DEFAULT_SAMPLING_TEMPERATURE,
    BudgetExceeded,
    Candidate,
    Strategy,
    StrategyContext,
    StrategyError,
    StrategyParams,
    StrategyResult,
    draw,
)
from .selection import Pool, select


class SelfConsistencyParams(StrategyParams):
    limits = {"n": "samples"}

    n: int = Field(default=8, ge=1, description="samples to draw (the most, when adaptive)")
    temperature: float | None = Field(
        default=None, gt=0, le=2, description="sampling temperature when the request has none above 0 (default 0.8)"
    )
    min_success: int = Field(default=1, ge=1, description="fail unless at least this many samples succeed")
    adaptive: bool = Field(default=False, description="sample in waves; stop once the majority is settled. "
                                                      "Default off: on the dev set the beta rule gave the same "
                                                      "answers at n=8 for barely fewer tokens, in waves (more wall "
                                                      "time), see docs/results/2026-12-07-arith-dev.md")
    first_wave: int = Field(default=4, ge=1, description="adaptive: samples in the first wave")
    wave: int = Field(default=2, ge=1, description="adaptive: samples in each later wave")
    stop_rule: Literal["beta", "predictive"] = Field(
        default="beta",
        description="adaptive: 'beta' stops when P(leader is the true majority) reaches stop_confidence; "
                    "'predictive' when P(all n samples would elect the same winner) does",
    )
    stop_confidence: float = Field(
        default=0.95, gt=0.5, lt=1, description="adaptive: stop when the stop rule's probability reaches this"
    )
    count_truncated: bool = Field(
        default=False, description="let replies cut off by max_tokens vote; by default they do only when no "
                                   "sample finished")
    new_answer_weight: float = Field(
        default=1.0, gt=0, le=100, description="predictive: weight of a not-yet-seen answer in the Pólya urn"
    )


def majority_settled_probability(votes: Tally) -> float:
    """P(the leading answer is the true majority) under Adaptive-Consistency's Beta rule.

    With v1 votes for the leader and v2 for the runner-up, p ~ Beta(v1 + 1, v2 + 1) and we want P(p > 1/2).
    For integer parameters the regularised incomplete beta is a binomial tail, so no special functions needed.
    """
    ranked = votes.ranked()
    v1 = int(ranked[0][1])
    v2 = int(ranked[1][1]) if len(ranked) > 1 else 0
    trials = v1 + v2 + 1
    below_half = sum(comb(trials, j) for j in range(v1 + 1, trials + 1)) / 2**trials
    return 1.0 - below_half


PREDICTIVE_SIMULATIONS = 2000


def leader_keeps_probability(votes: Tally, total: int, new_answer_weight: float,
                             simulations: int = PREDICTIVE_SIMULATIONS) -> float:
    """P(the current leader still wins once `total` samples are in), by simulating the missing samples.

    The missing samples come from a Pólya urn (a Chinese restaurant process): the next sample repeats an answer
    with probability proportional to its votes, or is a new answer with weight `new_answer_weight`. Ties go to
    the answer seen first, as in the final vote. The simulation uses a fixed seed, so a run is reproducible.
    """
    counts = [int(v) for v in votes.counts.values()]  # in first-seen order
    missing = total - sum(counts)
    if missing <= 0:
        return 1.0
    leader = list(votes.counts).index(votes.leader)
    rng = np.random.default_rng(0)
    table = np.zeros((simulations, len(counts) + missing))
    table[:, :len(counts)] = counts
    opened = np.full(simulations, len(counts))
    rows = np.arange(simulations)
    for drawn in range(missing):
        point = rng.random(simulations) * (sum(counts) + drawn + new_answer_weight)
        column = (np.cumsum(table, axis=1) <= point[:, None]).sum(axis=1)
        is_new = column >= opened  # the point fell in the new-answer weight
        table[rows, np.where(is_new, opened, column)] += 1
        opened += is_new
    leader_votes = table[:, leader]
    seen_before = table[:, :leader].max(axis=1, initial=0)  # these win a tie against the leader
    seen_after = table[:, leader + 1:].max(axis=1, initial=0)  # these lose it
    return float(np.mean((leader_votes > seen_before) & (leader_votes >= seen_after)))


def leader_is_decided(votes: Tally, remaining: int) -> bool:
    """No outcome of the remaining samples can change the winner: stopping then saves tokens at no cost."""
    ranked = votes.ranked()
    runner_up = ranked[1][1] if len(ranked) > 1 else 0
    return ranked[0][1] > runner_up + remaining


class SelfConsistency(Strategy[SelfConsistencyParams]):
    slug = "sc"
    description = "self-consistency: samples, majority vote over extracted answers (adaptive: stop when settled)"
    composable = True
    tool_calls = True

    @classmethod
    def fan_out(cls, params: SelfConsistencyParams) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: SelfConsistencyParams) -> StrategyResult:
        # The request's temperature when above 0; else the `temperature` param; else 0.8 (as the param says).
        temperature = ctx.sampling.sampling_temperature(params.temperature or DEFAULT_SAMPLING_TEMPERATURE)
        mode = "adaptive, at most" if params.adaptive else "drawing"
        source = f"runs of {ctx.over.describe()}" if ctx.over else f"samples at temperature {temperature:g}"
        await ctx.progress(f"{mode} {params.n} {source}")
        candidates: list[Candidate] = []
        answers: list[str] = []
        voting: list[bool] = []  # False: cut off by max_tokens, so its "answer" is unfinished
        settled = 0.0
        budget_exhausted = False
        asked = 0  # samples asked for so far: the next wave's first sample index (a failed sample keeps its seed)
        wave = params.n if not params.adaptive else min(params.first_wave, params.n)
        while asked < params.n:
            try:
                first, asked = asked, asked + wave
                drawn = await draw(ctx, wave, temperature=temperature, index=first,
                                   min_success=min(params.min_success, wave) if not candidates else 1)
            except BudgetExceeded:
                if not candidates:
                    raise
                budget_exhausted = True
                await ctx.progress(f"the budget ran out after {len(candidates)} samples; voting over those")
                break
            for candidate in drawn:
                candidates.append(candidate)
                answers.append(candidate_answer(candidate))
                voting.append(params.count_truncated or not candidate.truncated)
                cut_off = "" if voting[-1] else " (cut off by max_tokens: no vote)"
                await ctx.progress(f"sample {len(candidates)}/{params.n} → {answers[-1]}{cut_off}")
            if not params.adaptive or asked >= params.n:
                break
            votes = tally(a for a, v in zip(answers, voting) if v)
            if not votes.counts or votes.ranked()[0][1] < 2:
                # One vote agrees with nothing: keep drawing (no rule may stop on it).
                wave = min(params.wave, params.n - asked)
                continue
            if params.stop_rule == "beta":
                settled = majority_settled_probability(votes)
            else:
                # The samples still to come vote unless cut off; assume they all vote (the cautious case).
                voters = params.n - voting.count(False)
                settled = leader_keeps_probability(votes, voters, params.new_answer_weight)
            if settled >= params.stop_confidence:
                await ctx.progress(f"majority settled after {len(candidates)} samples (P={settled:.3f})")
                break
            if leader_is_decided(votes, params.n - asked):
                await ctx.progress(f"the leader cannot be overtaken in the {params.n - asked} samples left")
                break
            wave = min(params.wave, params.n - asked)
        if len(candidates) < params.min_success and not budget_exhausted:
            raise StrategyError(f"only {len(candidates)} samples succeeded; at least {params.min_success} needed")
        pool = Pool(tuple(answers), finished=tuple(voting))
        selection = select(pool, "vote", fallback="first")  # a tie goes to the answer seen first
        counted = set(pool.counted())
        winner = candidates[selection.index]
        await ctx.progress(f"winner: {selection.answer}, {selection.scores[selection.answer]:g} of {len(counted)} "
                           f"votes")
        details = {
            "temperature": temperature if ctx.over is None else None,
            "samples": len(candidates),
            "answer": selection.answer,
            "votes": selection.scores,
            "not_counted": len(candidates) - len(counted),
            "candidates": [
                {"answer": answer, "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
                 "counted": i in counted}
                for i, (c, answer) in enumerate(zip(candidates, answers))
            ],
        }
        if params.adaptive:
            details["settled_probability"] = round(settled, 4)
        return StrategyResult(choices=[winner], details=details, budget_exhausted=budget_exhausted)
