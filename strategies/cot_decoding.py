"""CoT-decoding (Wang & Zhou 2024, "Chain-of-Thought Reasoning Without Prompting"): branch on the top-k first
tokens, continue each greedily, keep the path whose answer the model is surest of.

The greedy reply is drawn with the engine's top `k` alternatives at its first position: it is the first path. Each
other alternative is forced by token id and continued greedily from there (`/v1/completions` on the rendered
conversation's ids, concurrently). In every path the answer is located with the shared reader
(strategies/answers.py) and the path is scored by its margin: the mean, over the tokens of the answer, of the
probability of the token the path has there minus that of its strongest listed rival (on a greedy continuation,
the paper's top-1 minus top-2). A forced first token counts against its rival the model preferred, so an answer
forced at the first token is not mistaken for a sure one. Paths cut off by max_tokens compete only when none
finished. The best path is the answer; with `aggregate=true`, the answer whose paths' margins sum highest (its
best path).

With `state_answer=true` (the paper's way of finding the answer span in free text), each path is continued
greedily after `answer_prompt` ("\\nSo the answer is") for at most `answer_tokens` tokens, and the answer and its
margin are read from that continuation: a path that restates the question or is cut off then still states an
answer, instead of being judged by the last number it happened to write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pydantic import Field

from .answers import last_number, locate_answer
from .framework import (
    BudgetExceeded,
    CallOptions,
    Candidate,
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    Token,
    TokenAlternative,
    gather_successes,
    tokens_between,
)
from .guided import NEEDS, alternative_ids, alternative_with_text, same_token, top_alternatives

MARGIN_TOP_LOGPROBS = 2  # a continued path needs its tokens' rivals, no more


class CotDecodingParams(StrategyParams):
    limits = {"k": "samples"}

    k: int = Field(default=10, ge=1, le=20, description="first-token branches (paths), the greedy one included")
    aggregate: bool = Field(default=False, description="answer with the answer whose paths' margins sum highest, "
                                                       "not the single most confident path")
    min_first_probability: float = Field(default=0.0, ge=0, le=1, description="a first token below this "
                                                                              "probability is not branched")
    state_answer: bool = Field(default=False, description="continue each path after answer_prompt and read its "
                                                         "answer (and margin) from what it states there")
    answer_prompt: str = Field(default="\nSo the answer is", min_length=1, max_length=200,
                               description="state_answer: the text appended to each path")
    answer_tokens: int = Field(default=8, ge=1, le=64, description="state_answer: tokens of the stated answer")


@dataclass(frozen=True)
class Path:
    """One decoding path: its forced first token, the reply along it, and how sure the model is of its answer."""

    first: TokenAlternative
    candidate: Candidate
    answer: str
    margin: float
    answer_tokens: int
    finished: bool  # it reached an answer: it ended on its own, or stated one after the answer prompt

    def summary(self, index: int) -> dict[str, Any]:
        return {"path": index, "first_token": self.first.text,
                "first_probability": round(math.exp(self.first.logprob), 4), "answer": self.answer,
                "margin": round(self.margin, 4), "answer_tokens": self.answer_tokens,
                "finished": self.finished, "finish_reason": self.candidate.finish_reason, "text": self.candidate.text}


def token_margin(token: Token) -> float | None:
    """The probability of the token minus that of its strongest listed rival (0 when none is listed); None when
    the engine listed nothing there."""
    listed = [a for a in token.top if math.isfinite(a.logprob)]
    if not listed:
        return None
    own = next((a for a in listed if same_token(a, token)), None)
    own_probability = math.exp(own.logprob if own is not None else token.logprob)
    rivals = [math.exp(a.logprob) for a in listed if not same_token(a, token)]
    return own_probability - max(rivals, default=0.0)


def answer_margin(candidate: Candidate) -> tuple[str, float, int]:
    """(the answer, its mean margin, how many tokens it was measured on): the answer's own tokens, all of the
    reply's when none overlaps the answer's span."""
    located = locate_answer(candidate.text)
    tokens = candidate.tokens or ()
    spanned = tokens_between(tokens, located.start, located.end) or tokens
    margins = [m for m in (token_margin(t) for t in spanned) if m is not None]
    return located.answer, (sum(margins) / len(margins) if margins else 0.0), len(margins)


def choose(paths: list[Path], aggregate: bool) -> tuple[int, dict[str, float]]:
    """The chosen path's index and, when aggregating, each answer's summed margin. Finished paths first."""
    finished = [i for i, p in enumerate(paths) if p.finished] or list(range(len(paths)))
    if not aggregate:
        return max(finished, key=lambda i: (paths[i].margin, -i)), {}
    sums: dict[str, float] = {}
    for i in finished:
        sums[paths[i].answer] = sums.get(paths[i].answer, 0.0) + paths[i].margin
    order = list(sums)
    best_answer = max(sums, key=lambda a: (sums[a], -order.index(a)))
    best = max((i for i in finished if paths[i].answer == best_answer), key=lambda i: (paths[i].margin, -i))
    return best, sums


class CotDecoding(Strategy[CotDecodingParams]):
    slug = "cot_decoding"
    description = "CoT-decoding: the top-k first tokens each continued greedily; the path whose answer tokens the " \
                  "model is surest of (top-1 minus top-2 margin), or the answer with the highest summed margin"
    requires = NEEDS
    structured_output = False  # paths are continued from raw token ids: no grammar follows them

    @classmethod
    def requirements(cls, params: CotDecodingParams) -> dict[str, str]:
        return {"logprobs": "reading the first token's alternatives and the answer tokens' margins",
                "completions": "continuing each first token from exact token ids",
                "tokenize": "continuing from token ids", "render": "continuing from token ids"}

    @classmethod
    def fan_out(cls, params: CotDecodingParams) -> int:
        return params.k

    async def run(self, ctx: StrategyContext, params: CotDecodingParams) -> StrategyResult:
        top = max(params.k, MARGIN_TOP_LOGPROBS)
        await ctx.progress(f"CoT-decoding: the greedy reply, then up to {params.k - 1} other first tokens "
                           f"continued greedily")
        (greedy,) = await ctx.generate(CallOptions(temperature=0.0, logprobs=True, top_logprobs=top), label="path 0")
        paths = [await self._path(ctx, params, 0, self._first(greedy), greedy)]
        await ctx.progress(self._line(0, paths[0]))
        budget_exhausted = False
        if greedy.tokens:
            first_token = greedy.tokens[0]
            others = [a for a in top_alternatives(first_token, params.k, params.min_first_probability)[1:]
                      if math.isfinite(a.logprob)]
            branched, errors = await gather_successes(
                (lambda i=i, a=a: self._branch(ctx, params, i, a, greedy) for i, a in enumerate(others, 1)),
                min_success=0, what="path")
            budget_exhausted = any(isinstance(e, BudgetExceeded) for e in errors)
            if errors:
                ctx.note("failed_paths", [str(e) for e in errors])
            for path in branched:
                if path is not None:
                    paths.append(path)
                    await ctx.progress(self._line(len(paths) - 1, path))
        chosen, sums = choose(paths, params.aggregate)
        best = paths[chosen]
        summaries = [p.summary(i) for i, p in enumerate(paths)]
        ctx.note("paths", summaries)
        how = f"summed margin {sums[best.answer]:.3f}" if params.aggregate else f"margin {best.margin:.3f}"
        await ctx.progress(f"answer: {best.answer} (path {chosen}, first token {best.first.text!r}, {how})")
        await ctx.emit(best.candidate.text)
        details: dict[str, Any] = {"k": params.k, "aggregate": params.aggregate, "paths": summaries,
                                   "chosen": chosen, "answer": best.answer, "margin": round(best.margin, 4)}
        if params.aggregate:
            details["answer_margins"] = {a: round(s, 4) for a, s in sums.items()}
        return StrategyResult(choices=[best.candidate], details=details, budget_exhausted=budget_exhausted)

    @staticmethod
    def _first(greedy: Candidate) -> TokenAlternative:
        if not greedy.tokens:
            return TokenAlternative(greedy.text, 0.0)
        token = greedy.tokens[0]
        return top_alternatives(token, 1, 0.0)[0]

    @staticmethod
    async def _path(ctx: StrategyContext, params: CotDecodingParams, index: int, first: TokenAlternative,
                    candidate: Candidate) -> Path:
        """The path scored: on its own answer, or on the answer it states after the answer prompt."""
        if not params.state_answer or not candidate.tokens:
            answer, margin, measured = answer_margin(candidate)
            return Path(first, candidate, answer, margin, measured, not candidate.truncated)
        prompt = params.answer_prompt
        ids = [*await ctx.token_ids(candidate.tokens), *await ctx.tokenize(prompt)]
        try:
            options = CallOptions(temperature=0.0, max_tokens=params.answer_tokens, logprobs=True,
                                  top_logprobs=MARGIN_TOP_LOGPROBS)
            (stated,) = await ctx.continue_prefix(ids, options, index=params.k + index, label=f"answer {index}")
        except BudgetExceeded:  # the path stands as it is, judged on its own text
            answer, margin, measured = answer_margin(candidate)
            return Path(first, candidate, answer, margin, measured, not candidate.truncated)
        answer, margin, measured = answer_margin(stated)
        shift = len(candidate.text) + len(prompt)
        whole = replace(candidate, text=candidate.text + prompt + stated.text, finish_reason=stated.finish_reason,
                        completion_tokens=candidate.completion_tokens + stated.completion_tokens,
                        tokens=(*candidate.tokens, *(replace(t, offset=t.offset + shift) for t in stated.tokens or ())))
        stated_one = last_number(stated.text) is not None or not stated.truncated
        return Path(first, whole, answer, margin, measured, finished=stated_one)

    async def _branch(self, ctx: StrategyContext, params: CotDecodingParams, index: int,
                      alternative: TokenAlternative, greedy: Candidate) -> Path | None:
        """The path forced through this first token and continued greedily (None: the token reads as nothing,
        an end of turn, so there is no reply along it)."""
        alternative = await alternative_with_text(ctx, alternative)
        if not alternative.text:
            return None
        forced = await alternative_ids(ctx, alternative)
        assert greedy.tokens is not None
        forced_token = Token(alternative.text, alternative.logprob, forced[0] if len(forced) == 1 else None,
                             alternative.bytes, offset=0, top=greedy.tokens[0].top)
        remaining = ctx.sampling.max_tokens - len(forced)
        if remaining < 1:
            candidate = Candidate(alternative.text, "length", len(forced), (forced_token,), label=f"path {index}")
            return await self._path(ctx, params, index, alternative, candidate)
        options = CallOptions(temperature=0.0, max_tokens=remaining, logprobs=True, top_logprobs=MARGIN_TOP_LOGPROBS)
        (rest,) = await ctx.continue_prefix(list(forced), options, index=index, label=f"path {index}")
        shift = len(alternative.text)
        tokens = (forced_token, *(replace(t, offset=t.offset + shift) for t in rest.tokens or ()))
        candidate = Candidate(alternative.text + rest.text, rest.finish_reason, len(forced) + rest.completion_tokens,
                              tokens, label=f"path {index}", prompt_tokens=rest.prompt_tokens)
        return await self._path(ctx, params, index, alternative, candidate)

    @staticmethod
    def _line(index: int, path: Path) -> str:
        cut = "" if path.finished else " (cut off)"
        return f"path {index} from {path.first.text!r}: {path.answer or '…'} margin {path.margin:.3f}{cut}"
