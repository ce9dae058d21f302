"""Pooled evaluation: draw one pool of samples per task and prompt, then score every strategy on those same samples.

Each strategy runs unmodified on a PoolContext. A sample of the task's conversation (with any system prompt: so
`cot`'s samples pool too) at the pool's temperature and max_tokens comes from that prompt's pool, whose sample i
is drawn with seed + i when first needed and shared by every model string: a top-level context takes sample
`index` (exactly what a live seeded request would draw), a nested run the next sample no nested run has taken yet
(the same distribution as live, not the same seeds: live nested runs derive theirs). Every other call (a judge's
questions, a revision prompt, a continuation) goes live to the engine through the proxy, and each record says
how many did. Accuracy differences between strategies are then paired on identical samples.

Pooled runs use the default strategy settings (max_samples raised to the pool size), not a running proxy's
config: the eval may run against a proxy it cannot read.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from ttc_proxy.proxy.backends import Backend
from ttc_proxy.proxy.config import BackendConfig, CapabilityOverrides, StrategySettings
from ttc_proxy.proxy.errors import ProxyError
from ttc_proxy.proxy.routing import split_model_name
from ttc_proxy.proxy.runs.accounting import BudgetScope
from ttc_proxy.proxy.runs.context import RunContext, RunState, Scope, prompt_key
from ttc_proxy.proxy.runs.validation import check_budget, check_spec
from ttc_proxy.proxy.traces import Trace
from ttc_proxy.strategies.framework import (
    BudgetExceeded,
    Candidate,
    gather_all,
    Sampling,
    Strategy,
    StrategyError,
    StrategySpec,
    StreamEvent,
)

POOL_TOP_LOGPROBS = 20


@dataclass
class SamplePool:
    """The samples of one prompt of one task: sample i is drawn with seed + i when first needed, so a prompt only a
    few runs use costs only those samples, and every model string sees the same sample i."""

    conversation: list[dict[str, Any]]
    seed: int
    size: int
    candidates: dict[int, Candidate] = field(default_factory=dict)
    prompt_tokens_per_sample: float = 0.0
    failure: Exception | None = None  # a failed draw is every model string's error on this task
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def ensure(self, positions: Sequence[int], scorer: PooledScorer, model: str) -> float:
        """Draw the samples at these positions that are not drawn yet; returns the seconds spent drawing."""
        async with self.lock:
            if self.failure is not None:
                raise self.failure
            missing = [p for p in positions if p not in self.candidates]
            if not missing:
                return 0.0
            started = time.monotonic()
            try:
                drawn, prompt_tokens = await scorer.draw_samples(model, self.conversation,
                                                                 [self.seed + p for p in missing])
            except Exception as exc:  # noqa: BLE001 - kept, so no later model string draws it again
                self.failure = exc
                raise
            self.candidates.update(zip(missing, drawn))
            self.prompt_tokens_per_sample = prompt_tokens
            return time.monotonic() - started


@dataclass
class TaskPools:
    """Every pool of one task (by prompt), shared by the model strings scored on it."""

    seed: int
    size: int
    task_messages: list[dict[str, Any]]
    pools: dict[str, SamplePool] = field(default_factory=dict)

    def pool(self, conversation: list[dict[str, Any]]) -> SamplePool:
        key = _key(conversation)
        if key not in self.pools:
            self.pools[key] = SamplePool(conversation, self.seed, self.size)
        return self.pools[key]

    @property
    def main(self) -> SamplePool:
        return self.pool(self.task_messages)


def _without_system(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [m for m in messages if m.get("role") not in ("system", "developer")]


def _key(messages: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps(list(messages), sort_keys=True)


@dataclass
class ScoringRun:
    """What one strategy's scoring on one task shares across its contexts."""

    pools: TaskPools
    scorer: PooledScorer
    taken: dict[str, set[int]] = field(default_factory=dict)  # per prompt: samples handed out
    drawing_seconds: float = 0.0  # spent drawing pool samples: not the strategy's latency
    live_calls: int = 0  # calls that could not come from a pool


