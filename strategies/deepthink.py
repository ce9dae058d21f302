"""Deep thinking in parallel: plan approaches, explore them concurrently, answer directly when they agree, else
synthesise.

1. Plan (one call, SELF-DISCOVER style): the model picks `k` reasoning approaches by number from a list of
   general ones and adapts each to the question in a line ("3: ..."). A pick without a usable adaptation keeps
   the listed text; picks it does not make are filled from the list, in order.
2. Explore: one sample per approach, all concurrently, each told to follow its approach and end with
   "Answer: ...". Different approaches give the diversity, so exploration may run at the request's temperature
   (greedy included).
3. Route on uncertainty: when the share of finished explorations that agree on the leading extracted answer
   reaches `agreement`, that answer is returned directly (its most likely exploration's reply); otherwise one
   synthesis call sees every exploration and decides.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from .answers import extract_answer
from .framework import (
    BudgetExceeded,
    CallOptions,
    Candidate,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    gather_successes,
    keep_parsing,
    last_user_text,
)
from .scoring import mean_token_probability
from .selection import Pool, select

APPROACHES = (
    "Work it out step by step, writing every intermediate result.",
    "Break the problem into smaller parts and solve each part first.",
    "Solve it, then check the result by working backwards from it.",
    "Estimate the answer roughly first, then compute it exactly and compare.",
    "Write down what is given and what is asked before solving.",
    "Solve a simpler version of the problem first, then the real one.",
)
PLAN_PROMPT = ("Here are ways to reason about a problem:\n{modules}\n\nProblem: {question}\n\n"
               "Pick the {k} ways that suit this problem best. For each, write its number, a colon, and the way "
               "adapted to this problem in one sentence. Reply with {k} lines and nothing else.")
EXPLORE_PROMPT = ("Solve the problem with this approach: {approach} Reason briefly, then give the final answer "
                  "on the last line as 'Answer: ...'.")
SYNTHESIS_PROMPT = ("{question}\n\nHere are {k} attempts at this problem:\n\n{attempts}\n\nThey disagree. Compare "
                    "them, decide which reasoning is right, and give the final answer on the last line as "
                    "'Answer: ...'.")
_PICK = re.compile(r"^[ \t]*(\d+)[ \t]*[:.)-][ \t]*(.*?)[ \t]*$", re.MULTILINE)


class DeepThinkParams(StrategyParams):
    limits = {"k": "samples"}

    k: int = Field(default=3, ge=2, le=len(APPROACHES), description="approaches explored in parallel")
    agreement: float = Field(default=0.6, gt=0, le=1, description="share of explorations agreeing on the leading "
                                                                  "answer that skips the synthesis")
    plan: bool = Field(default=True, description="let the model pick and adapt the approaches (one call); "
                                                 "else the first k of the built-in list. Default: the best "
                                                 "measured on the dev set, see docs/results/2026-12-07-search.md")
    temperature: float | None = Field(default=None, ge=0, le=2, description="exploration temperature (default: "
                                                                            "the request's)")
    plan_tokens: int = Field(default=160, ge=16, description="max tokens of the plan")


def parse_plan(text: str, k: int) -> tuple[list[str], int]:
    """The plan's approaches (k of them) and how many the model picked: picks are "N: adapted sentence" lines
    naming a listed way; an adaptation of fewer than three words keeps the listed text; the rest come from the
    list in order."""
    picked: dict[int, str] = {}
    for match in _PICK.finditer(text):
        number, adapted = int(match.group(1)), match.group(2)
        if 1 <= number <= len(APPROACHES) and number not in picked and len(picked) < k:
            picked[number] = adapted if len(adapted.split()) >= 3 else APPROACHES[number - 1]
    approaches = list(picked.values())
    for number, listed in enumerate(APPROACHES, start=1):
        if len(approaches) >= k:
            break
        if number not in picked:
            approaches.append(listed)
    return approaches, len(picked)


class DeepThink(Strategy[DeepThinkParams]):
    slug = "deepthink"
    description = "deep thinking: plan k approaches, explore them in parallel, answer if they agree, else synthesise"

    @classmethod
    def fan_out(cls, params: DeepThinkParams) -> int:
        return params.k

    async def run(self, ctx: StrategyContext, params: DeepThinkParams) -> StrategyResult:
        question = last_user_text(ctx.messages)
        approaches, planned = await self._plan(ctx, params, question)
        for i, approach in enumerate(approaches, start=1):
            await ctx.progress(f"approach {i}: {approach}")

        async def explore(i: int, approach: str) -> tuple[str, Candidate]:
            span = ctx.span("explore", approach=approach)
            messages = [{"role": "system", "content": EXPLORE_PROMPT.format(approach=approach)}, *ctx.messages]
            (reply,) = await span.generate(CallOptions(temperature=params.temperature,
                                                       logprobs=ctx.supports("logprobs")),
                                           messages=messages, label="explore")
            await ctx.progress(f"approach {i} → {extract_answer(reply.text)}")
            return approach, reply

        results, errors = await gather_successes(
            (lambda i=i, a=a: explore(i, a) for i, a in enumerate(approaches, start=1)), min_success=1,
            what="exploration")
        kept = keep_parsing(ctx, [reply for _, reply in results], "exploration")
        explored = [(a, reply) for a, reply in results if reply in kept]
        pool = Pool(tuple(extract_answer(c.text) for _, c in explored),
                    tuple(mean_token_probability(c.answer_tokens or ()) for _, c in explored),
                    tuple(not c.truncated for _, c in explored))
        vote = select(pool, "vote", fallback="confidence" if pool.has_confidence else "first")
        # Unfinished explorations (cut off by max_tokens) have no answer: they count as not agreeing.
        share = sum(a == vote.answer and not c.truncated for a, (_, c) in zip(pool.answers, explored)) / len(explored)
        details: dict[str, Any] = {
            "approaches": approaches, "planned": planned, "failed": len(errors),
            "explorations": [{"approach": a, "answer": pool.answers[i], "finish_reason": c.finish_reason}
                             for i, (a, c) in enumerate(explored)],
            "agreement": round(share, 4),
        }
        if share >= params.agreement or len(explored) == 1:
            await ctx.progress(f"{share:.0%} of the explorations agree on {vote.answer}: answering directly")
            details.update(route="direct", answer=vote.answer)
            return StrategyResult(choices=[explored[vote.index][1]], details=details)
        await ctx.progress(f"the explorations disagree ({share:.0%} on {vote.answer}): synthesising")
        attempts = "\n\n".join(f"Attempt {i} ({a}):\n{c.text.strip()}" for i, (a, c) in enumerate(explored, start=1))
        messages = [*ctx.messages[:-1], {"role": "user", "content": SYNTHESIS_PROMPT.format(
            question=question, k=len(explored), attempts=attempts)}]
        try:
            (synthesis,) = await ctx.span("synthesis").generate(CallOptions(temperature=0.0), messages=messages,
                                                                label="synthesis")
        except BudgetExceeded:
            await ctx.progress(f"the budget ran out before the synthesis; answering with the vote: {vote.answer}")
            details.update(route="vote (budget)", answer=vote.answer)
            return StrategyResult(choices=[explored[vote.index][1]], details=details, budget_exhausted=True)
        details.update(route="synthesis", answer=extract_answer(synthesis.text))
        await ctx.progress(f"synthesis → {details['answer']}")
        return StrategyResult(choices=[synthesis], details=details)

    @staticmethod
    async def _plan(ctx: StrategyContext, params: DeepThinkParams, question: str) -> tuple[list[str], int]:
        if not params.plan:
            return list(APPROACHES[:params.k]), 0
        modules = "\n".join(f"{i}. {a}" for i, a in enumerate(APPROACHES, start=1))
        messages = [{"role": "user", "content": PLAN_PROMPT.format(modules=modules, question=question, k=params.k)}]
        (plan,) = await ctx.span("plan").generate(
            CallOptions(temperature=0.0, max_tokens=params.plan_tokens, answers=False), messages=messages,
            label="plan")
        approaches, planned = parse_plan(plan.text, params.k)
        if planned < params.k:
            await ctx.progress(f"the plan gave {planned} of {params.k} approaches; the rest come from the list")
        return approaches, planned
