"""RE2, re-reading (Xu et al. 2024): the question stated twice in one prompt, answered in one call.

The last user message becomes "<question>\\nRead the question again: <question>"; the rest of the conversation is
untouched. As the strategy another runs over (`bon:n=8>re2`, `sc>re2`), each run is one sample of this prompt,
drawn at the parent's temperature.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .framework import (
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    last_user_index,
    message_text,
)


class Re2Params(StrategyParams):
    again: str = Field(default="Read the question again:", min_length=1, max_length=200,
                       description="the words between the question and its restatement")


def re2_messages(messages: list[dict[str, Any]], again: str) -> list[dict[str, Any]]:
    """The conversation with its last user message stated twice."""
    i = last_user_index(messages)
    question = message_text(messages[i])
    return [*messages[:i], {**messages[i], "content": f"{question}\n{again} {question}"}, *messages[i + 1:]]


class ReRead(Strategy[Re2Params]):
    slug = "re2"
    description = "re-reading: the question stated twice in one prompt, one call"

    async def run(self, ctx: StrategyContext, params: Re2Params) -> StrategyResult:
        messages = re2_messages(ctx.messages, params.again)
        await ctx.progress("reading the question twice, answering in one call")
        (sample,) = await ctx.generate(messages=messages, label="re2")
        await ctx.emit(sample.text)
        return StrategyResult(choices=[sample], details={"finish_reason": sample.finish_reason})