class PoolContext(RunContext):
    """A RunContext whose samples of the task's conversation come from pools; everything else is a live call."""

    def __init__(self, state: RunState, scope: Scope, run: ScoringRun) -> None:
        super().__init__(state, scope)
        self._run = run

    def _with(self, scope: Scope) -> PoolContext:
        return PoolContext(self._state, scope, self._run)

    def _poolable(self, messages: Sequence[dict[str, Any]] | None, temperature: float | None,
                  max_tokens: int | None) -> list[dict[str, Any]] | None:
        conversation = list(messages) if messages is not None else self._scope.messages
        same = _without_system(conversation) == _without_system(self._run.pools.task_messages)
        effective = temperature if temperature is not None else self._scope.sampling.temperature
        hot = effective == self._run.scorer.temperature
        default_length = max_tokens in (None, self._scope.sampling.max_tokens)
        return conversation if same and hot and default_length else None

    def _positions(self, conversation: list[dict[str, Any]], n: int, index: int) -> list[int]:
        """Top-level sample i is the pool's sample i (what a live seeded request draws); a nested run takes the
        next samples no nested run has taken."""
        size = self._run.pools.size
        taken = self._run.taken.setdefault(_key(conversation), set())
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

    async def _samples(self, conversation: list[dict[str, Any]], positions: Sequence[int]) -> SamplePool:
        pool = self._run.pools.pool(conversation)
        self._run.drawing_seconds += await pool.ensure(positions, self._run.scorer, self._scope.model)
        return pool

    def _serve(self, pool: SamplePool, positions: Sequence[int], min_success: int) -> list[Candidate]:
        """The samples at these positions, each admitted by the budget as the concurrent seeded live calls that
        would draw them are: counted one by one as they start, each reserving its prompt and max_tokens (its
        max_tokens cut to what is left, so the sample is cut there too), charged what it spent when all are done.
        Stops where the budget does."""
        budget = self._scope.budget
        prompt = round(pool.prompt_tokens_per_sample)
        self._state.learn_prompt(prompt_key({"messages": pool.conversation}), prompt)  # as its live call would
        served: list[Candidate] = []
        reserved = 0
        try:
            for position in positions:
                try:
                    granted = budget.reserve(prompt, self._scope.sampling.max_tokens, 1)
                except BudgetExceeded:
                    if len(served) < min_success:
                        raise
                    break
                reserved += prompt + granted
                budget.charge(calls=1)
                served.append(_cut(pool.candidates[position], granted))
        finally:
            budget.release(reserved)
        budget.charge(prompt_tokens=prompt * len(served), completion_tokens=sum(c.completion_tokens for c in served))
        return served

    async def generate(self, *, n: int = 1, messages: Sequence[dict[str, Any]] | None = None,
                       temperature: float | None = None, max_tokens: int | None = None, logprobs: bool = False,
                       top_logprobs: int | None = None, stop: str | list[str] | None = None,
                       seed: int | None = None, index: int = 0, min_success: int = 1, label: str = "sample",
                       extra: Mapping[str, Any] | None = None, answers: bool = True) -> list[Candidate]:
        conversation = self._poolable(messages, temperature, max_tokens)
        if conversation is None or seed is not None or extra or stop is not None or not answers:
            self._run.live_calls += 1
            return await super().generate(n=n, messages=messages, temperature=temperature, max_tokens=max_tokens,
                                          logprobs=logprobs, top_logprobs=top_logprobs, stop=stop, seed=seed,
                                          index=index, min_success=min_success, label=label, extra=extra,
                                          answers=answers)
        if n < 1:
            return []
        positions = self._positions(conversation, n, index)
        pool = await self._samples(conversation, positions)
        return self._serve(pool, positions, max(1, min_success))

    async def stream(self, *, messages: Sequence[dict[str, Any]] | None = None,
                     prefix: str | Sequence[int] | None = None, temperature: float | None = None,
                     max_tokens: int | None = None, top_logprobs: int | None = None,
                     stop: str | list[str] | None = None, seed: int | None = None, index: int = 0,
                     label: str = "stream", extra: Mapping[str, Any] | None = None) -> AsyncIterator[StreamEvent]:
        conversation = self._poolable(messages, temperature, max_tokens)
        if conversation is None or prefix is not None or seed is not None or extra or stop is not None:
            self._run.live_calls += 1
            async for event in super().stream(messages=messages, prefix=prefix, temperature=temperature,
                                              max_tokens=max_tokens, top_logprobs=top_logprobs, stop=stop,
                                              seed=seed, index=index, label=label, extra=extra):
                yield event
            return
        (position,) = self._positions(conversation, 1, index)
        pool = await self._samples(conversation, [position])
        budget = self._scope.budget
        prompt = round(pool.prompt_tokens_per_sample)
        self._state.learn_prompt(prompt_key({"messages": pool.conversation}), prompt)
        granted = budget.reserve(prompt, self._scope.sampling.max_tokens, 1)
        budget.charge(calls=1)
        candidate = _cut(pool.candidates[position], granted)
        tokens = candidate.tokens or ()
        consumed = 0
        try:
            for i, token in enumerate(tokens):
                end = tokens[i + 1].offset if i + 1 < len(tokens) else len(candidate.text)
                consumed += 1
                yield StreamEvent(candidate.text[token.offset:end], token)
            yield StreamEvent("", None, candidate.finish_reason or "stop")
        finally:
            # As live: the prompt, and only what was generated before a trace was pruned mid-stream.
            budget.release(prompt + granted)
            budget.charge(prompt_tokens=prompt, completion_tokens=consumed)


