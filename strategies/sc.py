"""Self-consistency: sample n answers, extract each one's final answer, return a sample of the majority."""

from __future__ import annotations

from pydantic import Field

from .answers import extract_answer, tally
from .framework import (
    DEFAULT_SAMPLING_TEMPERATURE,
    Candidate,
    FinalChoice,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
)


class SelfConsistencyParams(StrategyParams):
    limits = {"n": "samples"}

    n: int = Field(default=8, ge=1, description="samples to draw")
    temperature: float | None = Field(
        default=None, gt=0, le=2, description="sampling temperature when the request has none above 0 (default 0.8)"
    )
    min_success: int = Field(default=1, ge=1, description="fail unless at least this many samples succeed")


class SelfConsistency(Strategy):
    slug = "sc"
    description = "self-consistency: n samples, majority vote over extracted answers"
    Params = SelfConsistencyParams

    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        assert isinstance(params, SelfConsistencyParams)
        # The request's temperature when above 0; else the `temperature` param; else 0.8.
        temperature = ctx.sampling.sampling_temperature(params.temperature or DEFAULT_SAMPLING_TEMPERATURE)
        await ctx.progress(f"drawing {params.n} samples at temperature {temperature:g}")
        candidates = await ctx.generate(n=params.n, temperature=temperature, min_success=min(params.min_success, params.n))
        answers = [extract_answer(c.text) for c in candidates]
        for i, (candidate, answer) in enumerate(zip(candidates, answers), start=1):
            await ctx.progress(f"sample {i}/{len(candidates)} → {answer}")
        votes = tally(answers)
        leader, leader_votes = votes.ranked()[0]
        winner = _first_with_answer(candidates, answers, leader)
        await ctx.progress(f"winner: {leader}, {leader_votes:g} of {len(candidates)} votes")
        return StrategyResult(
            choices=[FinalChoice(winner.text, winner.finish_reason or "stop", winner.completion_tokens)],
            details={
                "temperature": temperature,
                "samples": len(candidates),
                "answer": leader,
                "votes": dict(votes.ranked()),
            },
        )


def _first_with_answer(candidates: list[Candidate], answers: list[str], answer: str) -> Candidate:
    return candidates[answers.index(answer)]
