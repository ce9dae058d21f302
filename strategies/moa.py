"""Mixture of agents: `n` answers drawn at diverse settings, then one aggregation call that sees them all.

Proposal i is drawn at a temperature spread evenly from `min_temperature` to `max_temperature` and, with `models`,
by those models in turn (each routed to the backend serving it). The aggregator (`aggregator_model`, default the
request's model) gets the question followed by the proposals, numbered, and writes the answer, at the request's
temperature. Proposals that fail are left out; when the budget stops the aggregation, the most common proposed
answer is returned. As the strategy another runs over (`bon:n=4>moa`), each run is one aggregated answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from .answers import extract_answer, tally
from .framework import (
    BudgetExceeded,
    CallOptions,
    Candidate,
    ModelNames,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    gather_successes,
    last_user_index,
    message_text,
)

AGGREGATE_PROMPT = ("{question}\n\nOther assistants answered this question as follows (some answers may be "
                    "wrong):\n{proposals}\n\nCheck these answers and give the correct answer to the question.")
PROPOSAL_CHARS = 2000  # of each proposal, shown to the aggregator


class MoaParams(StrategyParams):
    limits = {"n": "samples"}

    n: int = Field(default=3, ge=1, description="proposals drawn before aggregating")
    min_temperature: float = Field(default=0.3, ge=0, le=2, description="the first proposal's temperature")
    max_temperature: float = Field(default=1.0, ge=0, le=2, description="the last proposal's temperature")
    models: ModelNames | None = Field(default=None, description="models drawing the proposals, in turn "
                                                                "(`a+b` in a model-name prefix; default: the "
                                                                "request's)")
    aggregator_model: str | None = Field(default=None, description="the model that aggregates (default: the "
                                                                   "request's)")

    @model_validator(mode="after")
    def _ordered(self) -> MoaParams:
        if self.min_temperature > self.max_temperature:
            raise ValueError("min_temperature must not be above max_temperature")
        return self

    def temperature(self, i: int) -> float:
        if self.n == 1:
            return self.min_temperature
        return round(self.min_temperature + (self.max_temperature - self.min_temperature) * i / (self.n - 1), 4)


def aggregate_messages(messages: list[dict[str, Any]], proposals: list[Candidate]) -> list[dict[str, Any]]:
    """The conversation with the proposals shown after the last user message's question."""
    numbered = "\n".join(f"{i}. {p.text.strip()[:PROPOSAL_CHARS]}" for i, p in enumerate(proposals, 1))
    i = last_user_index(messages)
    content = AGGREGATE_PROMPT.format(question=message_text(messages[i]), proposals=numbered)
    return [*messages[:i], {**messages[i], "content": content}, *messages[i + 1:]]


class MixtureOfAgents(Strategy[MoaParams]):
    slug = "moa"
    description = "mixture of agents: n answers at diverse temperatures (and models), then one aggregation call"

    @classmethod
    def references(cls, params: MoaParams) -> dict[str, list[str]]:
        named = [*(params.models or ()), *([params.aggregator_model] if params.aggregator_model else [])]
        return {"models": list(dict.fromkeys(named))} if named else {}

    @classmethod
    def fan_out(cls, params: MoaParams) -> int:
        return params.n + 1

    async def run(self, ctx: StrategyContext, params: MoaParams) -> StrategyResult:
        last_user_index(ctx.messages)  # a conversation without a question is refused before any call
        models = params.models or [None]

        async def propose(i: int) -> tuple[int, Candidate]:
            model = models[i % len(models)]
            proposer = ctx.for_model(model) if model is not None else ctx
            (sample,) = await proposer.generate(CallOptions(temperature=params.temperature(i)), index=i,
                                                label=f"proposal {i}")
            await ctx.progress(f"proposal {i}{f' by {model}' if model else ''} at T={params.temperature(i):g}: "
                               f"{extract_answer(sample.text)}")
            return i, sample

        await ctx.progress(f"mixture of agents: {params.n} proposals, then one aggregation")
        found, errors = await gather_successes((lambda i=i: propose(i) for i in range(params.n)), min_success=1,
                                               what="proposal")
        proposals = [sample for _, sample in found]
        summaries = [{"proposal": i, "model": models[i % len(models)], "temperature": params.temperature(i),
                      "answer": extract_answer(sample.text), "finish_reason": sample.finish_reason}
                     for i, sample in found]
        ctx.note("proposals", summaries)
        details: dict[str, Any] = {"proposals": summaries, "aggregator_model": params.aggregator_model,
                                   **({"failed_proposals": [str(e) for e in errors]} if errors else {})}
        aggregator = ctx.for_model(params.aggregator_model) if params.aggregator_model else ctx
        await ctx.progress(f"aggregating {len(proposals)} proposals"
                           f"{f' with {params.aggregator_model}' if params.aggregator_model else ''}")
        try:
            (answer,) = await aggregator.generate(messages=aggregate_messages(ctx.messages, proposals),
                                                  label="aggregate")
        except BudgetExceeded:
            leader = tally(extract_answer(p.text) for p in proposals).leader
            answer = next(p for p in proposals if extract_answer(p.text) == leader)
            await ctx.progress("the budget stopped the aggregation: answering with the most common proposal")
            await ctx.emit(answer.text)
            return StrategyResult(choices=[answer], details={**details, "aggregated": False}, budget_exhausted=True)
        await ctx.emit(answer.text)
        return StrategyResult(choices=[answer], details={**details, "aggregated": True,
                                                         "answer": extract_answer(answer.text)})
