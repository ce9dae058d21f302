"""A budgeted call: how one call to an engine (or one sample served in its place) is admitted, reserved, charged
and accounted against the run's budget. RunContext's calls and the eval's pooled samples both go through it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from .accounting import BudgetScope
from .state import RunState

T = TypeVar("T")


class BudgetedCall:
    """One call's budget. `start` runs when the call gets its scheduler slot (the backend's `on_start`): the budget
    is checked again (calls that waited see what the calls before them spent), the call's worst case
    (prompt + n × max_tokens) is reserved, its max_tokens cut to what is left, and the call counted. `settle`
    charges what it really spent, `charge_unanswered` what a call cut short did, and `release` (always, once the
    real usage is charged) gives the reservation back: other calls see one or the other, never neither."""

    def __init__(self, state: RunState, budget: BudgetScope, body: dict[str, Any], n: int,
                 node: int | None = None) -> None:
        self._state, self._budget, self._body, self._n, self._node = state, budget, body, n, node
        self._reserved = 0
        self.started = False  # it got its slot and passed the budget: it is sent

    def start(self) -> int:
        """Admit the call; returns the max_tokens it may ask for (raises BudgetExceeded if none)."""
        prompt, _ = self._state.prompt_size(self._body)  # now: a call that ran meanwhile may have reported it
        asked = int(self._body["max_tokens"])
        granted = self._budget.reserve(prompt, asked, self._n)
        self._reserved = prompt + self._n * granted
        self._budget.charge(calls=1)
        self.started = True
        if granted < asked:
            self._body["max_tokens"] = granted
        if self._node is not None:
            self._state.trace.update(self._node, status="running",
                                     **({"max_tokens": granted} if granted < asked else {}))
        return granted

    def on_start(self) -> None:
        self.start()

    def settle(self, prompt_tokens: int, completion_tokens: int, *, estimated: bool = False,
               cached_prompt_tokens: int = 0) -> None:
        """Charge what the call spent."""
        self._budget.charge(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, estimated=estimated,
                            cached_prompt_tokens=cached_prompt_tokens)

    def charge_unanswered(self) -> int:
        """A call that was sent and ended with no usage report (cut by the deadline, cancelled, pruned, broken
        off): the engine read its prompt all the same, counted as that prompt's earlier report, else estimated.
        Returns the prompt tokens charged (0 for a call never sent)."""
        if not self.started:
            return 0
        prompt_tokens, estimated = self._state.prompt_size(self._body)
        self._budget.charge(prompt_tokens=prompt_tokens, estimated=estimated)
        return prompt_tokens

    def release(self) -> None:
        if self._reserved:
            self._budget.release(self._reserved)
            self._reserved = 0


def deadline(budget: BudgetScope) -> float:
    """The budget's wall-time deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (budget.deadline - time.monotonic())


async def in_budget(budget: BudgetScope, work: Awaitable[T]) -> T:
    """Engine work outside the scheduler (tokenizer, template, verifier, the echo probe) ends at the deadline too."""
    try:
        async with asyncio.timeout_at(deadline(budget)):
            return await work
    except TimeoutError as exc:
        raise budget.expire() from exc


def cached_prompt_tokens(usage: Mapping[str, Any]) -> int:
    """Prompt tokens the engine says it served from its prefix cache (OpenAI's usage.prompt_tokens_details,
    which llama-server and vLLM fill too); 0 when it does not say."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and cached > 0 else 0