def _cut(candidate: Candidate, max_tokens: int) -> Candidate:
    """The sample as a call with this max_tokens would have drawn it (same seed): its first tokens, cut off."""
    if candidate.completion_tokens <= max_tokens or not candidate.tokens or len(candidate.tokens) <= max_tokens:
        return candidate
    end = candidate.tokens[max_tokens].offset
    return replace(candidate, text=candidate.text[:end], tokens=candidate.tokens[:max_tokens],
                   completion_tokens=max_tokens, finish_reason="length")


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
    live_calls: int = 0  # calls made live because no pool could serve them


class PooledScorer:
    """Draws pools and runs strategies on them, with live calls going through the proxy's pass-through."""

    def __init__(self, proxy_base_url: str, api_key: str, client: aiohttp.ClientSession,
                 settings: StrategySettings, sampling: Sampling, registry: Mapping[str, type[Strategy]]) -> None:
        self.proxy_base_url = proxy_base_url
        self.api_key = api_key
        self.client = client
        self.settings = settings
        self.sampling = sampling
        self.temperature = sampling.sampling_temperature()
        self.registry = registry
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

    async def draw_samples(self, model: str, messages: list[dict[str, Any]],
                           seeds: Sequence[int]) -> tuple[list[Candidate], float]:
        """One sample per seed (each its own call, as a live seeded request draws it), with logprobs; and what one
        sample's prompt cost."""
        backend = await self.backend()
        state, scope = self._run(backend, model, messages, 0, "pool")
        context = RunContext(state, scope)
        drawn = await gather_all(
            context.generate(n=1, temperature=self.temperature, logprobs=True, top_logprobs=POOL_TOP_LOGPROBS,
                             seed=seed)
            for seed in seeds)
        return [c for (c,) in drawn], scope.budget.usage.prompt_tokens / max(1, len(seeds))

    async def score(self, spec: StrategySpec, model: str, pools: TaskPools,
                    budget: Mapping[str, Any] | None = None) -> PooledOutcome:
        """One strategy on one task's pools, within `budget` (a `ttc.budget`) when given."""
        backend = await self.backend()
        state, scope = self._run(backend, model, pools.task_messages, pools.seed, spec.slug)
        run = ScoringRun(pools, self)
        started = time.monotonic()
        try:
            strategy, params = check_spec(spec, self.registry, self.settings)[0]
            limits = BudgetScope(check_budget(budget or {}, self.settings.budget))
            scope = Scope(backend=scope.backend, model=model, messages=scope.messages, sampling=scope.sampling,
                          budget=limits, over=spec.over, fan_out=max(1, strategy.fan_out(params)))
            result = await strategy().run(PoolContext(state, scope, run), params)
        except (ProxyError, StrategyError) as exc:
            return PooledOutcome(None, None, scope.budget.usage.calls, _ms(started, run.drawing_seconds),
                                 f"{type(exc).__name__}: {exc}", None, live_calls=run.live_calls)
        usage = scope.budget.usage
        answer_tokens = sum(c.completion_tokens for c in result.choices)
        return PooledOutcome(
            reply=result.answer.text,
            usage={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                   "total_tokens": usage.total_tokens,
                   "completion_tokens_details": {"reasoning_tokens": usage.completion_tokens - answer_tokens}},
            calls=usage.calls, latency_ms=_ms(started, run.drawing_seconds), error=None, details=result.details,
            budget_exhausted=result.budget_exhausted or scope.budget.exhausted, live_calls=run.live_calls,
        )


def _ms(started: float, excluded: float = 0.0) -> float:
    """Milliseconds since `started`, without the `excluded` seconds (pool draws a live run would not make)."""
    return round((time.monotonic() - started - excluded) * 1000, 1)
