"""Chain of thought with reflection: one call with a reasoning system prompt; the answer is its output section.

The system prompt asks for <thinking>, then <reflection> (checking the thinking), then <output> with the final
answer, and shows one worked example of that shape (small models follow a shown format far more often than a
described one). The rest of the conversation is untouched: the prompt goes before it as a system message (after
the client's own system messages). The client gets the output section as the answer and the thinking and
reflection as reasoning; a reply with no output section is the answer whole, its sections removed.

As the strategy another runs over (`bon:n=8>cot`, `sc>cot`, `mcts>cot`), each run is one sample of this prompt,
drawn at the parent's temperature.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from .framework import Candidate, Strategy, StrategyContext, StrategyParams, StrategyResult, estimate_tokens

INSTRUCTIONS = (
    "Think before you answer. First reason step by step inside <thinking></thinking>, breaking the problem into "
    "small parts. Then check your reasoning for mistakes inside <reflection></reflection>. Finally give only the "
    "final answer inside <output></output>."
)
EXAMPLE = (
    "Example.\n"
    "Question: A shelf holds 3 rows of 7 books, and 5 more books lie on top. How many books are there?\n"
    "<thinking>3 rows of 7 books is 3 times 7 = 21 books. Adding the 5 on top: 21 + 5 = 26.</thinking>\n"
    "<reflection>Check: 26 - 5 = 21 and 21 / 3 = 7. Correct.</reflection>\n"
    "<output>26</output>"
)
_SECTION = re.compile(r"<(thinking|reflection)>(.*?)(?:</\1>|$)", re.DOTALL | re.IGNORECASE)
_OUTPUT = re.compile(r"<output>(.*?)(?:</output>|$)", re.DOTALL | re.IGNORECASE)


class CotParams(StrategyParams):
    example: bool = Field(default=True, description="show the worked example in the system prompt")
    system_prompt: str | None = Field(
        default=None, description="replaces the built-in instructions (keep the <output> section: the answer is "
                                  "read from it)")


def cot_messages(messages: list[dict[str, Any]], params: CotParams) -> list[dict[str, Any]]:
    """The conversation with the reasoning prompt as a system message after the client's own system messages."""
    prompt = params.system_prompt or INSTRUCTIONS
    if params.example and params.system_prompt is None:
        prompt = f"{prompt}\n\n{EXAMPLE}"
    leading = 0
    while leading < len(messages) and messages[leading].get("role") in ("system", "developer"):
        leading += 1
    return [*messages[:leading], {"role": "system", "content": prompt}, *messages[leading:]]


def split_reply(reply: str) -> tuple[str, str, int]:
    """(answer, reasoning, where the answer starts in the reply): the last output section; else the last text
    outside the thinking and reflection sections (what follows the reasoning); else the whole reply."""
    reasoning = "\n".join(m.group(2).strip() for m in _SECTION.finditer(reply))
    outputs = list(_OUTPUT.finditer(reply))
    if outputs:
        return _span(reply, outputs[-1].start(1), outputs[-1].end(1), reasoning)
    outside, position = [], 0
    for section in _SECTION.finditer(reply):
        outside.append((position, section.start()))
        position = section.end()
    outside.append((position, len(reply)))
    for start, end in reversed(outside):
        if reply[start:end].strip():
            return _span(reply, start, end, reasoning)
    return _span(reply, 0, len(reply), reasoning)


def _span(reply: str, start: int, end: int, reasoning: str) -> tuple[str, str, int]:
    raw = reply[start:end]
    return raw.strip(), reasoning, start + (len(raw) - len(raw.lstrip()))


class ChainOfThought(Strategy[CotParams]):
    slug = "cot"
    description = "chain of thought with reflection: one call with a reasoning prompt; the answer is its output"

    async def run(self, ctx: StrategyContext, params: CotParams) -> StrategyResult:
        await ctx.progress("thinking, then reflecting, then answering in one call")
        (sample,) = await ctx.generate(n=1, messages=cot_messages(ctx.messages, params), label="cot")
        answer, reasoning, start = split_reply(sample.text)
        # A reasoning model's own thinking was already set apart: the tokens index the reply it came from.
        generated = sample.generated if sample.generated is not None else sample.text
        start += sample.text_start if sample.generated is not None else 0
        candidate = Candidate(
            text=answer, finish_reason=sample.finish_reason,
            completion_tokens=estimate_tokens(generated, sample.tokens, sample.completion_tokens, start,
                                              start + len(answer)),
            tokens=sample.tokens, reasoning="\n".join(p for p in (sample.reasoning, reasoning) if p),
            thinking=sample.thinking,
            seed=sample.seed, label="cot", generated=generated, text_start=start,
            prompt_tokens=sample.prompt_tokens,
        )
        if reasoning:
            await ctx.progress(reasoning)
        await ctx.emit(answer)
        return StrategyResult(choices=[candidate], details={
            "format_followed": bool(_OUTPUT.search(sample.text)), "answer": answer,
            "finish_reason": sample.finish_reason,
        })
