"""Entropy-based (entropix-style) sampling through any engine that streams top logprobs and continues token ids.

The reply is streamed at the base temperature with the engine's top alternatives at every position. Each
position's entropy and varentropy (strategies/uncertainty.py: from the listed alternatives, the unlisted tail
bounded) put it in one of entropix's regimes, on thresholds measured per model by `ttc-proxy calibrate`; each
regime has an action. `mapping=entropix` gives entropix's:

  flowing  low entropy, low varentropy     keep the token
  careful  high entropy, low varentropy    pause: the pause text (" Wait,") is put before the position and the
                                           model goes on from there (entropix inserts a "..." token)
  fork     low entropy, high varentropy    branch: the top alternatives are each finished (forced by token id)
                                           and the branch whose continuation scores best is kept
  misty    high entropy, high varentropy   resample: the position is drawn again, hotter
  middle   anything else                   adapt: drawn again at a temperature that grows with entropy +
                                           varentropy (entropix: T·(1 + 0.3·(H + V)))

The default, `mapping=branching`, keeps flowing positions and branches at the first other one (entropy-gated
branching, as in arXiv 2503.21961); how the two mappings compare is on the results pages (docs/results/). Each
regime's action can also be set on its own (`careful=pause`).

Drawing again uses the alternatives the engine listed (pre-sampling probabilities on llama.cpp), so it costs
nothing unless the draw differs from the streamed token: then the stream is cut at that token's offset and
continued from the new token's id. At most `max_interventions` cuts per reply; after that the stream runs on.
Kept text streams to the client as it arrives.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import Field, model_validator

from .framework import (
    Strategy,
    StrategyContext,
    StrategyParams,
    StrategyResult,
    Token,
)
from .guided import NEEDS, Branch, Decision, Fork, GuidedDecoder, Insert, Position, alternative_with_text, \
    sample_alternative, same_token, top_alternatives
from .scoring import make_scorer
from .uncertainty import DEFAULT_VOCAB_SIZE, Regime, Thresholds, Uncertainty, token_uncertainty

Action = Literal["keep", "pause", "branch", "resample", "adapt"]
Mapping = Literal["branching", "entropix"]
# entropix's own actions, and the default: branch at the first position that is not flowing (entropy-gated
# branching).
MAPPINGS: dict[Mapping, dict[Regime, Action]] = {
    "entropix": {"flowing": "keep", "careful": "pause", "fork": "branch", "misty": "resample", "middle": "adapt"},
    "branching": {"flowing": "keep", "careful": "branch", "fork": "branch", "misty": "branch", "middle": "branch"},
}
MAX_ADAPTIVE_TEMPERATURE = 2.0


class EntropyParams(StrategyParams):
    limits = {"branches": "samples", "max_interventions": "iterations"}

    low_entropy: float = Field(default=Thresholds().low_entropy, ge=0, description="entropy at or below this is low "
                                                                                   "(nats; calibrated per model)")
    high_entropy: float = Field(default=Thresholds().high_entropy, ge=0, description="entropy at or above this is "
                                                                                     "high (nats)")
    low_varentropy: float = Field(default=Thresholds().low_varentropy, ge=0, description="varentropy at or below "
                                                                                         "this is low (nats²)")
    high_varentropy: float = Field(default=Thresholds().high_varentropy, ge=0, description="varentropy at or above "
                                                                                           "this is high (nats²)")
    mapping: Mapping = Field(default="branching", description="the regimes' actions unless set one by one: "
                                                              "branching (branch wherever the model is not sure) "
                                                              "or entropix (pause, branch, resample, adapt). "
                                                              "Default: the best measured on the dev set, see "
                                                              "docs/results/2026-12-07-entropy-pts.md")
    flowing: Action | None = Field(default=None, description="action at low entropy, low varentropy")
    careful: Action | None = Field(default=None, description="action at high entropy, low varentropy")
    fork: Action | None = Field(default=None, description="action at low entropy, high varentropy")
    misty: Action | None = Field(default=None, description="action at high entropy, high varentropy")
    middle: Action | None = Field(default=None, description="action anywhere else")
    max_interventions: int = Field(default=3, ge=0, description="cuts per reply (pauses, branchings, redraws)")
    pause: str = Field(default=" Wait,", min_length=1, max_length=64, description="the pause text (stays in the "
                                                                                  "content)")
    max_pauses: int = Field(default=1, ge=0, description="pauses per reply")
    branches: int = Field(default=4, ge=2, le=20, description="alternatives finished at a fork, the streamed "
                                                              "token's included")
    branch_from: int = Field(default=0, ge=0, description="positions before this one are never branched (they "
                                                          "stream at once: the first content is not held back)")
    min_branch_probability: float = Field(default=0.05, ge=0, le=1, description="an alternative below this "
                                                                                "probability is not branched")
    score: Literal["logprob", "confidence"] = Field(default="logprob", description="how branches are compared "
                                                                                   "(shared scorers)")
    temperature: float | None = Field(default=None, ge=0, le=2, description="base temperature (default: the "
                                                                            "request's, else 0)")
    resample_temperature: float = Field(default=1.2, gt=0, le=MAX_ADAPTIVE_TEMPERATURE,
                                        description="temperature of a misty redraw")
    adapt_temperature: float = Field(default=0.5, gt=0, le=MAX_ADAPTIVE_TEMPERATURE,
                                     description="T in T·(1 + adapt_scale·(entropy + varentropy))")
    adapt_scale: float = Field(default=0.3, ge=0, description="how fast the adaptive temperature grows")
    top_logprobs: int = Field(default=20, ge=2, le=20, description="alternatives measured per position (the "
                                                                    "engine's maximum is used if lower)")
    vocab_size: int = Field(default=DEFAULT_VOCAB_SIZE, ge=2, description="for the entropy upper bound only")

    @model_validator(mode="after")
    def _thresholds(self) -> EntropyParams:
        self.thresholds()  # ordered
        return self

    def thresholds(self) -> Thresholds:
        return Thresholds(low_entropy=self.low_entropy, high_entropy=self.high_entropy,
                          low_varentropy=self.low_varentropy, high_varentropy=self.high_varentropy)

    def action(self, regime: Regime) -> Action:
        chosen = getattr(self, regime)
        return chosen if chosen is not None else MAPPINGS[self.mapping][regime]


class EntropySampling(Strategy[EntropyParams]):
    slug = "entropy"
    description = "entropy-based sampling: per-token entropy and varentropy decide where to branch (or, with " \
                  "mapping=entropix, to pause, branch or redraw)"
    requires = NEEDS
    structured_output = False

    @classmethod
    def fan_out(cls, params: EntropyParams) -> int:
        return params.branches

    async def run(self, ctx: StrategyContext, params: EntropyParams) -> StrategyResult:
        base = params.temperature if params.temperature is not None else (ctx.sampling.temperature or 0.0)
        decoder = GuidedDecoder(ctx, max_tokens=ctx.sampling.max_tokens, temperature=base,
                                top_logprobs=params.top_logprobs, max_interventions=params.max_interventions)
        policy = EntropyPolicy(ctx, params, base, random.Random(ctx.random_seed))
        answer = await decoder.run(policy)
        ctx.note("positions", decoder.positions)
        ctx.count("entropy_interventions", len(decoder.interventions))
        regimes: dict[str, int] = {}
        for position in decoder.positions:
            regimes[position["regime"]] = regimes.get(position["regime"], 0) + 1
        details: dict[str, Any] = {
            "thresholds": params.thresholds().model_dump(),
            "temperature": base,
            "regimes": regimes,
            "interventions": decoder.interventions,
            "pauses_inserted": [i["inserted"] for i in decoder.interventions if i["action"] == "pause"],
            "streams": decoder.streams,
        }
        return StrategyResult(choices=[answer], details=details, budget_exhausted=decoder.budget_exhausted)


class EntropyPolicy:
    """Measures each position and decides what its regime's action does there."""

    def __init__(self, ctx: StrategyContext, params: EntropyParams, base_temperature: float,
                 rng: random.Random) -> None:
        self.ctx = ctx
        self.params = params
        self.thresholds = params.thresholds()
        self.base = base_temperature
        self.rng = rng
        self.pauses = 0
        self.decoder: GuidedDecoder | None = None
        self.scorer = make_scorer(params.score, top_k=min(5, params.top_logprobs))

    def _measure(self, token: Token, index: int, offset: int, positions: list[dict[str, Any]],
                 action: str = "keep") -> tuple[Regime, Uncertainty] | None:
        measured = token_uncertainty(token, self.params.vocab_size)
        if measured is None:
            return None
        regime = self.thresholds.regime(measured)
        positions.append({"position": index, "offset": offset, "token": token.text, **measured.as_dict(),
                          "regime": regime, "action": action})
        return regime, measured

    async def __call__(self, position: Position, decoder: GuidedDecoder) -> Decision:
        self.decoder = decoder
        found = self._measure(position.token, position.index, len(position.text_before), decoder.positions)
        if found is None:
            return None
        regime, measured = found
        action = self.params.action(regime)
        record = decoder.positions[-1]
        if action == "keep" or not decoder.can_intervene:
            return None
        why = f"{regime} (entropy {measured.entropy:.2f}, varentropy {measured.varentropy:.2f})"
        decision = await self._decide(action, position, measured.entropy + measured.varentropy, why)
        if decision is not None:
            record["action"] = decision.action
            await self.ctx.progress(f"token {position.index} {position.token.text!r}: {why}: {decision.action}")
        return decision

    async def _decide(self, action: Action, position: Position, uncertainty: float, why: str) -> Decision:
        token = position.token
        if action == "pause":
            if self.pauses >= self.params.max_pauses or position.text_before.endswith(self.params.pause):
                return None
            self.pauses += 1
            ids = tuple(await self.ctx.tokenize(self.params.pause))
            return Insert(ids, self.params.pause, "pause", why)
        if action == "branch":
            if position.index < self.params.branch_from:
                return None
            alternatives = top_alternatives(token, self.params.branches, self.params.min_branch_probability)
            if len(alternatives) < 2:
                return None
            return Fork(alternatives, self._choose, f"branch ×{len(alternatives)}", why)
        temperature = self.params.resample_temperature if action == "resample" else \
            min(MAX_ADAPTIVE_TEMPERATURE, self.params.adapt_temperature * (1 + self.params.adapt_scale * uncertainty))
        drawn = sample_alternative(token, temperature, self.rng)
        if drawn is None or same_token(drawn, token):
            return None  # the redraw agrees with the stream: nothing to cut
        drawn = await alternative_with_text(self.ctx, drawn)
        ids = (drawn.id,) if drawn.id is not None else tuple(await self.ctx.tokenize(drawn.text))
        drawn_token = Token(drawn.text, drawn.logprob, drawn.id, drawn.bytes, top=token.top)
        return Insert(ids, drawn.text, f"{action} at T={temperature:.2f}", why,
                      tokens=(drawn_token,) if len(ids) == 1 else ())

    async def _choose(self, branches: list[Branch]) -> int:
        """The best-scoring branch; one cut off by max_tokens has not reached its answer, so it competes only when
        no branch finished (as in sc and bon)."""
        candidates = [b.as_candidate("") for b in branches]
        scores = [await self.scorer.score(c, candidates, ctx=self.ctx) for c in candidates]
        finished = [i for i, c in enumerate(candidates) if not c.truncated] or list(range(len(candidates)))
        best = max(finished, key=lambda i: scores[i])
        if self.decoder is not None:  # the kept branch's positions after the fork, measured (no more actions)
            fork = self.decoder.positions[-1]
            for i, token in enumerate(branches[best].tokens[1:], 1):
                self._measure(token, fork["position"] + i, fork["offset"] + token.offset, self.decoder.positions,
                              "in kept branch")
        await self.ctx.progress("branches: " + ", ".join(
            f"{b.alternative.text!r}…{b.text[len(b.alternative.text):][:24]!r} {s:.3f}"
            for b, s in zip(branches, scores)) + f"; kept {branches[best].alternative.text!r}")
        return best
