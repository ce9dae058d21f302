"""A cascade policy for `auto`: operating points, each a list of stages (a strategy each) with a stop rule on a
signal the stage produced. Pure: parsing, choosing an operating point, reading a stage's signals, deciding to stop.

A policy file (written by `ttc-proxy tune`, named in config under `strategies.policies`) holds several operating
points, one per token budget it was fitted for, and which one is the default. A request picks the point whose
budget fits (`auto:budget=N`, or a `ttc.budget.max_total_tokens` below the default point's).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .framework import StrategyResult, StrategySpec
from .stages import STAGE_STRATEGIES

Signal = Literal["logprob", "agreement", "confidence", "verifier"]
SIGNALS: tuple[str, ...] = ("logprob", "agreement", "confidence", "verifier")


class SpecModel(BaseModel):
    """A strategy with its parameters and the strategy it runs over, as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = Field(pattern=r"^[a-z0-9_]+$")
    params: dict[str, Any] = Field(default_factory=dict)
    over: SpecModel | None = None

    @model_validator(mode="after")
    def _not_auto(self) -> "SpecModel":
        if self.strategy == "auto":
            raise ValueError("a stage of auto cannot be auto")
        strategy = STAGE_STRATEGIES.get(self.strategy)  # a plugin's parameters are checked when it runs
        if strategy is not None:
            strategy.Params.model_validate(self.params)
            if self.over is not None and not strategy.composable:
                raise ValueError(f"strategy {self.strategy!r} cannot run over another strategy")
        return self

    def spec(self) -> StrategySpec:
        return StrategySpec(self.strategy, dict(self.params), self.over.spec() if self.over else None)

    @classmethod
    def of(cls, spec: StrategySpec) -> SpecModel:
        return cls(strategy=spec.slug, params=dict(spec.params), over=cls.of(spec.over) if spec.over else None)


class StopRule(BaseModel):
    """Stop after this stage when its `signal` is at least `threshold`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signal: Signal
    threshold: float

    def stops(self, signals: Mapping[str, float]) -> bool:
        value = signals.get(self.signal)
        return value is not None and value >= self.threshold


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the strategy part of a model string, e.g. "bon:n=4,select=confidence>cot"
    spec: SpecModel
    stop: StopRule | None = None  # None: never stop here (ignored on the last stage, which always answers)


class OperatingPoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: float = Field(gt=0)  # the mean tokens per request it was fitted to stay within
    stages: list[Stage] = Field(min_length=1, max_length=8)
    expected: dict[str, Any] = Field(default_factory=dict)  # what tune measured for it, cross-validated


class CascadePolicy(BaseModel):
    """What `ttc-proxy tune` writes. Fields beyond the operating points describe the tuning (shown, not used)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str
    created: str | None = None
    points: list[OperatingPoint] = Field(min_length=1)
    default: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _default_exists(self) -> "CascadePolicy":
        if self.default >= len(self.points):
            raise ValueError(f"default operating point {self.default} does not exist ({len(self.points)} points)")
        return self

    def point_for(self, budget: float | None, ceiling: float | None = None) -> tuple[OperatingPoint, str]:
        """The operating point for a request, and why: the most generous whose budget is within `budget` (the
        request's own), else the default; either lowered to fit `ceiling` (what the run may still spend). When
        nothing fits, the cheapest."""
        ordered = sorted(self.points, key=lambda p: p.budget)
        if budget is not None:
            chosen, why = _within(ordered, budget), f"budget={budget:g}"
        else:
            chosen, why = self.points[self.default], "the policy's default"
        if ceiling is not None and chosen.budget > ceiling:
            chosen, why = _within(ordered, ceiling), f"the run's token budget ({ceiling:g} left)"
        return chosen, why


def _within(ordered: Sequence[OperatingPoint], budget: float) -> OperatingPoint:
    fitting = [p for p in ordered if p.budget <= budget]
    return fitting[-1] if fitting else ordered[0]


def stage_signals(result: StrategyResult) -> dict[str, float]:
    """The stop signals a stage's result exposes: `logprob` (exp of the mean log-probability of the answer's own
    tokens, when they carry logprobs), `agreement` (the share of the stage's counted samples giving the chosen
    answer, when it drew several), `confidence` (a best-of-n winner's token confidence), `verifier` (1 when some
    candidate passed the stage's check, else 0)."""
    signals: dict[str, float] = {}
    tokens = result.answer.answer_tokens if result.choices else None
    logprobs = [t.logprob for t in tokens or () if math.isfinite(t.logprob)]
    if logprobs:
        signals["logprob"] = math.exp(sum(logprobs) / len(logprobs))
    details = result.details
    candidates = details.get("candidates")
    if isinstance(candidates, list) and len(candidates) > 1:
        counted = [c for c in candidates if isinstance(c, dict) and c.get("counted", True)]
        if counted:
            signals["agreement"] = sum(1 for c in counted if c.get("answer") == details.get("answer")) / len(counted)
    winner = details.get("winner")
    confidence = winner.get("confidence") if isinstance(winner, dict) else None
    if isinstance(confidence, (int, float)) and math.isfinite(confidence):
        signals["confidence"] = float(confidence)
    verifier = details.get("verifier")
    if isinstance(verifier, dict) and "passed" in verifier:
        signals["verifier"] = 1.0 if verifier["passed"] and not verifier.get("fallback_over_all") else 0.0
    return signals


LOGPROB_BON = {"select": "confidence", "confidence": "logprob"}


def _cot_bon(n: int) -> SpecModel:
    return SpecModel(strategy="bon", params={"n": n, **LOGPROB_BON}, over=SpecModel(strategy="cot"))


# The cascade for a model without a policy file, from what `ttc-proxy tune` found for SmolLM2 on the dev set
# (docs/results/2026-12-07-auto.md): no cascade beat one `cot` call on held-out tasks there, so the default point is
# `cot` alone; `budget=` from 2,000 tokens gives best-of-8 `cot` runs picked by the answer's logprob.
@functools.cache  # built once, on first use
def default_policy() -> CascadePolicy:
    return CascadePolicy(
        model="(built-in default)",
        points=[
            OperatingPoint(budget=250, stages=[Stage(name="cot", spec=SpecModel(strategy="cot"))]),
            OperatingPoint(budget=2000, stages=[
                Stage(name="bon:n=8,select=confidence,confidence=logprob>cot", spec=_cot_bon(8)),
            ]),
        ],
        default=0,
        source="built-in default: no policy file is configured for this model (strategies.policies)",
    )
