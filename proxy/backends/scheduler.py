"""A per-backend gate: a bound on calls in flight, a bounded queue, and round-robin fairness between owners.

An owner is one client request. A strategy that fans out 16 samples queues them under one owner, so a
pass-through request (its own owner) waits for at most one turn of each busy owner, not for all their calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..errors import Overloaded

log = logging.getLogger("ttc_proxy.replicas")


@dataclass(eq=False)
class _Waiter:
    cost: int
    granted: asyncio.Future[None]


class FairScheduler:
    def __init__(self, capacity: int, max_queue: int, retry_after_seconds: int = 1) -> None:
        self.capacity = capacity
        self.max_queue = max_queue
        self.retry_after_seconds = retry_after_seconds
        self.in_use = 0
        self._queued = 0
        self._waiting: OrderedDict[str, deque[_Waiter]] = OrderedDict()

    @property
    def queued(self) -> int:
        return self._queued

    @asynccontextmanager
    async def slot(self, owner: str, cost: int = 1) -> AsyncIterator[None]:
        """Hold `cost` units of capacity (a call drawing n samples costs n) while the body runs."""
        cost = max(1, min(cost, self.capacity))
        if not self._waiting and self.in_use + cost <= self.capacity:
            self.in_use += cost
        else:
            await self._wait_for_turn(owner, cost)
        try:
            yield
        finally:
            self.in_use -= cost
            self._dispatch()

    async def _wait_for_turn(self, owner: str, cost: int) -> None:
        if self._queued >= self.max_queue:
            raise Overloaded(
                f"the backend queue is full ({self._queued} calls waiting); retry shortly",
                headers={"Retry-After": str(self.retry_after_seconds)},
            )
        waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(owner, deque()).append(waiter)
        self._queued += 1
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                # Granted and cancelled in the same tick: give the capacity back.
                self.in_use -= cost
                self._dispatch()
            else:
                self._forget(owner, waiter)
                self._dispatch()  # it may have blocked the head of the line: whoever fits now goes
            raise

    def _forget(self, owner: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(owner)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._queued -= 1
            if not queue:
                del self._waiting[owner]

    def _dispatch(self) -> None:
        while self._waiting:
            owner, queue = next(iter(self._waiting.items()))
            waiter = queue[0]
            if waiter.granted.done():
                # Cancelled, and its task has not run yet to forget it: drop it here, grant nothing.
                queue.popleft()
                self._queued -= 1
                if not queue:
                    del self._waiting[owner]
                continue
            if self.in_use + waiter.cost > self.capacity:
                return
            queue.popleft()
            self._queued -= 1
            del self._waiting[owner]
            if queue:
                self._waiting[owner] = queue  # back of the line: round robin
            self.in_use += waiter.cost
            waiter.granted.set_result(None)


def share_bounds(backend: str, scheduler: FairScheduler, replicas: int) -> None:
    """This process's share of a backend's bounds when `replicas` processes use it: 1/replicas of the calls in
    flight (at least one) and of the queue, so together they keep the engine's limit."""
    if replicas <= 1:
        return
    total = scheduler.capacity
    scheduler.capacity = max(1, total // replicas)
    scheduler.max_queue = max(1, scheduler.max_queue // replicas) if scheduler.max_queue else 0
    if total < replicas:
        log.warning("backend %s takes %d calls at once, fewer than the %d proxy processes sharing it: each still "
                    "sends one, %d in all", backend, total, replicas, replicas)
    else:
        log.info("backend %s: this process takes %d of its %d calls in flight and %d queued (%d processes)",
                 backend, scheduler.capacity, total, scheduler.max_queue, replicas)
