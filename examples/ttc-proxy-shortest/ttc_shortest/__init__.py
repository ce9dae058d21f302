"""`shortest`: draw n answers and return the shortest one that finished (not cut off by max_tokens).

A small model that knows an answer tends to say it directly; the long replies are more often the ones that wander.
The point of this package is the shape of a plugin, though: a `Params` model whose field descriptions become the
proxy's /openapi.json and the docs' parameter table, a `run` that reaches the engine only through its context,
progress lines for streaming clients, and `details` for the response's `ttc` object.
"""

from __future__ import annotations

from pydantic import Field

from ttc_proxy.strategies.framework import (
    DEFAULT_SAMPLING_TEMPERATURE,
    Strategy,
    StrategyContext,
    StrategyError,
    StrategyParams,
    StrategyResult,
    draw,
)


class ShortestParams(StrategyParams):
    # The proxy checks `n` against `strategies.max_samples` (see `limits`) before anything is sent.
    n: int = Field(default=4, ge=1, description="answers to draw")
    temperature: float | None = Field(default=None, gt=0, le=2,
                                      description="sampling temperature when the request has none above 0 "
                                                  "(default 0.8)")
    limits = {"n": "samples"}


class Shortest(Strategy[ShortestParams]):  # the generic argument becomes `Params`
    slug = "shortest"
    description = "draw n answers, return the shortest finished one"
    composable = True  # `shortest>cot`: each answer is a run of the strategy it runs over

    @classmethod
    def fan_out(cls, params: ShortestParams) -> int:
        return params.n

    async def run(self, ctx: StrategyContext, params: ShortestParams) -> StrategyResult:
        # The request's temperature when above 0, else the parameter, else the framework's default (0.8).
        temperature = ctx.sampling.sampling_temperature(params.temperature or DEFAULT_SAMPLING_TEMPERATURE)
        await ctx.progress(f"drawing {params.n} answers at temperature {temperature}")
        candidates = await draw(ctx, params.n, temperature=temperature, label="answer")
        finished = [c for c in candidates if c.finish_reason != "length"] or candidates
        if not finished:
            raise StrategyError("no answer was drawn")
        best = min(finished, key=lambda c: len(c.text.strip()))
        await ctx.progress(f"kept the shortest of {len(finished)} finished answers ({len(best.text.strip())} "
                           f"characters)")
        return StrategyResult(choices=[best], details={
            "drawn": len(candidates), "finished": len(finished),
            "lengths": [len(c.text.strip()) for c in candidates],
        })
