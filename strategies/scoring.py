"""Scoring a candidate: one module for every strategy (bon's selectors, mcts's node scores, ...).

Each scorer maps a candidate, seen among a pool of others, to a score in [0, 1]:

  logprob     exp(mean log-probability of the sampled tokens): how likely the model found its own answer, per token
  confidence  DeepConf's token confidence (C = -mean of the top-k logprobs at each token; a trace's mean, tail or
              lowest sliding-window mean), mapped into [0, 1] as C / (C + ln k): 1/2 when the top k alternatives
              are equally likely, towards 1 as the distribution peaks, monotone so rankings are kept
  agreement   the share of the other finished candidates in the pool whose extracted answer equals this one's
  judge       the model's P(yes) to "Is the proposed answer correct?" (one max_tokens=1 call per distinct answer)
  verifier    1 when the candidate passes a regex / JSON schema / HTTP verifier, else 0

`logprob`, `confidence` and `agreement` make no calls: their `score_now` is pure, so the eval can score them
offline. Token scores look at the answer's own tokens (Candidate.answer_tokens: the whole reply for a plain
sample, the output section for cot). A candidate without what a scorer needs (no logprobs) scores 0.5, "no
information".
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from .answers import extract_answer
from pydantic import Field, field_validator

from .formats import check_schema, run_checks
from .framework import CallOptions, Candidate, StrategyContext, StrategyParams, Token, gather_all, message_text

ConfidenceVariant = Literal["mean", "tail", "lowest_group", "logprob"]
UNINFORMED = 0.5
JUDGE_TOP_LOGPROBS = 20  # the context lowers it to the backend's maximum

POINTWISE_PROMPT = "Question: {question}\nProposed answer: {answer}\nIs the proposed answer correct? Answer yes or no."
PAIRWISE_PROMPT = ("Question: {question}\nAnswer A: {first}\nAnswer B: {second}\n"
                   "Which answer is correct, A or B? Answer A or B.")


# ---------------------------------------------------------------- token confidence (pure)


def token_confidence(token: Token, top_k: int) -> float | None:
    """C = -(mean log-probability of the token's top-k alternatives): high when the distribution is peaked.

    Needs k >= 2 to mean "confidence" (with k = 1 it is the top token's surprise). Without alternatives the
    sampled token stands in for them. Non-finite values (some engines send -inf) are skipped.
    """
    alternatives = [a.logprob for a in token.top[:top_k]] if token.top else [token.logprob]
    values = [lp for lp in alternatives if math.isfinite(lp)]
    if not values:
        return None
    return -sum(values) / len(values)


def token_confidences(tokens: Sequence[Token], top_k: int) -> list[float]:
    return [c for c in (token_confidence(t, top_k) for t in tokens) if c is not None]


def trace_confidence(confidences: Sequence[float], variant: ConfidenceVariant = "lowest_group",
                     window: int = 16) -> float | None:
    """A trace's score from its token confidences.

    mean: over all tokens. tail: over the last `window` tokens. lowest_group: the lowest mean of any `window`
    consecutive tokens (sliding). A trace shorter than the window is one group, so for short answers all three
    are the plain mean.
    """
    if not confidences:
        return None
    size = max(1, min(window, len(confidences)))
    if variant == "mean":
        return sum(confidences) / len(confidences)
    if variant == "tail":
        return sum(confidences[-size:]) / size
    if variant == "lowest_group":
        running = sum(confidences[:size])
        lowest = running
        for i in range(size, len(confidences)):
            running += confidences[i] - confidences[i - size]
            lowest = min(lowest, running)
        return lowest / size
    raise ValueError(f"unknown confidence variant {variant!r}")


def mean_token_probability(tokens: Sequence[Token]) -> float | None:
    """exp(mean log-probability of the sampled tokens): how likely the model found its own trace, per token."""
    values = [t.logprob for t in tokens if math.isfinite(t.logprob)]
    return math.exp(sum(values) / len(values)) if values else None


def confidence_to_unit(confidence: float, top_k: int) -> float:
    """DeepConf confidence into [0, 1]: C / (C + ln k)."""
    if confidence <= 0:
        return 0.0
    return confidence / (confidence + math.log(max(2, top_k)))


@dataclass(frozen=True)
class ConfidenceSpec:
    """How bon's confidence selectors score a trace (raw, not mapped into [0, 1]: selection only ranks)."""

    variant: ConfidenceVariant = "lowest_group"
    window: int = 16
    top_k: int = 5

    def score(self, tokens: Sequence[Token] | None) -> float | None:
        if not tokens:
            return None
        if self.variant == "logprob":
            return mean_token_probability(tokens)
        return trace_confidence(token_confidences(tokens, self.top_k), self.variant, self.window)

    def unit(self, score: float | None) -> float | None:
        """A score on the [0, 1] scale every progress line uses (mcts's node scores are on it too): logprob's
        already is; DeepConf's confidence is mapped by confidence_to_unit."""
        if score is None or self.variant == "logprob":
            return score
        return confidence_to_unit(score, self.top_k)


# ---------------------------------------------------------------- the judge (model calls)


def _label(token: str) -> str:
    return token.replace("Ġ", " ").replace("▁", " ").strip().strip("*_`\"'()[].,:;!").lower()


def judge_probability(first_token: Token | None, text: str, positive: str = "yes",
                      negative: str = "no") -> float | None:
    """P(positive) normalised over positive/negative from the first token's top logprobs, summing case and
    space variants (" Yes", "yes", "YES", ...). Without usable logprobs: 1 or 0 from the sampled text, and None
    when the text says neither."""
    if first_token is not None:
        mass = {positive: 0.0, negative: 0.0}
        seen: set[str] = set()
        for token, logprob in ((first_token.text, first_token.logprob), *((a.text, a.logprob) for a in first_token.top)):
            if token in seen or not math.isfinite(logprob):
                continue
            seen.add(token)
            label = _label(token)
            if label in mass:
                mass[label] += math.exp(logprob)
        total = mass[positive] + mass[negative]
        if total > 0:
            return mass[positive] / total
    words = _label(text.split()[0]) if text.split() else ""
    if words == positive:
        return 1.0
    if words == negative:
        return 0.0
    return None


def judge_messages(messages: Sequence[dict[str, Any]], prompt_for_question: Callable[[str], str]) -> list[dict[str, Any]]:
    """The conversation up to the last user turn, whose text becomes the question inside the judge prompt."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return [*messages, {"role": "user", "content": prompt_for_question("")}]
    question = message_text(messages[last_user])
    return [*messages[:last_user], {"role": "user", "content": prompt_for_question(question)}]


class Judge:
    """The model asked about answers: pointwise P(yes), or which of two answers is right."""

    def __init__(self, ctx: StrategyContext) -> None:
        self.ctx = ctx
        self.calls = 0
        self.logprobs = ctx.supports("logprobs")

    async def ask(self, prompt_for_question: Callable[[str], str], positive: str, negative: str) -> float | None:
        """P(positive) over positive/negative for one max_tokens=1, temperature-0 question."""
        self.calls += 1
        (candidate,) = await self.ctx.generate(
            CallOptions(temperature=0.0, max_tokens=1, logprobs=self.logprobs,
                        top_logprobs=JUDGE_TOP_LOGPROBS if self.logprobs else None, answers=False),
            messages=judge_messages(self.ctx.messages, prompt_for_question), label="judge",
        )
        first = candidate.tokens[0] if candidate.tokens else None
        return judge_probability(first, candidate.text, positive, negative)

    async def p_yes(self, answer: str) -> float | None:
        return await self.ask(lambda q: POINTWISE_PROMPT.format(question=q, answer=answer), "yes", "no")

    async def pointwise(self, answers: Sequence[str]) -> dict[str, float | None]:
        results = await gather_all(self.p_yes(a) for a in answers)
        return dict(zip(answers, results))

    async def compare(self, a: str, b: str, swap: bool) -> float:
        """P(a is the correct one), from A/B questions (averaged over both orders when `swap`)."""
        orders = [(a, b), (b, a)] if swap else [(a, b)]
        results = await gather_all(
            self.ask(lambda q, f=first, s=second: PAIRWISE_PROMPT.format(question=q, first=f, second=s), "a", "b")
            for first, second in orders
        )
        p_a = [p if first == a else 1.0 - p for (first, _), p in zip(orders, results) if p is not None]
        return sum(p_a) / len(p_a) if p_a else 0.5


# ---------------------------------------------------------------- scorers


class Scorer(Protocol):
    name: str

    async def score(self, candidate: Candidate, pool: Sequence[Candidate], *,
                    ctx: StrategyContext | None = None) -> float:
        """The candidate's score in [0, 1], seen among `pool` (which may include it)."""
        ...


class PureScorer:
    """A scorer that makes no calls: `score_now` is usable offline."""

    name = "pure"

    def score_now(self, candidate: Candidate, pool: Sequence[Candidate]) -> float:
        raise NotImplementedError

    async def score(self, candidate: Candidate, pool: Sequence[Candidate], *,
                    ctx: StrategyContext | None = None) -> float:
        return self.score_now(candidate, pool)


@dataclass(frozen=True)
class LogprobScorer(PureScorer):
    name = "logprob"

    def score_now(self, candidate: Candidate, pool: Sequence[Candidate]) -> float:
        value = mean_token_probability(candidate.answer_tokens or ())
        return UNINFORMED if value is None else value


@dataclass(frozen=True)
class ConfidenceScorer(PureScorer):
    variant: ConfidenceVariant = "lowest_group"
    window: int = 16
    top_k: int = 5
    name = "confidence"

    def score_now(self, candidate: Candidate, pool: Sequence[Candidate]) -> float:
        if self.variant == "logprob":
            return LogprobScorer().score_now(candidate, pool)
        value = ConfidenceSpec(self.variant, self.window, self.top_k).score(candidate.answer_tokens)
        return UNINFORMED if value is None else confidence_to_unit(value, self.top_k)


@dataclass(frozen=True)
class AgreementScorer(PureScorer):
    name = "agreement"

    def score_now(self, candidate: Candidate, pool: Sequence[Candidate]) -> float:
        others = [c for c in pool if c is not candidate]
        voters = [c for c in others if not c.truncated] or others
        if not voters:
            return UNINFORMED
        answer = extract_answer(candidate.text)
        return sum(extract_answer(c.text) == answer for c in voters) / len(voters)


@dataclass(frozen=True)
class JudgeScorer:
    """P(yes) from the model (or `judge_model`) for the candidate's extracted answer; needs ctx. One scorer serves
    one run: each distinct answer is asked once (the question is asked at temperature 0, so asking again would
    only spend the budget)."""

    judge_model: str | None = None
    name = "judge"
    answered: dict[str, float] = field(default_factory=dict, compare=False)
    asking: dict[str, asyncio.Lock] = field(default_factory=dict, compare=False)

    async def score(self, candidate: Candidate, pool: Sequence[Candidate], *,
                    ctx: StrategyContext | None = None) -> float:
        if ctx is None:
            raise ValueError("the judge scorer asks the model: it needs a context")
        answer = extract_answer(candidate.text)
        async with self.asking.setdefault(answer, asyncio.Lock()):  # the same answer's other nodes wait for it
            if answer not in self.answered:
                judge = Judge(ctx.for_model(self.judge_model) if self.judge_model else ctx)
                value = await judge.p_yes(answer)
                self.answered[answer] = UNINFORMED if value is None else value
            return self.answered[answer]


@dataclass(frozen=True)
class VerifierScorer:
    """1 when the candidate passes every configured check (regex, JSON schema, HTTP verifier), else 0."""

    regex: str | None = None
    json_schema: Any = None
    http_verifier: str | None = None
    name = "verifier"

    async def score(self, candidate: Candidate, pool: Sequence[Candidate], *,
                    ctx: StrategyContext | None = None) -> float:
        if not run_checks(candidate.text, self.regex, self.json_schema).passed:
            return 0.0
        if self.http_verifier is not None:
            if ctx is None:
                raise ValueError("an HTTP verifier is asked through the context")
            return 1.0 if await ctx.verify(self.http_verifier, candidate.text, extract_answer(candidate.text)) else 0.0
        return 1.0


class CheckParams(StrategyParams):
    """The checks a verifier (bon's selector, the scorer) applies; shared by the strategies that offer one."""

    regex: str | None = Field(default=None, description="verifier: a regex the candidate's text must match")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="verifier: a JSON schema (subset) the candidate's JSON must satisfy")
    http_verifier: str | None = Field(
        default=None, description="verifier: the name of an HTTP verifier in config.yaml's `verifiers`")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> Any:
        if isinstance(value, str):  # from a model-name prefix, or sent as a string
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
        if value is not None:
            check_schema(value)
        return value

    def has_check(self) -> bool:
        return self.regex is not None or self.json_schema is not None or bool(self.http_verifier)

    def references(self) -> dict[str, list[str]]:
        """The configured things these checks (and a judge model, where the params have one) name."""
        named: dict[str, list[str]] = {}
        if self.http_verifier:
            named["verifiers"] = [self.http_verifier]
        judge_model = getattr(self, "judge_model", None)
        if judge_model:
            named["models"] = [judge_model]
        return named


SCORER_NAMES: tuple[str, ...] = ("logprob", "confidence", "agreement", "judge", "verifier")


def make_scorer(name: str, **options: Any) -> Scorer:
    """A scorer by name, with its options (confidence: variant, window, top_k; judge: judge_model; verifier:
    regex, json_schema, http_verifier); options a scorer does not take are ignored."""
    def pick(*keys: str) -> dict[str, Any]:
        return {k: options[k] for k in keys if options.get(k) is not None}

    if name == "logprob":
        return LogprobScorer()
    if name == "confidence":
        return ConfidenceScorer(**pick("variant", "window", "top_k"))
    if name == "agreement":
        return AgreementScorer()
    if name == "judge":
        return JudgeScorer(**pick("judge_model"))
    if name == "verifier":
        return VerifierScorer(**pick("regex", "json_schema", "http_verifier"))
    raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(SCORER_NAMES)}")


def needs_logprobs(name: str) -> bool:
    return name in ("logprob", "confidence")

