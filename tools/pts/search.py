"""Pivotal-token search, the algorithm alone (the Phi-4 technical report, arXiv 2412.08905, section 4.3).

Everything here sees token ids and a success-probability function p(prefix), where `prefix` is a tuple of answer
token ids following the (fixed) prompt. Where p comes from (rollouts through an engine, or a formula in a test) is
the caller's business: `SuccessCache` wraps any estimator so that no prefix is estimated twice.

Subdivide(prefix, T): if |T| <= 1 or |p(prefix + T) - p(prefix)| < threshold, T is a leaf; else split T in halves
and subdivide (prefix, left) and (prefix + left, right). Walking the leaves in order, every one-token leaf whose
token moves p by at least the threshold is a pivotal token. As in the report, a segment whose changes cancel out
(p up at one token and down by as much at a later one) is not looked into.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

Ids = tuple[int, ...]
Probability = Callable[[Ids], Awaitable[float]]


@dataclass(frozen=True)
class Estimate:
    """p(success | prefix) as measured: `successes` of `samples` replies were right. `replies` are the whole replies
    (prefix text + continuation) with their grades, for the caller that needs answers to search."""

    successes: int
    samples: int
    replies: tuple[tuple[str, bool], ...] = ()

    @property
    def p(self) -> float:
        return self.successes / self.samples if self.samples else 0.0

    @classmethod
    def known(cls, success: bool) -> "Estimate":
        """A prefix whose outcome is certain (a whole reply: its own grade)."""
        return cls(int(success), 1)


Estimator = Callable[[Ids], Awaitable[Estimate]]


class SuccessCache:
    """p(success | prefix) per prefix, estimated once: concurrent askers of one prefix share its estimate."""

    def __init__(self, estimator: Estimator) -> None:
        self._estimator = estimator
        self._entries: dict[Ids, asyncio.Future[Estimate]] = {}
        self.estimated = 0  # calls made to the estimator

    def __contains__(self, prefix: Ids) -> bool:
        return prefix in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def know(self, prefix: Ids, estimate: Estimate) -> None:
        """Record an estimate made elsewhere (a whole reply's grade); a prefix already estimated keeps its own."""
        if prefix not in self._entries:
            future: asyncio.Future[Estimate] = asyncio.get_running_loop().create_future()
            future.set_result(estimate)
            self._entries[prefix] = future

    async def get(self, prefix: Sequence[int]) -> Estimate:
        key = tuple(prefix)
        future = self._entries.get(key)
        if future is None:
            future = self._entries[key] = asyncio.get_running_loop().create_future()
            self.estimated += 1
            try:
                future.set_result(await self._estimator(key))
            except asyncio.CancelledError:
                del self._entries[key]  # not estimated: a later ask tries again
                future.cancel()
                raise
            except Exception as exc:
                del self._entries[key]
                future.set_exception(exc)
                future.exception()  # retrieved here, so a failure nobody else awaited is not logged as lost
                raise
        return await asyncio.shield(future)

    async def p(self, prefix: Sequence[int]) -> float:
        return (await self.get(prefix)).p


@dataclass(frozen=True)
class Pivot:
    """A token that moves p(success) by at least the threshold: `prefix` (answer ids before it), its id, p before
    and after it."""

    prefix: Ids
    token_id: int
    prob_before: float
    prob_after: float

    @property
    def delta(self) -> float:
        return self.prob_after - self.prob_before

    @property
    def positive(self) -> bool:
        return self.delta > 0


async def subdivide(p: Probability, prefix: Ids, segment: Ids, threshold: float) -> list[Ids]:
    """The leaves of the recursive subdivision of `segment` after `prefix`, in order (they concatenate to it)."""
    if len(segment) <= 1:
        return [segment]
    before = await p(prefix)
    after = await p(prefix + segment)
    if abs(after - before) < threshold:
        return [segment]
    middle = len(segment) // 2
    left, right = segment[:middle], segment[middle:]
    return [*await subdivide(p, prefix, left, threshold), *await subdivide(p, prefix + left, right, threshold)]


async def find_pivots(p: Probability, answer: Sequence[int], threshold: float) -> list[Pivot]:
    """The pivotal tokens of one answer (ids after the prompt), in answer order."""
    if not 0 < threshold <= 1:
        raise ValueError("threshold must be in (0, 1]")
    pivots: list[Pivot] = []
    prefix: Ids = ()
    for leaf in await subdivide(p, (), tuple(answer), threshold):
        if len(leaf) == 1:
            before, after = await p(prefix), await p(prefix + leaf)
            if abs(after - before) >= threshold:
                pivots.append(Pivot(prefix, leaf[0], before, after))
        prefix += leaf
    return pivots


@dataclass(frozen=True)
class Counterpart:
    """The other side of a DPO pair at a pivot: a token measured to move p the other way."""

    token_id: int
    prob: float  # p(success | prefix + token)


async def find_counterpart(p: Probability, pivot: Pivot, candidates: Sequence[int],
                           threshold: float) -> Counterpart | None:
    """Among `candidates` (token ids, most likely first), the first whose p(success) after the pivot's prefix is at
    least `threshold` below p before it (for a positive pivot: the rejected token) or above it (for a negative one:
    the chosen token). The pivot's own token is not a candidate."""
    for token_id in candidates:
        if token_id == pivot.token_id:
            continue
        prob = await p(pivot.prefix + (token_id,))
        moved = pivot.prob_before - prob if pivot.positive else prob - pivot.prob_before
        if moved >= threshold:
            return Counterpart(token_id, prob)
    return None


def select_answers(replies: Sequence[tuple[str, bool]], limit: int) -> list[tuple[str, bool]]:
    """Up to `limit` distinct non-empty replies to search, right and wrong ones alternately (a right one first),
    each kind in sampling order."""
    seen: set[str] = set()
    right: list[tuple[str, bool]] = []
    wrong: list[tuple[str, bool]] = []
    for text, correct in replies:
        if text.strip() and text not in seen:
            seen.add(text)
            (right if correct else wrong).append((text, correct))
    chosen: list[tuple[str, bool]] = []
    while len(chosen) < limit and (right or wrong):
        for kind in (right, wrong):
            if kind and len(chosen) < limit:
                chosen.append(kind.pop(0))
    return chosen
