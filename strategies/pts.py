"""Pivotal-token search while generating, and decoding guided by stored pivotal tokens.

Online search (`pts`): the reply is streamed with its top alternatives. Where the model is unsure (the most
likely token's probability is below `threshold`), the top alternatives are each tried: `rollouts` short
continuations from the exact token-id prefix ending in that alternative. Every rollout's answer is read, and an
alternative scores the share of its rollouts that agree with the majority answer of all of them (or, with
`verifier=NAME`, that pass the configured verifier). The best alternative is kept (the streamed token on a tie,
without a cut) and the stream goes on from it; at most `max_searches` positions per reply.

Pivot-guided decoding (`pts:pivots=NAME`): a pivotal-token dataset found offline (`ttc-proxy pts`, configured
under `pivots:`) is applied as the reply is generated. A stored `pivot_context` is the whole text before the
pivot token, rendered prompt included (codelion/pts's meaning); where the rendered prompt plus the reply so far
ends with a stored context's last `match_chars` characters, the pivots there are summed per token (their
p(success) changes), and the next token is drawn with `logit_bias` toward the tokens that raised p(success) and
away from those that lowered it; the stream goes on from that token. It needs no calls where no pivot matches or
the streamed token already agrees with the pivots. A short `match_chars` makes pivots general (at 16, every
pivot found at the start of a reply applies at the start of every reply); a long one keeps them to contexts
like the one they were found in.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from .answers import extract_answer
from .framework import (
    DEFAULT_SAMPLING_TEMPERATURE,
    CallOptions,
    Candidate,
    Strategy,
    StrategyContext,
    StrategyInputError,
    StrategyParams,
    StrategyResult,
    TokenAlternative,
    gather_successes,
    message_text,
)
from .guided import NEEDS, Decision, GuidedDecoder, Insert, Position, alternative_ids, alternative_with_text, \
    same_token, top_alternatives


class PtsParams(StrategyParams):
    limits = {"alternatives": "samples", "rollouts": "samples", "max_searches": "iterations"}

    search: bool = Field(default=True, description="search low-confidence positions with rollouts")
    threshold: float = Field(default=0.5, gt=0, le=1, description="search where the top token's probability is "
                                                                  "below this")
    alternatives: int = Field(default=2, ge=2, le=20, description="alternatives tried per searched position, the "
                                                                  "streamed token's included")
    min_alternative_probability: float = Field(default=0.05, ge=0, le=1, description="less likely alternatives "
                                                                                      "are not tried")
    rollouts: int = Field(default=3, ge=1, description="continuations per alternative")
    rollout_tokens: int = Field(default=24, ge=1, description="max tokens per rollout")
    rollout_temperature: float | None = Field(default=None, gt=0, le=2, description="rollout temperature "
                                                                                   "(default 0.8)")
    max_searches: int = Field(default=1, ge=0, description="searched positions per reply")
    verifier: str | None = Field(default=None, description="score rollouts with this configured HTTP verifier "
                                                          "instead of agreement")
    pivots: str | None = Field(default=None, description="a configured pivotal-token set to apply while decoding")
    match_chars: int = Field(default=16, ge=1, le=512, description="how much of a pivot's context must match")
    min_delta: float = Field(default=0.2, ge=0, le=1, description="pivots that moved p(success) less are ignored")
    bias: float = Field(default=10.0, gt=0, le=100, description="logit_bias toward a positive pivot token (and "
                                                                "minus it away from a negative one)")
    max_pivot_applications: int = Field(default=4, ge=0, description="pivot-biased draws per reply")
    temperature: float | None = Field(default=None, ge=0, le=2, description="base temperature (default: the "
                                                                            "request's, else 0)")
    top_logprobs: int = Field(default=20, ge=2, le=20, description="alternatives listed per position")


@dataclass(frozen=True)
class StoredPivot:
    context: str  # the end of the text before the pivot token that must match
    token: str
    token_id: int | None
    delta: float


class PivotIndex:
    """Stored pivots by the end of their context, for matching the text before each position."""

    def __init__(self, records: Sequence[Mapping[str, Any]], match_chars: int, min_delta: float) -> None:
        self.match_chars = match_chars
        self.by_suffix: dict[str, list[StoredPivot]] = {}
        for record in records:
            delta = float(record.get("prob_delta") or 0.0)
            if abs(delta) < min_delta:
                continue
            context = str(record.get("pivot_context") or "")[-match_chars:]
            token_id = record.get("pivot_token_id")
            pivot = StoredPivot(context, str(record["pivot_token"]), token_id if isinstance(token_id, int) else None,
                                delta)
            self.by_suffix.setdefault(context, []).append(pivot)
        self.lengths = sorted({len(c) for c in self.by_suffix}, reverse=True)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_suffix.values())

    def matching(self, text_before: str) -> list[StoredPivot]:
        """The pivots whose context ends `text_before` (longest contexts first; an empty context never matches)."""
        for length in self.lengths:
            if 0 < length <= len(text_before):
                found = self.by_suffix.get(text_before[-length:])
                if found:
                    return found
        return []


class PivotalTokenSearch(Strategy[PtsParams]):
    slug = "pts"
    description = "pivotal-token search while generating (rollouts at unsure positions), or decoding guided by a " \
                  "stored pivotal-token set (pivots=NAME)"
    requires = NEEDS
    structured_output = False

    @classmethod
    def requirements(cls, params: PtsParams) -> Mapping[str, str]:
        needs = {capability: "" for capability in cls.requires}
        if params.pivots is not None:
            needs["logit_bias"] = "pivot-guided decoding biases the pivot token"
        return needs

    @classmethod
    def references(cls, params: PtsParams) -> Mapping[str, Sequence[str]]:
        named: dict[str, list[str]] = {}
        if params.verifier is not None:
            named["verifiers"] = [params.verifier]
        if params.pivots is not None:
            named["pivots"] = [params.pivots]
        return named

    @classmethod
    def fan_out(cls, params: PtsParams) -> int:
        return params.alternatives * params.rollouts if params.search else 1

    async def run(self, ctx: StrategyContext, params: PtsParams) -> StrategyResult:
        if not params.search and params.pivots is None:
            raise StrategyInputError("pts with search=false needs pivots=NAME: there is nothing else to do")
        base = params.temperature if params.temperature is not None else (ctx.sampling.temperature or 0.0)
        index = PivotIndex(ctx.pivots(params.pivots), params.match_chars, params.min_delta) \
            if params.pivots is not None else None
        policy = PtsPolicy(ctx, params, base, index)
        budget = (params.max_searches if params.search else 0) + \
            (params.max_pivot_applications if index is not None else 0)
        decoder = GuidedDecoder(ctx, max_tokens=ctx.sampling.max_tokens, temperature=base,
                                top_logprobs=params.top_logprobs, max_interventions=budget)
        answer = await decoder.run(policy)
        ctx.note("positions", decoder.positions)
        ctx.count("pts_interventions", len(decoder.interventions))
        details: dict[str, Any] = {
            "temperature": base,
            "searches": policy.searches,
            "pivots_applied": policy.applied,
            "interventions": decoder.interventions,
            "streams": decoder.streams,
        }
        if index is not None:
            details["pivot_set"] = {"name": params.pivots, "pivots": len(index)}
        return StrategyResult(choices=[answer], details=details, budget_exhausted=decoder.budget_exhausted)


class PtsPolicy:
    def __init__(self, ctx: StrategyContext, params: PtsParams, base_temperature: float,
                 index: PivotIndex | None) -> None:
        self.ctx = ctx
        self.params = params
        self.base = base_temperature
        self.index = index
        self.searches: list[dict[str, Any]] = []
        self.applied = 0
        self.prompt: str | None = None
        self.question = message_text(next((m for m in reversed(ctx.messages) if m.get("role") == "user"), {}))

    async def __call__(self, position: Position, decoder: GuidedDecoder) -> Decision:
        token = position.token
        top = max((math.exp(a.logprob) for a in token.top if math.isfinite(a.logprob)), default=None)
        record: dict[str, Any] = {"position": position.index, "offset": len(position.text_before),
                                  "token": token.text, "top_probability": None if top is None else round(top, 4),
                                  "action": "keep"}
        decoder.positions.append(record)
        if not decoder.can_intervene:
            return None
        if self.index is not None and self.applied < self.params.max_pivot_applications:
            decision = await self._pivot(position, decoder)
            if decision is not None:
                record["action"] = decision.action
                return decision
        if self.params.search and top is not None and top < self.params.threshold \
                and len(self.searches) < self.params.max_searches:
            decision = await self._search(position, decoder, top)
            if decision is not None:
                record["action"] = decision.action
            return decision
        return None

    async def _pivot(self, position: Position, decoder: GuidedDecoder) -> Decision:
        assert self.index is not None
        if self.prompt is None:  # stored contexts hold the rendered prompt before the reply: match like with like
            self.prompt = await self.ctx.render()
        matches = self.index.matching(self.prompt + position.text_before)
        if not matches:
            return None
        token = position.token
        net: dict[int, float] = {}  # token id -> summed p(success) change of the pivots naming it
        for pivot in matches:
            ids = (pivot.token_id,) if pivot.token_id is not None else tuple(await self.ctx.tokenize(pivot.token))
            if len(ids) == 1:
                net[ids[0]] = net.get(ids[0], 0.0) + pivot.delta
        positive = {i for i, d in net.items() if d > 0}
        negative = {i for i, d in net.items() if d < 0}
        streamed = token.id if token.id is not None else next(iter(await self.ctx.tokenize(token.text)), None)
        if streamed in positive or (not positive and streamed not in negative):
            return None  # the stream already agrees with what the pivots say
        bias = {str(i): (self.params.bias if i in positive else -self.params.bias) for i in positive | negative}
        if not bias:
            return None
        prefix = await decoder.prefix_ids()
        (drawn,) = await self.ctx.continue_prefix(
            prefix, CallOptions(max_tokens=1, temperature=self.base, logprobs=True,
                                top_logprobs=self.params.top_logprobs, extra={"logit_bias": bias}),
            label="pivot draw")
        self.applied += 1
        if not drawn.tokens or not drawn.text:
            return None
        new = drawn.tokens[0]
        if same_token(TokenAlternative(new.text, new.logprob, new.id), token):
            return None
        ids = (new.id,) if new.id is not None else tuple(await self.ctx.tokenize(new.text))
        why = f"pivot context …{matches[0].context[-24:]!r}: " + ", ".join(
            f"{p.token!r} {p.delta:+.2f}" for p in matches)
        await self.ctx.progress(f"token {position.index}: {why}: drew {new.text!r} instead of {token.text!r}")
        return Insert(ids, new.text, "pivot", why, tokens=(new,) if len(ids) == 1 else ())

    async def _search(self, position: Position, decoder: GuidedDecoder, top: float) -> Decision:
        token = position.token
        alternatives = top_alternatives(token, self.params.alternatives, self.params.min_alternative_probability)
        if len(alternatives) < 2:
            return None
        alternatives = tuple([await alternative_with_text(self.ctx, a) for a in alternatives])
        prefix = await decoder.prefix_ids()
        temperature = self.params.rollout_temperature or DEFAULT_SAMPLING_TEMPERATURE
        before = position.text_before

        async def rollouts(i: int, alternative: TokenAlternative) -> tuple[TokenAlternative, list[Candidate]]:
            forced = await alternative_ids(self.ctx, alternative)
            found = await self.ctx.continue_prefix(
                [*prefix, *forced], CallOptions(temperature=temperature, max_tokens=self.params.rollout_tokens),
                n=self.params.rollouts, index=i * self.params.rollouts, label=f"rollouts {alternative.text!r}")
            return alternative, [Candidate(before + alternative.text + c.text, c.finish_reason) for c in found]

        tried, errors = await gather_successes(
            (lambda i=i, a=a: rollouts(i, a) for i, a in enumerate(alternatives)), min_success=1, what="rollout")
        scores = await self._scores(tried)
        # ties go to the streamed token (no cut), then to the likelier alternative
        best = max(range(len(tried)), key=lambda i: (scores[i], same_token(tried[i][0], token), tried[i][0].logprob))
        chosen = tried[best][0]
        search = {"position": position.index, "top_probability": round(top, 4),
                  "alternatives": {a.text: round(s, 3) for (a, _), s in zip(tried, scores)},
                  "kept": chosen.text, "failed": len(errors)}
        self.searches.append(search)
        await self.ctx.progress(f"token {position.index} {token.text!r} (p {top:.2f}): "
                                + ", ".join(f"{a.text!r} {s:.2f}" for (a, _), s in zip(tried, scores))
                                + f"; keeping {chosen.text!r}")
        if same_token(chosen, token):
            return None  # the stream's own token won: no cut
        ids = await alternative_ids(self.ctx, chosen)
        return Insert(ids, chosen.text, "search", f"top probability {top:.2f} < {self.params.threshold}")

    async def _scores(self, tried: list[tuple[TokenAlternative, list[Candidate]]]) -> list[float]:
        """Each alternative's share of rollouts that agree with the majority answer (or pass the verifier)."""
        if self.params.verifier is not None:
            scores = []
            for _, candidates in tried:
                passed = [await self.ctx.verify(self.params.verifier, c.text, extract_answer(c.text))
                          for c in candidates]
                scores.append(sum(passed) / len(passed) if passed else 0.0)
            return scores
        answers = Counter(extract_answer(c.text) for _, candidates in tried for c in candidates
                          if not c.truncated) or Counter(extract_answer(c.text) for _, cs in tried for c in cs)
        majority = answers.most_common(1)[0][0] if answers else ""
        return [sum(extract_answer(c.text) == majority for c in cs) / len(cs) if cs else 0.0 for _, cs in tried]
