"""Strategies run together: in sequence (`pipeline`, optillm's `&`) or side by side (`parallel`, optillm's `|`).

pipeline  each stage answers the conversation whose last user message is the previous stage's answer (the first
          stage answers the request as sent); the last stage's answer is the reply
parallel  every stage answers the request concurrently; the reply has one choice per stage, in stage order

Each stage is a nested run of a registered strategy (StrategyContext.run_strategy), inside this run's budget and
trace; depth and fan-out limits apply to it as to any composition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .framework import (
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    StrategySpec,
    gather_all,
)


class Stage(BaseModel):
    """One strategy of a combination, with its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = Field(min_length=1, description="a registered strategy's slug")
    params: dict[str, Any] = Field(default_factory=dict, description="its parameters")

    def spec(self) -> StrategySpec:
        return StrategySpec(self.strategy, dict(self.params))

    def describe(self) -> str:
        return self.spec().describe()


class CombinationParams(StrategyParams):
    stages: list[Stage] = Field(min_length=2, max_length=8, description="the strategies to run, in order")


def with_last_user_text(messages: Sequence[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The conversation with its last user message's content replaced by `text` (appended when it has none)."""
    conversation = [dict(m) for m in messages]
    for message in reversed(conversation):
        if message.get("role") == "user":
            message["content"] = text
            return conversation
    return [*conversation, {"role": "user", "content": text}]


class Pipeline(Strategy[CombinationParams]):
    slug = "pipeline"
    description = "stages in sequence: each answers the previous stage's answer (optillm's '&')"

    async def run(self, ctx: StrategyContext, params: CombinationParams) -> StrategyResult:
        messages = ctx.messages
        stages: list[dict[str, Any]] = []
        result: StrategyResult | None = None
        for i, stage in enumerate(params.stages, start=1):
            await ctx.progress(f"stage {i}/{len(params.stages)}: {stage.describe()}")
            result = await ctx.run_strategy(stage.spec(), messages=messages)
            answer = result.answer
            stages.append({"strategy": stage.describe(), "answer": answer.text,
                           "completion_tokens": result.usage.completion_tokens if result.usage else None})
            messages = with_last_user_text(messages, answer.text)
        assert result is not None
        last = result.answer
        # The reply is the last stage's answer; its own budget flag travels with it.
        return StrategyResult(choices=[replace(last, label=self.slug)], details={"stages": stages},
                              budget_exhausted=result.budget_exhausted)


class Parallel(Strategy[CombinationParams]):
    slug = "parallel"
    description = "stages side by side: one choice per stage (optillm's '|')"

    @classmethod
    def fan_out(cls, params: CombinationParams) -> int:
        return len(params.stages)

    async def run(self, ctx: StrategyContext, params: CombinationParams) -> StrategyResult:
        await ctx.progress(f"running {', '.join(s.describe() for s in params.stages)} side by side")
        results = await gather_all(ctx.run_strategy(stage.spec()) for stage in params.stages)
        for stage, result in zip(params.stages, results):
            await ctx.progress(f"{stage.describe()} → {_preview(result.answer.text)}")
        details = {"stages": [{"strategy": stage.describe(), "answer": result.answer.text,
                               "completion_tokens": result.usage.completion_tokens if result.usage else None}
                              for stage, result in zip(params.stages, results)]}
        return StrategyResult(choices=[replace(r.answer, label=s.strategy) for s, r in zip(params.stages, results)],
                              details=details, budget_exhausted=any(r.budget_exhausted for r in results))


def _preview(text: str, limit: int = 80) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"

