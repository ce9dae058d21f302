"""A run's non-streamed calls: n samples of one request body split into engine calls (seeds, the engine's n cap),
each one budgeted, sent, accounted and traced."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from ttc_proxy.strategies.framework import BudgetExceeded, Candidate, gather_successes

from ..backends.quirks import adapt_call
from ..backends.stops import cut_stops_in_reply, stop_strings
from ..errors import BackendConnectFailed, BackendError, ProxyError, StrategyFailed
from .budgeted import BudgetedCall, cached_prompt_tokens, deadline, in_budget
from .sampling import completion_counts, make_candidate, parse_choices, sample_seed
from .state import TRACE_TEXT_LIMIT, RunState, Scope, ms_since, prompt_key
from .watch import CallInFlight


@dataclass(frozen=True)
class CallPlan:
    """What every engine call of one `sample` shares: the endpoint and body, the trace label, whether candidates
    keep their tokens, and the prefix the engine echoes at the start of each reply (cut off)."""

    path: str
    body: dict[str, Any]
    label: str
    keep_tokens: bool
    echoed: str = ""


async def sample(state: RunState, scope: Scope, plan: CallPlan, n: int, seed: int | None, index: int,
                 min_success: int) -> list[Candidate]:
    """n samples of one body: seeded ones each their own call (sample index + i gets the request seed plus that at
    the top, a seed derived from the span path below it; an explicit seed is used as seed + i); unseeded ones in as
    few calls as the engine's n cap allows."""
    if n < 1:
        return []
    if seed is not None or scope.sampling.seed is not None:
        seeds = ([seed + i for i in range(n)] if seed is not None
                 else [sample_seed(scope.sampling.seed, scope.path, index + i) for i in range(n)])
        calls = [(lambda s=s: call(state, scope, plan, 1, s)) for s in seeds]
        sizes = [1] * n
    else:
        cap = max(1, scope.backend.capabilities.max_n)
        sizes = [min(cap, n - start) for start in range(0, n, cap)]
        if len(sizes) > 1:
            state.adaptations.add(f"samples drawn by concurrent calls of at most {cap}: backend "
                                  f"{scope.backend.name} takes n <= {cap}")
        calls = [(lambda size=size: _unseeded(state, scope, plan, size)) for size in sizes]
    parts, errors = await gather_successes(calls, min_success=max(1, min_success), what=plan.label, sizes=sizes)
    candidates = [c for part in parts for c in part]
    if len(candidates) < min_success:  # a call gave fewer choices than it asked for
        raise StrategyFailed(f"only {len(candidates)} of {n} {plan.label}s came back; at least {min_success} needed")
    if errors:
        state.note(scope.node, f"{plan.label}_failures", [str(e) for e in errors])
    return candidates


async def _unseeded(state: RunState, scope: Scope, plan: CallPlan, n: int) -> list[Candidate]:
    """n unseeded samples in one call; if the backend refuses that n (a 400 that lowered the remembered cap, see
    Backend.lower_n_cap), draw them again in calls within the new cap."""
    try:
        return await call(state, scope, plan, n, None)
    except ProxyError as exc:
        cap = max(1, scope.backend.capabilities.max_n)
        if exc.status_code != 400 or n <= cap:
            raise
    parts, _ = await gather_successes(
        (lambda size=min(cap, n - start): _unseeded(state, scope, plan, size) for start in range(0, n, cap)),
        min_success=1, what=plan.label)
    return [c for part in parts for c in part]


async def call(state: RunState, scope: Scope, plan: CallPlan, n: int, seed: int | None) -> list[Candidate]:
    """One backend request drawing n choices; budgeted, accounted and traced."""
    budget = scope.budget
    budget.check()
    backend = scope.backend
    body = dict(plan.body)
    if n > 1:
        body["n"] = n
    if seed is not None:
        body["seed"] = seed
    adapt_call(backend.capabilities, body, n)
    node = state.trace.add(scope.node, plan.label, "call", endpoint=plan.path, n=n, seed=seed,
                           temperature=body.get("temperature"), max_tokens=body.get("max_tokens"), status="queued")
    started = time.monotonic()
    budgeted = BudgetedCall(state, budget, body, n, node)
    state.calls_in_flight[node] = CallInFlight(backend, plan.label, started)
    try:
        try:
            async with asyncio.timeout_at(deadline(budget)):
                payload = await backend.call_json(plan.path, body, owner=state.owner, cost=n,
                                                  request_id=state.request_id, on_start=budgeted.on_start)
        except TimeoutError as exc:
            _charge_unanswered(state, budgeted, node)
            state.trace.update(node, status="timeout", ms=ms_since(started))
            raise budget.expire() from exc
        except BudgetExceeded as exc:
            state.trace.update(node, status="refused", reason=str(exc))
            raise
        except ProxyError as exc:
            # an engine's error status says what it did not do; a connection never made sent nothing
            if not isinstance(exc, (BackendError, BackendConnectFailed)):
                _charge_unanswered(state, budgeted, node)
            state.trace.update(node, status="error", error=exc.message, ms=ms_since(started))
            raise
        except asyncio.CancelledError:
            _charge_unanswered(state, budgeted, node)
            state.trace.update(node, status="cancelled", ms=ms_since(started))
            raise
        return await _account(state, scope, plan, payload, body, budgeted, seed, node, started)
    finally:
        state.calls_in_flight.pop(node, None)
        budgeted.release()  # only once the real usage is charged: other calls always see one or the other


def _charge_unanswered(state: RunState, budgeted: BudgetedCall, node: int) -> None:
    if budgeted.started:
        state.trace.update(node, prompt_tokens=budgeted.charge_unanswered())


async def _account(state: RunState, scope: Scope, plan: CallPlan, payload: dict[str, Any], body: dict[str, Any],
                   budgeted: BudgetedCall, seed: int | None, node: int, started: float) -> list[Candidate]:
    """A finished call's choices as candidates, its usage charged and traced."""
    backend = scope.backend
    capabilities = backend.capabilities
    if capabilities.stop_kept and cut_stops_in_reply(payload, stop_strings(body)):
        state.adaptations.add(f"stop strings cut by the proxy: backend {backend.name} leaves them in")
    parsed = parse_choices(payload, plan.path == "/chat/completions")
    if not parsed:
        state.trace.update(node, status="error", error="no choices")
        raise StrategyFailed(f"backend {backend.name} answered without choices")
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    state.learn_prompt(prompt_key(body), prompt_tokens)
    reported = int(usage.get("completion_tokens") or 0)
    counts = completion_counts(parsed, reported, capabilities.usage_counts_one_choice)
    estimated = counts is None
    if counts is None:
        counts = []
        for choice in parsed:
            try:
                counts.append(len(await in_budget(scope.budget, backend.tokenize(scope.model, choice.text))))
            except ProxyError:
                counts.append(max(1, len(choice.text) // 4))
    candidates = [
        make_candidate(choice, count, seed, plan.label, capabilities.merges_split_characters, plan.keep_tokens,
                       plan.echoed, prompt_tokens)
        for choice, count in zip(parsed, counts)
    ]
    budgeted.settle(prompt_tokens, sum(counts), estimated=estimated, cached_prompt_tokens=cached_prompt_tokens(usage))
    state.trace.update(node, status="ok", ms=ms_since(started), prompt_tokens=prompt_tokens,
                       completion_tokens=sum(counts), outputs=[c.text[:TRACE_TEXT_LIMIT] for c in candidates])
    return candidates
