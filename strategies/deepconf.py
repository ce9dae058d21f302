"""DeepConf online: confidence-filtered sampling that stops weak traces while they are being generated.

A few warm-up traces set a threshold (a percentile of their lowest-group confidence). Every later trace is
streamed with token logprobs; as soon as the mean confidence of its last `window` tokens falls below the
threshold, the trace is cancelled (the backend call is aborted, so its remaining tokens are never paid for).
Survivors are combined by a confidence-weighted vote.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from .answers import extract_answer
from .framework import (
    DEFAULT_SAMPLING_TEMPERATURE,
    BudgetExceeded,
    CallOptions,
    Candidate,
    Strategy,
    StrategyContext,
    StrategyError,
    StrategyParams,
    StrategyResult,
    Token,
    gather_successes,
    keep_parsing,
)
from .scoring import ConfidenceSpec, token_confidence, trace_confidence
from .selection import Pool, select


class DeepConfParams(StrategyParams):
    limits = {"n": "samples"}

    n: int = Field(default=16, ge=2, description="traces in all, warm-up included")
    warmup: int = Field(default=4, ge=1, description="complete traces that set the threshold")
    keep: float = Field(default=0.9, gt=0, le=1, description="share of warm-up traces above the threshold "
                                                              "(0.9: DeepConf-high, 0.1: DeepConf-low)")
    window: int = Field(default=8, ge=1, description="tokens per sliding confidence group")
    top_k: int = Field(default=5, ge=2, le=20, description="top logprobs per token for token confidence")
    temperature: float | None = Field(
        default=None, gt=0, le=2, description="sampling temperature when the request has none above 0 (default 0.8)")
    count_truncated: bool = Field(
        default=False, description="let traces cut off by max_tokens vote; by default they do only when no trace "
                                   "finished")

    @model_validator(mode="after")
    def _warmup_below_n(self) -> "DeepConfParams":
        if self.warmup >= self.n:
            raise ValueError(f"warmup ({self.warmup}) must be below n ({self.n})")
        return self


class DeepConf(Strategy[DeepConfParams]):
    slug = "deepconf"
    description = "DeepConf online: warm-up sets a confidence threshold, weak traces are cancelled mid-stream, " \
                  "survivors vote weighted by confidence"
    requires = frozenset({"logprobs"})

    @classmethod
    def fan_out(cls, params: DeepConfParams) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: DeepConfParams) -> StrategyResult:
        temperature = ctx.sampling.sampling_temperature(params.temperature or DEFAULT_SAMPLING_TEMPERATURE)
        await ctx.progress(f"warm-up: {params.warmup} traces at temperature {temperature:g}")
        warm = await ctx.generate(CallOptions(temperature=temperature, logprobs=True, top_logprobs=params.top_k),
                                  n=params.warmup, label="warmup")
        confidences = [self._confidence(c.tokens, params) for c in warm]
        scores = [c for c in confidences if c is not None]
        if not scores:
            raise StrategyError("the backend returned no token logprobs for the warm-up traces")
        threshold = float(np.percentile(scores, 100 * (1 - params.keep)))
        # Scores in progress lines are on the [0, 1] scale every strategy's lines use (confidence_to_unit).
        unit = ConfidenceSpec("lowest_group", params.window, params.top_k).unit
        await ctx.progress(f"threshold {_fmt(unit(threshold))}: the {100 * (1 - params.keep):g}th percentile of "
                           f"the warm-up traces' lowest-group scores")
        for i, (candidate, confidence) in enumerate(zip(warm, confidences), start=1):
            await ctx.progress(f"trace {i}/{params.n} → {extract_answer(candidate.text)} "
                               f"(score {_fmt(unit(confidence))})")

        async def online(index: int) -> tuple[Candidate, float | None, int | None]:
            trace = await self._stream_trace(ctx, params, temperature, threshold, index)
            candidate, confidence, pruned_at = trace
            if pruned_at is not None:
                await ctx.progress(f"trace {index + 1}/{params.n} stopped after {pruned_at} tokens "
                                   f"(window score below {_fmt(unit(threshold))})")
            else:
                await ctx.progress(f"trace {index + 1}/{params.n} → {extract_answer(candidate.text)} "
                                   f"(score {_fmt(unit(confidence))})")
            return trace

        streamed, errors = await gather_successes(
            (lambda i=i: online(i) for i in range(params.warmup, params.n)), min_success=0, what="trace")
        budget_exhausted = any(isinstance(e, BudgetExceeded) for e in errors)
        traces = [(c, conf, None) for c, conf in zip(warm, confidences)] + streamed
        return await self._vote(ctx, traces, threshold, temperature, len(errors), params.count_truncated,
                                budget_exhausted)

    @staticmethod
    def _confidence(tokens: tuple[Token, ...] | None, params: DeepConfParams) -> float | None:
        return ConfidenceSpec("lowest_group", params.window, params.top_k).score(tokens)

    async def _stream_trace(self, ctx: StrategyContext, params: DeepConfParams, temperature: float,
                            threshold: float, index: int) -> tuple[Candidate, float | None, int | None]:
        """(the trace, its lowest-group confidence, the token count where it was pruned or None)."""
        pieces: list[str] = []
        tokens: list[Token] = []
        confidences: list[float] = []
        window_sum = 0.0
        finish_reason = "length"
        async with aclosing(ctx.stream(CallOptions(temperature=temperature, top_logprobs=params.top_k),
                                       index=index, label="trace")) as events:
            async for event in events:
                if event.finish_reason:
                    finish_reason = event.finish_reason
                pieces.append(event.text)
                if event.token is None:
                    continue
                tokens.append(event.token)
                confidence = token_confidence(event.token, params.top_k)
                if confidence is None:
                    continue
                confidences.append(confidence)
                window_sum += confidence
                if len(confidences) > params.window:
                    window_sum -= confidences[-params.window - 1]
                if len(confidences) >= params.window and window_sum / params.window < threshold:
                    pruned = Candidate("".join(pieces), "pruned", len(tokens), tuple(tokens), label="trace")
                    return pruned, None, len(confidences)
        candidate = Candidate("".join(pieces), finish_reason, len(tokens), tuple(tokens), label="trace")
        return candidate, trace_confidence(confidences, "lowest_group", params.window), None

    @staticmethod
    async def _vote(ctx: StrategyContext, traces: list[tuple[Candidate, float | None, int | None]],
                    threshold: float, temperature: float, failed: int, count_truncated: bool,
                    budget_exhausted: bool) -> StrategyResult:
        complete = [i for i, (_, confidence, pruned_at) in enumerate(traces)
                    if pruned_at is None and confidence is not None]
        parsing = keep_parsing(ctx, [traces[i][0] for i in complete], "trace")
        complete = [i for i in complete if traces[i][0] in parsing]
        if not complete:
            raise StrategyError(f"no trace survived ({len(traces)} drawn, {failed} failed)")
        pool = Pool(tuple(extract_answer(c.text) for c, _, _ in traces),
                    tuple(confidence for _, confidence, _ in traces),
                    tuple(count_truncated or not c.truncated for c, _, _ in traces))
        # A trace cut off by max_tokens may not have reached its answer: it votes only when no trace finished.
        finished = pool.counted(complete)
        # A trace shorter than the window is judged whole, at the end, by the same threshold.
        survivors = [i for i in finished if (pool.confidences[i] or 0.0) >= threshold] or finished
        selection = select(pool, "weighted", among=survivors, fallback="first")
        winner = traces[selection.index][0]
        pruned = sum(1 for _, _, pruned_at in traces if pruned_at is not None)
        total_weight = sum(selection.scores.values())
        share = selection.scores[selection.answer] / total_weight if total_weight > 0 else 0.0
        await ctx.progress(f"winner: {selection.answer}, {share:.0%} of the confidence-weighted vote "
                           f"({len(survivors)} survivors, {pruned} stopped early)")
        details: dict[str, Any] = {
            "temperature": temperature,
            "threshold": round(threshold, 4),
            "traces": len(traces),
            "pruned": pruned,
            "failed": failed,
            "survivors": len(survivors),
            "answer": selection.answer,
            "weights": {a: round(w, 4) for a, w in selection.scores.items()},
            "candidates": [
                {"answer": pool.answers[i], "confidence": confidence, "tokens": c.completion_tokens,
                 "pruned_at": pruned_at}
                for i, (c, confidence, pruned_at) in enumerate(traces)
            ],
        }
        return StrategyResult(choices=[winner], details=details, budget_exhausted=budget_exhausted)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
