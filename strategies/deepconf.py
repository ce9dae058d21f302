"""DeepConf online: confidence-filtered sampling that stops weak traces while they are being generated.

A few warm-up traces set a threshold (a percentile of their lowest-group confidence). Every later trace is
streamed with token logprobs; as soon as the mean confidence of its last `window` tokens falls below the
threshold, the trace is cancelled (the backend call is aborted, so its remaining tokens are never paid for).
Survivors are combined by a confidence-weighted vote.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np
from pydantic import Field, model_validator

from .answers import extract_answer
from .framework import (
    FinalChoice,
    Strategy,
    StrategyContext,
    StrategyError,
    StrategyParams,
    StrategyResult,
    is_truncated,
)
from .selection import token_confidence, trace_confidence


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


@dataclass(frozen=True)
class Trace:
    text: str
    finish_reason: str
    tokens: int
    confidence: float | None  # lowest-group confidence; None without logprobs
    pruned_at: int | None = None  # token count when cancelled; None: ran to the end


class DeepConf(Strategy):
    slug = "deepconf"
    description = "DeepConf online: warm-up sets a confidence threshold, weak traces are cancelled mid-stream, " \
                  "survivors vote weighted by confidence"
    Params = DeepConfParams
    requires = frozenset({"logprobs"})

    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult:
        assert isinstance(params, DeepConfParams)
        temperature = ctx.sampling.sampling_temperature(params.temperature or 0.8)
        seed = ctx.sampling.seed
        await ctx.progress(f"warm-up: {params.warmup} traces at temperature {temperature:g}")
        warm = await ctx.generate(n=params.warmup, temperature=temperature, logprobs=True,
                                  top_logprobs=params.top_k, seed=seed, label="warmup")
        traces = [self._complete(c.text, c.finish_reason or "stop", c.completion_tokens, c.logprobs or (), params)
                  for c in warm]
        scores = [t.confidence for t in traces if t.confidence is not None]
        if not scores:
            raise StrategyError("the backend returned no token logprobs for the warm-up traces")
        threshold = float(np.percentile(scores, 100 * (1 - params.keep)))
        await ctx.progress(f"threshold {threshold:.3f}: the {100 * (1 - params.keep):g}th percentile of warm-up "
                           f"lowest-group confidence")
        for i, trace in enumerate(traces, start=1):
            await ctx.progress(f"trace {i}/{params.n} → {extract_answer(trace.text)} "
                               f"(confidence {trace.confidence:.3f})")

        async def online(index: int) -> Trace:
            trace = await self._stream_trace(ctx, params, temperature, threshold,
                                             seed + index if seed is not None else None)
            if trace.pruned_at is not None:
                await ctx.progress(f"trace {index + 1}/{params.n} stopped after {trace.pruned_at} tokens "
                                   f"(window confidence below {threshold:.3f})")
            else:
                await ctx.progress(f"trace {index + 1}/{params.n} → {extract_answer(trace.text)} "
                                   f"(confidence {trace.confidence:.3f})")
            return trace

        results = await asyncio.gather(*(online(i) for i in range(params.warmup, params.n)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, Exception):
                raise failure
        traces += [r for r in results if isinstance(r, Trace)]
        return await self._vote(ctx, traces, threshold, temperature, len(failures), params.count_truncated)

    @staticmethod
    def _complete(text: str, finish_reason: str, tokens: int, logprobs: object, params: DeepConfParams) -> Trace:
        confidences = [c for c in (token_confidence(e, params.top_k) for e in logprobs) if c is not None]  # type: ignore[attr-defined]
        return Trace(text, finish_reason, tokens, trace_confidence(confidences, "lowest_group", params.window))

    @staticmethod
    async def _stream_trace(ctx: StrategyContext, params: DeepConfParams, temperature: float, threshold: float,
                            seed: int | None) -> Trace:
        pieces: list[str] = []
        confidences: list[float] = []
        window_sum = 0.0
        finish_reason = "length"
        async with aclosing(ctx.stream(temperature=temperature, top_logprobs=params.top_k, seed=seed,
                                       label="trace")) as events:
            async for event in events:
                if event.finish_reason:
                    finish_reason = event.finish_reason
                if event.logprob is None:
                    pieces.append(event.text)
                    continue
                pieces.append(event.text)
                confidence = token_confidence(event.logprob, params.top_k)
                if confidence is None:
                    continue
                confidences.append(confidence)
                window_sum += confidence
                if len(confidences) > params.window:
                    window_sum -= confidences[-params.window - 1]
                if len(confidences) >= params.window and window_sum / params.window < threshold:
                    return Trace("".join(pieces), "pruned", len(confidences), None, pruned_at=len(confidences))
        return Trace("".join(pieces), finish_reason, len(confidences),
                     trace_confidence(confidences, "lowest_group", params.window))

    @staticmethod
    async def _vote(ctx: StrategyContext, traces: list[Trace], threshold: float, temperature: float,
                    failed: int, count_truncated: bool) -> StrategyResult:
        complete = [t for t in traces if t.pruned_at is None and t.confidence is not None]
        # A trace cut off by max_tokens may not have reached its answer: it votes only when no trace finished.
        finished = [t for t in complete if count_truncated or not is_truncated(t.finish_reason)] or complete
        # A trace shorter than the window is judged whole, at the end, by the same threshold.
        survivors = [t for t in finished if t.confidence >= threshold] or finished  # type: ignore[operator]
        if not survivors:
            raise StrategyError(f"no trace survived ({len(traces)} drawn, {failed} failed)")
        weights: dict[str, float] = {}
        best: dict[str, Trace] = {}
        for trace in survivors:
            answer = extract_answer(trace.text)
            weights[answer] = weights.get(answer, 0.0) + float(trace.confidence or 0.0)
            if answer not in best or (trace.confidence or 0) > (best[answer].confidence or 0):
                best[answer] = trace
        winner_answer = max(weights, key=lambda a: weights[a])
        winner = best[winner_answer]
        pruned = sum(1 for t in traces if t.pruned_at is not None)
        await ctx.progress(f"winner: {winner_answer}, weight {weights[winner_answer]:.2f} of "
                           f"{sum(weights.values()):.2f} ({len(survivors)} survivors, {pruned} stopped early)")
        return StrategyResult(
            choices=[FinalChoice(winner.text, winner.finish_reason, winner.tokens)],
            details={
                "temperature": temperature,
                "threshold": round(threshold, 4),
                "traces": len(traces),
                "pruned": pruned,
                "failed": failed,
                "survivors": len(survivors),
                "answer": winner_answer,
                "weights": {a: round(w, 4) for a, w in sorted(weights.items(), key=lambda kv: -kv[1])},
                "candidates": [
                    {"answer": extract_answer(t.text), "confidence": t.confidence, "tokens": t.tokens,
                     "pruned_at": t.pruned_at}
                    for t in traces
                ],
            },
        )
