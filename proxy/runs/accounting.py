"""What a run spends, and the budgets that bound it.

A run has one budget scope; a nested run given a budget of its own (`run_strategy(..., budget=...)`) opens a child
scope. Spending is charged to a scope and all its ancestors; a call may start only if no scope in the chain is
spent. The scope whose limit stopped a call, and every scope between it and the caller, remember that they ran out
(so a run reports `budget_exhausted` exactly when its own budget, or one around it, stopped something).

Tokens are reserved before a call is sent: its prompt and its max_tokens, so calls running side by side cannot
together end above the token budget. A call that would not fit gets a max_tokens cut to what is left; one whose
prompt alone does not fit does not start. The reservation is released when the call ends and its real usage is
charged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ttc_proxy.strategies.framework import BudgetExceeded, BudgetView, Usage

from ..config import Budget


@dataclass
class BudgetScope:
    limits: Budget
    parent: BudgetScope | None = None
    usage: Usage = field(default_factory=Usage)
    started: float = field(default_factory=time.monotonic)
    exhausted: bool = False
    reason: str | None = None  # why it ran out (the limit that stopped a call here or in a scope inside it)
    reserved: int = 0  # tokens held by calls in flight (their prompt and max_tokens), not yet charged
    # A call was cut at this scope's deadline. The cut runs on the event loop's clock, which can run a few
    # milliseconds behind time.monotonic (uvloop caches it per iteration): a call that gets the slot the cut one
    # freed must not start because time.monotonic says there is time left.
    out_of_time: bool = False

    def chain(self) -> Iterator[BudgetScope]:
        scope: BudgetScope | None = self
        while scope is not None:
            yield scope
            scope = scope.parent

    @property
    def deadline(self) -> float:
        """The earliest wall-time limit in the chain (time.monotonic)."""
        return min(s.started + s.limits.max_seconds for s in self.chain())

    def child(self, asked: Mapping[str, float] | None) -> BudgetScope:
        """A scope for a nested run: its own limits, never above what is left here."""
        view = self.view()
        limits = Budget(
            max_total_tokens=max(1, min(int((asked or {}).get("max_total_tokens", view.tokens)), view.tokens)),
            max_calls=max(1, min(int((asked or {}).get("max_calls", view.calls)), view.calls)),
            max_seconds=max(0.001, min(float((asked or {}).get("max_seconds", view.seconds)), view.seconds)),
        )
        return BudgetScope(limits, parent=self)

    def view(self) -> BudgetView:
        now = time.monotonic()
        return BudgetView(
            tokens=min(s.limits.max_total_tokens - s.usage.total_tokens - s.reserved for s in self.chain()),
            calls=min(s.limits.max_calls - s.usage.calls for s in self.chain()),
            # once a call was cut at a deadline in the chain, no time is left whatever the clock says
            seconds=0.0 if any(s.out_of_time for s in self.chain()) else max(0.0, self.deadline - now),
        )

    def check(self) -> None:
        """Raise BudgetExceeded (marking the scopes that ran out) unless another call may start."""
        passed: list[BudgetScope] = []
        now = time.monotonic()
        for scope in self.chain():
            passed.append(scope)
            reason = scope._spent(now)
            if reason is not None:
                for stopped in passed:
                    stopped.exhausted = True
                    stopped.reason = stopped.reason or reason
                raise BudgetExceeded(reason)

    def reserve(self, prompt_tokens: int, max_tokens: int, n: int = 1) -> int:
        """Hold tokens for a call of n choices about to be sent: returns the max_tokens it may ask for (at most
        `max_tokens`, less if only that much is left), or raises BudgetExceeded if not one completion token fits.
        Pair with `release(prompt_tokens + n * granted)` when the call ends."""
        self.check()
        left = min(s.limits.max_total_tokens - s.usage.total_tokens - s.reserved for s in self.chain())
        granted = min(max_tokens, (left - prompt_tokens) // max(1, n))
        if granted < 1:
            tightest = min(self.chain(), key=lambda s: s.limits.max_total_tokens - s.usage.total_tokens - s.reserved)
            reason = (f"token budget of {tightest.limits.max_total_tokens} tokens cannot fit another call "
                      f"({max(0, left)} left, its prompt is ~{prompt_tokens})")
            for scope in self.chain():
                scope.exhausted = True
                scope.reason = scope.reason or reason
                if scope is tightest:
                    break
            raise BudgetExceeded(reason)
        for scope in self.chain():
            scope.reserved += prompt_tokens + n * granted
        return granted

    def release(self, tokens: int) -> None:
        for scope in self.chain():
            scope.reserved -= tokens

    def expire(self) -> BudgetExceeded:
        """The wall-time limit cut a call short: mark the scopes whose deadline passed."""
        tightest = self._tightest()
        tightest.out_of_time = True
        reason = f"wall-time budget of {tightest.limits.max_seconds:g} s is spent"
        self.exhausted = True
        self.reason = self.reason or reason
        now = time.monotonic()
        for scope in self.chain():
            if scope._spent(now) is not None:
                scope.exhausted = True
                scope.reason = scope.reason or reason
        return BudgetExceeded(reason)

    def _tightest(self) -> BudgetScope:
        """The scope in the chain whose wall-time limit comes first."""
        return min(self.chain(), key=lambda s: s.started + s.limits.max_seconds)

    def _spent(self, now: float) -> str | None:
        if self.usage.calls >= self.limits.max_calls:
            return f"call budget of {self.limits.max_calls} backend calls is spent"
        if self.usage.total_tokens >= self.limits.max_total_tokens:
            return f"token budget of {self.limits.max_total_tokens} tokens is spent"
        if self.out_of_time or now >= self.started + self.limits.max_seconds:
            return f"wall-time budget of {self.limits.max_seconds:g} s is spent"
        return None

    def usage_attrs(self) -> dict[str, int]:
        """This scope's spending, as trace attributes."""
        return {"calls": self.usage.calls, "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
                "cached_prompt_tokens": self.usage.cached_prompt_tokens}

    def charge(self, *, calls: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0,
               estimated: bool = False, cached_prompt_tokens: int = 0) -> None:
        for scope in self.chain():
            scope.usage.calls += calls
            scope.usage.prompt_tokens += prompt_tokens
            scope.usage.cached_prompt_tokens += cached_prompt_tokens
            scope.usage.completion_tokens += completion_tokens
            scope.usage.estimated |= estimated
