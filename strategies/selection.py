"""Choosing one candidate out of a pool: pure functions, no model calls, no HTTP.

`bon`, `sc` and `deepconf` use them on the candidates they drew; an offline evaluator can build one `Pool` from
stored samples and score every selector on it (`select(pool, "vote")`, `select(pool, "weighted")`, ...), or
rebuild the pool with other confidence settings (`Pool.of(candidates, ConfidenceSpec("tail", 32))`) without
drawing again. Scores themselves come from strategies.scoring.

The model-dependent selectors are split the same way: the judge's answer scores come from
`scoring.judge_probability` (pure, over the first token's logprobs) and `select_by_answer_scores`; the pairwise
`tournament` takes the comparison as a callable, so stored comparisons can be replayed.

Ties are always between *answers*: several candidates with the same best score but one answer are no tie. A tie
goes to the fallback selector, run over the tied answers' candidates only; a fallback's own ties (or no fallback)
go to the answer that appears first.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .answers import candidate_answer
from .framework import Candidate, gather_all
from .scoring import ConfidenceSpec

POOL_SELECTORS: tuple[str, ...] = ("vote", "confidence", "weighted", "first")
CONFIDENCE_SELECTORS = frozenset({"confidence", "weighted"})  # these need token logprobs


# ---------------------------------------------------------------- the pool


@dataclass(frozen=True)
class Pool:
    """What selection needs of the candidates: each one's extracted answer and confidence (None: unknown), and
    whether it finished.

    A reply cut off by max_tokens has no final answer yet: the last number of an unfinished sentence is most often
    an operand still being worked on. So unfinished candidates take part only when no candidate finished.
    """

    answers: tuple[str, ...]
    confidences: tuple[float | None, ...] = ()
    finished: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if not self.confidences:
            object.__setattr__(self, "confidences", (None,) * len(self.answers))
        if not self.finished:
            object.__setattr__(self, "finished", (True,) * len(self.answers))
        if len(self.confidences) != len(self.answers) or len(self.finished) != len(self.answers):
            raise ValueError("a pool needs one confidence (or None) and one finished flag per answer")

    @classmethod
    def of(cls, candidates: Sequence[Candidate], spec: ConfidenceSpec | None = ConfidenceSpec(),
           answer: Callable[[Candidate], str] = candidate_answer, count_truncated: bool = False) -> "Pool":
        """`answer`: what a candidate votes with (its extracted answer, or its tool calls); `count_truncated`:
        treat replies cut off by max_tokens like finished ones."""
        return cls(
            tuple(answer(c) for c in candidates),
            tuple(spec.score(c.answer_tokens) if spec is not None else None for c in candidates),
            tuple(count_truncated or not c.truncated for c in candidates),
        )

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def has_confidence(self) -> bool:
        return any(c is not None for c in self.confidences)

    def counted(self, among: Sequence[int] | None = None) -> list[int]:
        """The candidates that take part: the finished ones among `among`, or all of them when none finished."""
        return _indices(self, among)

    def distinct_answers(self, among: Sequence[int] | None = None) -> list[str]:
        """Distinct answers in order of first appearance."""
        return list(dict.fromkeys(self.answers[i] for i in _indices(self, among)))


@dataclass(frozen=True)
class Selection:
    index: int  # the winning candidate, by position in the pool
    answer: str
    selector: str  # the selector asked for
    scores: dict[str, float] = field(default_factory=dict)  # its score per answer, best first
    tied: tuple[str, ...] = ()  # answers tied at the top under `selector`; empty when there was no tie
    broken_by: str | None = None  # the selector that broke the tie


def _indices(pool: Pool, among: Sequence[int] | None) -> list[int]:
    indices = list(range(len(pool))) if among is None else list(among)
    if not indices:
        raise ValueError("cannot select from no candidates")
    return [i for i in indices if pool.finished[i]] or indices


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def representative(pool: Pool, answer: str, among: Sequence[int] | None = None) -> int:
    """The candidate to return for an answer: its most confident sample, else its first."""
    holders = [i for i in _indices(pool, among) if pool.answers[i] == answer]
    if not holders:
        raise ValueError(f"no candidate has answer {answer!r}")
    scored = [i for i in holders if pool.confidences[i] is not None]
    if not scored:
        return holders[0]
    return max(scored, key=lambda i: (pool.confidences[i], -i))  # type: ignore[operator]


def _ranked(scores: Mapping[str, float]) -> dict[str, float]:
    order = {a: i for i, a in enumerate(scores)}
    return dict(sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]])))


def answer_scores(pool: Pool, selector: str, among: Sequence[int] | None = None) -> dict[str, float]:
    """Each answer's score under a pool selector, best first (ties: first appearance).

    vote: number of candidates. weighted: summed confidence. confidence: its best candidate's confidence.
    first: 1 for the first answer, 0 for the others.
    """
    indices = _indices(pool, among)
    scores: dict[str, float] = {}
    if selector == "vote":
        for i in indices:
            scores[pool.answers[i]] = scores.get(pool.answers[i], 0.0) + 1.0
    elif selector == "weighted":
        for i in indices:
            scores[pool.answers[i]] = scores.get(pool.answers[i], 0.0) + (pool.confidences[i] or 0.0)
    elif selector == "confidence":
        for i in indices:
            value = pool.confidences[i]
            value = -math.inf if value is None else value
            scores[pool.answers[i]] = max(scores.get(pool.answers[i], -math.inf), value)
    elif selector == "first":
        for i in indices:
            scores.setdefault(pool.answers[i], 1.0 if not scores else 0.0)
    else:
        raise ValueError(f"unknown selector {selector!r}; valid: {', '.join(POOL_SELECTORS)}")
    return _ranked(scores)


def select_by_answer_scores(pool: Pool, scores: Mapping[str, float], selector: str, *,
                            among: Sequence[int] | None = None, fallback: str | None = None) -> Selection:
    """The answer with the highest score wins (answers missing from `scores` never do); a tie at the top goes
    to `fallback` over the tied answers' candidates."""
    indices = [i for i in _indices(pool, among) if pool.answers[i] in scores]
    if not indices:
        raise ValueError("no candidate has a scored answer")
    ranked = _ranked({a: scores[a] for a in pool.distinct_answers(indices)})
    best = next(iter(ranked.values()))
    leaders = tuple(a for a, s in ranked.items() if _close(s, best))
    if len(leaders) == 1:
        return Selection(representative(pool, leaders[0], indices), leaders[0], selector, ranked)
    tied_indices = [i for i in indices if pool.answers[i] in leaders]
    breaker = _usable(pool, fallback if fallback is not None and fallback != selector else "first", tied_indices)
    decided = select(pool, breaker, among=tied_indices)
    return Selection(decided.index, decided.answer, selector, ranked, leaders, breaker)


