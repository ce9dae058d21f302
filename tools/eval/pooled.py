"""Pooled evaluation: draw one pool of samples per task and prompt, then score every strategy on those same samples.

Each strategy runs unmodified on a PoolContext. A sample of the task's conversation (with any system prompt: so
`cot`'s samples pool too) at the pool's temperature and max_tokens comes from that prompt's pool, drawn once per
task and shared by every model string: a top-level context takes sample `index` (exactly what a live seeded
request would draw), a nested run the next sample no nested run has taken yet. Every other call (a judge's
questions, a revision prompt, a continuation) goes live to the engine through the proxy. Accuracy differences
between strategies are then paired on identical samples.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.backends import Backend
from proxy.config import BackendConfig, CapabilityOverrides, StrategySettings
from proxy.errors import ProxyError
from proxy.registry import load_registry
from proxy.routing import split_model_name
from proxy.runs.accounting import BudgetScope
from proxy.runs.context import RunContext, RunState, Scope
from proxy.runs.validation import check_budget, check_spec
from proxy.traces import Trace
from strategies.framework import (
    BudgetExceeded,
    Candidate,
    Sampling,
    Strategy,
    StrategyError,
    StrategySpec,
    StreamEvent,
)

POOL_TOP_LOGPROBS = 20


@dataclass
class SamplePool:
    """The samples drawn for one prompt of one task, in seed order, and one sample's prompt tokens."""

    candidates: list[Candidate]
    temperature: float
    prompt_tokens_per_sample: float


@dataclass
class TaskPools:
    """Every pool drawn for one task (by prompt), shared by the model strings scored on it."""

    seed: int
    size: int
    task_messages: list[dict[str, Any]]
    pools: dict[str, SamplePool | Exception] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    @property
    def main(self) -> SamplePool | None:
        pool = self.pools.get(_key(self.task_messages))
        return pool if isinstance(pool, SamplePool) else None


