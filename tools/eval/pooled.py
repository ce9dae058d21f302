"""Pooled evaluation: draw one pool of samples per task and prompt, then score every strategy on those same samples.

Each strategy runs unmodified on a RunContext whose samples come from a PoolSource. A sample of the task's
conversation (with any system prompt: so `cot`'s samples pool too) at the pool's temperature and max_tokens comes
from that prompt's pool, whose sample i is drawn with seed + i when first needed and shared by every model string:
a top-level context takes sample `index` (exactly what a live seeded request would draw), a nested run the next
sample no nested run has taken yet (the same distribution as live, not the same seeds: live nested runs derive
theirs). Every other call (a judge's questions, a revision prompt, a continuation) goes live to the engine through
the proxy, and each record says how many did. Accuracy differences between strategies are then paired on
identical samples.

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
from ttc_proxy.proxy.runs.budgeted import BudgetedCall
from ttc_proxy.proxy.runs.context import RunContext
from ttc_proxy.proxy.runs.state import RunState, Scope, prompt_key
from ttc_proxy.proxy.runs.validation import check_budget, check_spec
from ttc_proxy.proxy.traces import Trace
from ttc_proxy.strategies.framework import (
    BudgetExceeded,
    CallOptions,
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


class PoolSource:
    """Serves a scoring run's samples of the task's conversation from the pools (budgeted as the live calls that
    would draw them); every other call goes live (see state.SampleSource)."""

    def __init__(self, run: ScoringRun) -> None:
        self._run = run

    def _poolable(self, scope: Scope, options: CallOptions,
                  messages: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        conversation = list(messages) if messages is not None else scope.messages
        same = _without_system(conversation) == _without_system(self._run.pools.task_messages)
        effective = options.temperature if options.temperature is not None else scope.sampling.temperature
        hot = effective == self._run.scorer.temperature
        default_length = options.max_tokens in (None, scope.sampling.max_tokens)
        plain = options.seed is None and not options.extra and options.stop is None
        return conversation if same and hot and default_length and plain else None

    def _positions(self, scope: Scope, conversation: list[dict[str, Any]], n: int, index: int) -> list[int]:
        """Top-level sample i is the pool's sample i (what a live seeded request draws); a nested run takes the
        next samples no nested run has taken."""
        size = self._run.pools.size
        taken = self._run.taken.setdefault(_key(conversation), set())
        if not scope.path:
            positions = list(range(index, index + n))
        else:
            free = [i for i in range(size) if i not in taken]
            positions = free[:n] if len(free) >= n else [size]  # [size]: out of range, reported below
        if not positions or positions[-1] >= size or positions[0] < 0:
            raise StrategyError(f"the pool holds {size} samples; more were asked for (run the eval with a larger "
                                f"--pool)")
        taken.update(positions)
        return positions

    async def _samples(self, scope: Scope, conversation: list[dict[str, Any]], positions: Sequence[int]) -> SamplePool:
        pool = self._run.pools.pool(conversation)
        self._run.drawing_seconds += await pool.ensure(positions, self._run.scorer, scope.model)
        return pool

    @staticmethod
    def _budgeted(state: RunState, scope: Scope, pool: SamplePool) -> tuple[BudgetedCall, int]:
        """A pooled sample's budget, as its live call's: its prompt as the engine reported it, the run's
        max_tokens."""
        prompt = round(pool.prompt_tokens_per_sample)
        body = {"messages": pool.conversation, "max_tokens": scope.sampling.max_tokens}
        state.learn_prompt(prompt_key(body), prompt)  # as its live call would
        return BudgetedCall(state, scope.budget, body, 1), prompt

    def _serve(self, state: RunState, scope: Scope, pool: SamplePool, positions: Sequence[int],
               min_success: int) -> list[Candidate]:
        """The samples at these positions, each admitted by the budget as the concurrent seeded live calls that
        would draw them are: counted one by one as they start, each reserving its prompt and max_tokens (its
        max_tokens cut to what is left, so the sample is cut there too), charged what it spent when all are done.
        Stops where the budget does."""
        served: list[tuple[BudgetedCall, Candidate]] = []
        prompt = round(pool.prompt_tokens_per_sample)
        try:
            for position in positions:
                budgeted, _ = self._budgeted(state, scope, pool)
                try:
                    granted = budgeted.start()
                except BudgetExceeded:
                    if len(served) < min_success:
                        raise
                    break
                served.append((budgeted, _cut(pool.candidates[position], granted)))
        finally:
            for budgeted, _ in served:
                budgeted.release()
        for budgeted, candidate in served:
            budgeted.settle(prompt, candidate.completion_tokens)
        return [candidate for _, candidate in served]

    async def generate(self, state: RunState, scope: Scope, options: CallOptions, n: int,
                       messages: Sequence[dict[str, Any]] | None, index: int,
                       min_success: int) -> list[Candidate] | None:
        conversation = self._poolable(scope, options, messages)
        if conversation is None or not options.answers:
            self._run.live_calls += 1
            return None
        if n < 1:
            return []
        positions = self._positions(scope, conversation, n, index)
        pool = await self._samples(scope, conversation, positions)
        return self._serve(state, scope, pool, positions, max(1, min_success))

    def stream(self, state: RunState, scope: Scope, options: CallOptions, messages: Sequence[dict[str, Any]] | None,
               prefix: str | Sequence[int] | None, index: int) -> AsyncIterator[StreamEvent] | None:
        conversation = self._poolable(scope, options, messages)
        if conversation is None or prefix is not None:
            self._run.live_calls += 1
            return None
        return self._stream(state, scope, conversation, index)

    async def _stream(self, state: RunState, scope: Scope, conversation: list[dict[str, Any]],
                      index: int) -> AsyncIterator[StreamEvent]:
        (position,) = self._positions(scope, conversation, 1, index)
        pool = await self._samples(scope, conversation, [position])
        budgeted, prompt = self._budgeted(state, scope, pool)
        candidate = _cut(pool.candidates[position], budgeted.start())
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
            budgeted.release()
            budgeted.settle(prompt, consumed)


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
            context.generate(CallOptions(temperature=self.temperature, logprobs=True,
                                         top_logprobs=POOL_TOP_LOGPROBS, seed=seed))
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
            state.sample_source = PoolSource(run)
            result = await strategy().run(RunContext(state, scope), params)
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