def _usable(pool: Pool, selector: str, among: Sequence[int]) -> str:
    """A tie-breaker that needs confidences becomes a vote where the candidates have none."""
    if selector in CONFIDENCE_SELECTORS and all(pool.confidences[i] is None for i in among):
        return "vote"
    return selector


def select(pool: Pool, selector: str, *, among: Sequence[int] | None = None,
           fallback: str | None = None) -> Selection:
    """Pick with a pool selector: vote | confidence | weighted | first (see `answer_scores`).

    confidence and weighted need confidences: raise ValueError when no candidate has one.
    """
    if selector in CONFIDENCE_SELECTORS and not any(pool.confidences[i] is not None for i in _indices(pool, among)):
        raise ValueError(f"selector {selector!r} needs token confidences, and no candidate has them")
    return select_by_answer_scores(pool, answer_scores(pool, selector, among), selector, among=among,
                                   fallback=fallback)


def select_verified(pool: Pool, passed: Sequence[bool], fallback: str) -> tuple[Selection, bool]:
    """Keep the candidates that pass a check; `fallback` picks among them (over all when none passes).

    Returns the selection and whether it had to fall back over all candidates.
    """
    if len(passed) != len(pool):
        raise ValueError("one check result per candidate")
    kept = [i for i, ok in enumerate(passed) if ok]
    if not kept:
        fallback = _usable(pool, fallback, range(len(pool)))
        return replace(select(pool, fallback), selector="verifier", broken_by=fallback), True
    kept = _indices(pool, kept)
    counts: dict[str, float] = {}
    for i in kept:
        counts[pool.answers[i]] = counts.get(pool.answers[i], 0.0) + 1.0
    if len(counts) == 1:  # one answer passes: no choice to make
        (answer,) = counts
        return Selection(representative(pool, answer, kept), answer, "verifier", counts), False
    fallback = _usable(pool, fallback, kept)
    decided = select(pool, fallback, among=kept)
    return Selection(decided.index, decided.answer, "verifier", _ranked(counts), tuple(counts), fallback), False


# ---------------------------------------------------------------- pairwise tournament


@dataclass(frozen=True)
class Match:
    round: int
    first: str
    second: str
    p_first: float  # P(first is the better answer)
    winner: str


Compare = Callable[[str, str], Awaitable[float]]


async def tournament(entrants: Sequence[str], compare: Compare) -> tuple[str, list[Match]]:
    """A knockout over `entrants`, given best seed first: each round pairs the best remaining seed with the
    worst (the best gets a bye when the count is odd) and runs its matches concurrently. `compare(a, b)`
    returns P(a is better); at exactly 0.5 the better seed advances."""
    if not entrants:
        raise ValueError("a tournament needs entrants")
    seed = {a: i for i, a in enumerate(entrants)}
    remaining = list(dict.fromkeys(entrants))
    matches: list[Match] = []
    round_number = 0
    while len(remaining) > 1:
        round_number += 1
        advancing = [remaining[0]] if len(remaining) % 2 else []
        field_ = remaining[len(advancing):]
        pairs = [(field_[i], field_[-1 - i]) for i in range(len(field_) // 2)]
        results = await gather_all(compare(a, b) for a, b in pairs)
        for (a, b), p in zip(pairs, results):
            winner = a if p >= 0.5 else b
            matches.append(Match(round_number, a, b, p, winner))
            advancing.append(winner)
        remaining = sorted(advancing, key=seed.__getitem__)
    return remaining[0], matches
