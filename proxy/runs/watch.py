"""Saying so while a run waits: a progress line when its backend calls have waited unusually long (with the
backend's state), so a stalled engine is not a silent stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..backends import Backend


@dataclass
class CallInFlight:
    """A backend call of a run, from when it asked for its scheduler slot until it ended."""

    backend: Backend
    label: str
    since: float  # time.monotonic() it was asked for, or a stream last delivered


def waiting_line(calls: list[tuple[CallInFlight, str]], waited: float) -> str:
    """One line for the calls to one backend that have waited at least `waited` seconds: how many, what for,
    queued or sent, and the backend's state."""
    backend = calls[0][0].backend
    labels = ", ".join(dict.fromkeys(call.label for call, _ in calls))
    queued = sum(1 for _, status in calls if status == "queued")
    where = (f"{queued} queued for a slot, {len(calls) - queued} sent" if queued and queued < len(calls)
             else "queued for a slot" if queued else "sent, no reply yet")
    count = "1 call" if len(calls) == 1 else f"{len(calls)} calls"
    return f"waiting: {count} ({labels}; {where}) for {waited:g} s or more; {backend.describe_state()}"


async def report_slow_calls(calls: dict[int, CallInFlight], status: Callable[[int], str], threshold: float,
                            say: Callable[[str], Awaitable[None]]) -> None:
    """Until cancelled: when calls (trace node -> call) have waited `threshold` seconds, one line per backend, and
    again each time their wait doubles. `status(node)`: the call's trace status (queued, running). Calls of a
    backend that reach a mark within one check of each other (sent together) are said together."""
    reported: dict[int, float] = {}  # call node -> the wait it was last reported at
    tick = min(1.0, threshold / 4)
    while True:
        await asyncio.sleep(tick)
        now = time.monotonic()
        crossed = {call.backend.name for node, call in calls.items()
                   if now - call.since >= reported.get(node, threshold / 2) * 2}
        due: dict[str, list[tuple[CallInFlight, str]]] = {}
        marks: dict[str, float] = {}
        for node, call in list(calls.items()):
            mark = reported.get(node, threshold / 2) * 2
            if call.backend.name in crossed and now - call.since >= mark - tick:
                reported[node] = mark
                due.setdefault(call.backend.name, []).append((call, status(node)))
                marks[call.backend.name] = min(marks.get(call.backend.name, mark), mark)
        for name, waiting in due.items():
            await say(waiting_line(waiting, marks[name]))
        for node in [n for n in reported if n not in calls]:
            del reported[node]