def _without_system(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [m for m in messages if m.get("role") not in ("system", "developer")]


def _key(messages: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(list(messages), sort_keys=True)


class PoolContext(RunContext):
    """A RunContext whose samples of the task's conversation come from pools; everything else is a live call."""

    def __init__(self, state: RunState, scope: Scope, pools: TaskPools, scorer: PooledScorer,
                 taken: dict[str, set[int]] | None = None) -> None:
        super().__init__(state, scope)
        self._pools = pools
        self._scorer = scorer
        self._taken = taken if taken is not None else {}  # per prompt: samples handed out in this scoring run

    def _with(self, scope: Scope) -> PoolContext:
        return PoolContext(self._state, scope, self._pools, self._scorer, self._taken)

    def _poolable(self, messages: Sequence[dict[str, Any]] | None, temperature: float | None,
                  max_tokens: int | None) -> list[dict[str, Any]] | None:
        conversation = list(messages) if messages is not None else self._scope.messages
        same = _without_system(conversation) == _without_system(self._pools.task_messages)
        hot = (temperature if temperature is not None else self._scope.sampling.temperature) == self._scorer.temperature
        default_length = max_tokens in (None, self._scope.sampling.max_tokens)
        return conversation if same and hot and default_length else None

    async def _pool(self, conversation: list[dict[str, Any]]) -> SamplePool:
        key = _key(conversation)
        lock = self._pools.locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._pools.pools:
                try:
                    self._pools.pools[key] = await self._scorer.draw(self._scope.model, conversation,
                                                                     self._pools.size, self._pools.seed)
                except Exception as exc:  # noqa: BLE001 - kept: no other model string draws this pool again
                    self._pools.pools[key] = exc
        pool = self._pools.pools[key]
        if isinstance(pool, Exception):
            raise pool
        return pool

    def _positions(self, conversation: list[dict[str, Any]], n: int, index: int, size: int) -> list[int]:
        taken = self._taken.setdefault(_key(conversation), set())
        if not self._scope.path:
            positions = list(range(index, index + n))
        else:
            free = [i for i in range(size) if i not in taken]
            positions = free[:n] if len(free) >= n else [size]  # [size]: out of range, reported below
        if not positions or positions[-1] >= size or positions[0] < 0:
            raise StrategyError(f"the pool holds {size} samples; more were asked for (run the eval with a larger "
                                f"--pool)")
        taken.update(positions)
        return positions

    def _serve(self, pool: SamplePool, positions: Sequence[int], min_success: int) -> list[Candidate]:
        """The samples at these positions, each checked against the budget and charged as the seeded live call
        that would draw it (one call per sample, paying the prompt each time); stops where the budget does."""
        budget = self._scope.budget
        served: list[Candidate] = []
        for position in positions:
            try:
                budget.check()
            except BudgetExceeded:
                if len(served) < min_success:
                    raise
                break
            candidate = pool.candidates[position]
            budget.charge(calls=1, prompt_tokens=round(pool.prompt_tokens_per_sample),
                          completion_tokens=candidate.completion_tokens)
            served.append(candidate)
        return served

    async def generate(self, *, n: int = 1, messages: Sequence[dict[str, Any]] | None = None,
                       temperature: float | None = None, max_tokens: int | None = None, logprobs: bool = False,
                       top_logprobs: int | None = None, stop: str | list[str] | None = None,
                       seed: int | None = None, index: int = 0, min_success: int = 1, label: str = "sample",
                       extra: Mapping[str, Any] | None = None) -> list[Candidate]:
        conversation = self._poolable(messages, temperature, max_tokens)
        if conversation is None or seed is not None or extra or stop is not None:
            return await super().generate(n=n, messages=messages, temperature=temperature, max_tokens=max_tokens,
                                          logprobs=logprobs, top_logprobs=top_logprobs, stop=stop, seed=seed,
                                          index=index, min_success=min_success, label=label, extra=extra)
        if n < 1:
            return []
        pool = await self._pool(conversation)
        return self._serve(pool, self._positions(conversation, n, index, len(pool.candidates)), max(1, min_success))

    async def stream(self, *, messages: Sequence[dict[str, Any]] | None = None,
                     prefix: str | Sequence[int] | None = None, temperature: float | None = None,
                     max_tokens: int | None = None, top_logprobs: int | None = None,
                     stop: str | list[str] | None = None, seed: int | None = None, index: int = 0,
                     label: str = "stream", extra: Mapping[str, Any] | None = None) -> AsyncIterator[StreamEvent]:
        conversation = self._poolable(messages, temperature, max_tokens)
        if conversation is None or prefix is not None or seed is not None or extra or stop is not None:
            async for event in super().stream(messages=messages, prefix=prefix, temperature=temperature,
                                              max_tokens=max_tokens, top_logprobs=top_logprobs, stop=stop,
                                              seed=seed, index=index, label=label, extra=extra):
                yield event
            return
        pool = await self._pool(conversation)
        (position,) = self._positions(conversation, 1, index, len(pool.candidates))
        candidate = pool.candidates[position]
        budget = self._scope.budget
        budget.check()
        budget.charge(calls=1, prompt_tokens=round(pool.prompt_tokens_per_sample))
        tokens = candidate.tokens or ()
        consumed = 0
        try:
            for i, token in enumerate(tokens):
                end = tokens[i + 1].offset if i + 1 < len(tokens) else len(candidate.text)
                consumed += 1
                yield StreamEvent(candidate.text[token.offset:end], token)
            yield StreamEvent("", None, candidate.finish_reason or "stop")
        finally:
            budget.charge(completion_tokens=consumed)  # a trace pruned mid-stream costs only what it generated


def parse_strategy_string(model_string: str, registry: Mapping[str, type[Strategy]]) -> tuple[StrategySpec, str] | None:
    """`bon:n=8>cot-smollm2` -> (its StrategySpec, "smollm2"); a plain model -> None."""
    spec, model = split_model_name(model_string, registry)
    return (spec, model) if spec is not None else None


@dataclass(frozen=True)
class PooledOutcome:
    reply: str | None
    usage: dict[str, Any] | None
    calls: int
    latency_ms: float
    error: str | None
    details: dict[str, Any] | None
    budget_exhausted: bool = False


class PooledScorer:
    """Draws pools and runs strategies on them, with live calls going through the proxy's pass-through."""

    def __init__(self, proxy_base_url: str, api_key: str, client: aiohttp.ClientSession,
                 settings: StrategySettings, sampling: Sampling) -> None:
        self.proxy_base_url = proxy_base_url
        self.api_key = api_key
        self.client = client
        self.settings = settings
        self.sampling = sampling
        self.temperature = sampling.sampling_temperature()
        self.registry = load_registry()[0]
        self._backend: Backend | None = None

    async def backend(self) -> Backend:
        """The proxy itself, as a backend with the abilities of the engine behind it (from its /health)."""
        if self._backend is None:
            root = self.proxy_base_url[: -len("/v1")]
            async with self.client.get(f"{root}/health") as response:
                health = await response.json(content_type=None)
            engine = next(iter(health["backends"].values()))
            # The proxy passes the OpenAI endpoints through, not the engine's tokenizer or template endpoints.
            config = BackendConfig(
                name="proxy", kind=engine["kind"], base_url=self.proxy_base_url, max_in_flight=64,
                capabilities=CapabilityOverrides(max_n=engine["max_n"], tokenize=False, render=False),
            )
            self._backend = Backend(config, self.proxy_base_url, self.client, api_key=self.api_key)
        return self._backend

    def _run(self, backend: Backend, model: str, messages: list[dict[str, Any]], seed: int,
             label: str) -> tuple[RunState, Scope]:
        sampling = Sampling(self.sampling.temperature, self.sampling.top_p, self.sampling.max_tokens,
                            self.sampling.stop, seed, dict(self.sampling.extra))
        state = RunState(owner=f"pool-{label}-{seed}", request_id=None, settings=self.settings,
                         registry=self.registry, trace=Trace(label))
        scope = Scope(backend=backend, model=model, messages=messages, sampling=sampling,
                      budget=BudgetScope(self.settings.budget))
        return state, scope

    async def draw(self, model: str, messages: list[dict[str, Any]], size: int, seed: int) -> SamplePool:
        backend = await self.backend()
        state, scope = self._run(backend, model, messages, seed, "pool")
        candidates = await RunContext(state, scope).generate(n=size, temperature=self.temperature, logprobs=True,
                                                             top_logprobs=POOL_TOP_LOGPROBS, min_success=size)
        return SamplePool(candidates, self.temperature, scope.budget.usage.prompt_tokens / max(1, size))

    async def score(self, spec: StrategySpec, model: str, pools: TaskPools,
                    budget: Mapping[str, Any] | None = None) -> PooledOutcome:
        """One strategy on one task's pools, within `budget` (a `ttc.budget`) when given."""
        backend = await self.backend()
        state, scope = self._run(backend, model, pools.task_messages, pools.seed, spec.slug)
        started = time.monotonic()
        try:
            strategy, params = check_spec(spec, self.registry, self.settings)[0]
            limits = BudgetScope(check_budget(budget or {}, self.settings.budget))
            scope = Scope(backend=scope.backend, model=model, messages=scope.messages, sampling=scope.sampling,
                          budget=limits, over=spec.over, fan_out=max(1, strategy.fan_out(params)))
            result = await strategy().run(PoolContext(state, scope, pools, self), params)
        except (ProxyError, StrategyError) as exc:
            return PooledOutcome(None, None, scope.budget.usage.calls, _ms(started), f"{type(exc).__name__}: {exc}",
                                 None)
        usage = scope.budget.usage
        answer_tokens = sum(c.completion_tokens for c in result.choices)
        return PooledOutcome(
            reply=result.answer.text,
            usage={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                   "total_tokens": usage.total_tokens,
                   "completion_tokens_details": {"reasoning_tokens": usage.completion_tokens - answer_tokens}},
            calls=usage.calls, latency_ms=_ms(started), error=None, details=result.details,
            budget_exhausted=result.budget_exhausted or scope.budget.exhausted,
        )


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
