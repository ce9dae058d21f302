"""Budget forcing (s1): control how long the model thinks by continuing its reply from a prefix.

The reply starts with the open tag. The model thinks until it stops (or writes the close tag); if it stopped
before `min_thinking_tokens`, the wait text (default "Wait") is appended and it continues thinking, up to
`max_waits` times. At `max_thinking_tokens` the thinking is cut, the close tag and the answer cue are appended,
and the model writes its answer, which is streamed to the client as it is generated. The thinking is the
reasoning; the answer is the content.

Needs an engine that can continue a prefix: prefill (a trailing assistant message), or raw completions of the
rendered conversation; elsewhere the request is a 400 naming that capability.
"""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import replace

from pydantic import Field, model_validator

from .framework import (
    BudgetExceeded,
    CallOptions,
    Candidate,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    Token,
    message_text,
)


# Room kept when budgeting the answer call: the close tag and answer cue appended to its prompt, and the chat
# template's own tokens around the messages before an engine has reported a prompt's size.
CUE_TOKENS = 16
TEMPLATE_TOKENS = 32


class ThinkParams(StrategyParams):
    limits = {"max_waits": "iterations"}

    min_thinking_tokens: int = Field(default=64, ge=0, description="if the model stops thinking sooner, append "
                                                                   "the wait text and let it continue")
    max_thinking_tokens: int = Field(default=512, ge=1, description="thinking is cut here and the answer asked for")
    max_waits: int = Field(default=2, ge=0, description="how many times the wait text may be appended")
    wait: str = Field(default="Wait", min_length=1, description="appended when the model stops thinking too early")
    open_tag: str = Field(default="<think>", description="starts the thinking")
    close_tag: str = Field(default="</think>", description="ends the thinking")
    answer_cue: str = Field(default="Final answer:", description="written after the thinking, before the answer")
    answer_tokens: int | None = Field(default=None, ge=1, description="max tokens of the answer (default: the "
                                                                      "request's max_tokens)")

    @model_validator(mode="after")
    def _bounds(self) -> ThinkParams:
        if self.min_thinking_tokens > self.max_thinking_tokens:
            raise ValueError("min_thinking_tokens must not exceed max_thinking_tokens")
        return self


class BudgetForcing(Strategy[ThinkParams]):
    slug = "think"
    description = "budget forcing (s1): think at least min and at most max tokens, appending 'Wait' to continue"
    requires = frozenset({"continue"})

    async def run(self, ctx: StrategyContext, params: ThinkParams) -> StrategyResult:
        thinking = f"{params.open_tag}\n"
        spent = 0
        waits = 0
        next_prompt = 0  # the next call's prompt, from the last one's report plus what it generated (0: unknown)
        budget_exhausted = False
        await ctx.progress(f"thinking for {params.min_thinking_tokens}–{params.max_thinking_tokens} tokens")
        answer_reserve = params.answer_tokens or ctx.sampling.max_tokens

        def room() -> int:
            """Thinking tokens the next call may spend, never the answer's share of the budget: a thinking call
            pays its prompt P and its t tokens, then the answer call pays P + t again as its prompt (the thinking is
            part of it) and its own tokens, so t ≤ (left − 2P − answer) / 2."""
            left = ctx.budget
            if left.calls <= 1:
                return 0
            prompt = next_prompt or estimated_prompt()
            return min(params.max_thinking_tokens - spent,
                       (left.tokens - 2 * prompt - answer_reserve - CUE_TOKENS) // 2)

        def estimated_prompt() -> int:
            # Before any call reported its prompt: characters / 3 (English runs ~4 per token) and the template's
            # own tokens, so the estimate errs high.
            text = sum(len(message_text(m)) for m in ctx.messages) + len(thinking)
            return text // 3 + TEMPLATE_TOKENS

        try:
            while True:
                if room() <= 0:  # thinking wants another call the budget cannot spare
                    budget_exhausted = spent < params.max_thinking_tokens
                    break
                allowed = room()
                (step,) = await ctx.continue_prefix(thinking, CallOptions(max_tokens=allowed, stop=[params.close_tag]),
                                                    label="thinking")
                if step.finish_reason == "length" and allowed < params.max_thinking_tokens - spent:
                    budget_exhausted = True  # the budget, not max_thinking_tokens, cut the thinking
                spent += step.completion_tokens
                next_prompt = step.prompt_tokens + step.completion_tokens
                thinking += step.text
                await ctx.progress(step.text.strip() or "(nothing)")
                if step.finish_reason == "length" or spent >= params.min_thinking_tokens \
                        or waits >= params.max_waits:
                    break
                if room() <= 0:
                    budget_exhausted = True
                    break
                waits += 1
                thinking = thinking.rstrip() + f"\n{params.wait}"
                await ctx.progress(f"stopped after {spent} thinking tokens, below {params.min_thinking_tokens}: "
                                   f"appending {params.wait!r}")
        except BudgetExceeded:
            budget_exhausted = True
        if budget_exhausted:
            await ctx.progress("the budget keeps what is left for the answer; answering now")
        forced = thinking.rstrip() + f"\n{params.close_tag}\n{params.answer_cue}"
        answer = await self._answer(ctx, params, forced)
        return StrategyResult(
            choices=[replace(answer, reasoning=thinking[len(params.open_tag):].strip())],
            details={"thinking_tokens": spent, "waits": waits, "answer_tokens": answer.completion_tokens,
                     "cut_at_max": spent >= params.max_thinking_tokens},
            budget_exhausted=budget_exhausted,
        )

    @staticmethod
    async def _answer(ctx: StrategyContext, params: ThinkParams, prefix: str) -> Candidate:
        """The answer after the forced end of thinking, streamed to the client as it comes (the whitespace right
        after the cue is not part of it)."""
        pieces: list[str] = []
        tokens: list[Token] = []
        finish_reason = "stop"
        stream = ctx.stream(CallOptions(max_tokens=params.answer_tokens), prefix=prefix, label="answer")
        async with aclosing(stream) as events:
            async for event in events:
                if event.finish_reason:
                    finish_reason = event.finish_reason
                if event.token is not None:
                    tokens.append(event.token)
                text = event.text if pieces else event.text.lstrip()
                if text:
                    pieces.append(text)
                    await ctx.emit(text)
        generated = "".join(e for e in (t.bytes.decode("utf-8", "replace") if t.bytes else t.text for t in tokens))
        answer = "".join(pieces)
        start = generated.find(answer) if answer and tokens else 0
        return Candidate(text=answer, finish_reason=finish_reason, completion_tokens=len(tokens) or len(pieces),
                         tokens=tuple(tokens) or None, label="think",
                         generated=generated if tokens else None, text_start=max(0, start))
