"""Pooled evaluation: draw one pool of samples per task, then score every strategy on that same pool.

Each strategy runs unmodified on a PoolContext: its samples of the task prompt come from the pool (in seed
order, exactly what a live seeded request would draw), while every other call it makes (a judge's
verification questions, continuations) goes live to the engine through the proxy. Accuracy differences between
strategies are then paired on identical samples, and a whole comparison costs one pool per task.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from strategies import BUILTIN_STRATEGIES
from strategies.framework import (
    Candidate,
    Sampling,
    Strategy,
    StrategyError,
    StrategyParams,
    StrategyResult,
    StreamEvent,
)

from .backends import Backend
from .config import BackendConfig, CapabilityOverrides, StrategySettings
from .context import RunContext, RunState, check_params
from .errors import ProxyError
from .routing import split_model_name
from .traces import Trace

POOL_TOP_LOGPROBS = 20


@dataclass
class Pool:
    """The samples drawn for one task prompt, in seed order, and what one sample's call cost in prompt tokens."""

    candidates: list[Candidate]
    temperature: float
    prompt_tokens_per_sample: float


class PoolContext(RunContext):
    """A RunContext whose task-prompt samples come from a pool; everything else is a live call."""

    def __init__(self, state: RunState, pool: Pool, node: int = 0) -> None:
        super().__init__(state, node)
        self._pool = pool
        self._next = 0

    def _serves(self, messages: Sequence[dict[str, Any]] | None, temperature: float | None) -> bool:
        same_prompt = messages is None or list(messages) == self._state.messages
        return same_prompt and (temperature is None or temperature == self._pool.temperature)

    def _start(self, seed: int | None) -> int:
        """Where in the pool a call begins: the sample its seed names (seed i of the request is sample i)."""
        return self._next if seed is None or self._state.sampling.seed is None else seed - self._state.sampling.seed

    def _take(self, n: int, seed: int | None, keep_logprobs: bool) -> list[Candidate]:
        self._check_budget()  # as a live call would, before it is made
        start = self._start(seed)
        if start < 0 or start + n > len(self._pool.candidates):
            raise StrategyError(f"the pool holds {len(self._pool.candidates)} samples; samples {start}..{start + n - 1} "
                                f"were asked for (run the eval with a larger --pool)")
        self._next = max(self._next, start + n)
        taken = self._pool.candidates[start:start + n]
        usage = self._state.usage
        usage.calls += n  # a seeded live request makes one call per sample
        usage.prompt_tokens += round(self._pool.prompt_tokens_per_sample * n)
        usage.completion_tokens += sum(c.completion_tokens for c in taken)
        if keep_logprobs:
            return list(taken)
        return [Candidate(c.text, c.finish_reason, c.message, c.completion_tokens, None, c.seed, c.label) for c in taken]

    async def generate(self, *, n: int = 1, messages: Sequence[dict[str, Any]] | None = None,
                       temperature: float | None = None, max_tokens: int | None = None, logprobs: bool = False,
                       top_logprobs: int | None = None, stop: str | list[str] | None = None,
                       seed: int | None = None, min_success: int = 1, label: str = "sample") -> list[Candidate]:
        if self._serves(messages, temperature) and max_tokens in (None, self._state.sampling.max_tokens):
            return self._take(n, seed, logprobs or bool(top_logprobs))
        return await super().generate(n=n, messages=messages, temperature=temperature, max_tokens=max_tokens,
                                      logprobs=logprobs, top_logprobs=top_logprobs, stop=stop, seed=seed,
                                      min_success=min_success, label=label)

    async def stream(self, *, messages: Sequence[dict[str, Any]] | None = None, temperature: float | None = None,
                     max_tokens: int | None = None, top_logprobs: int | None = None,
                     stop: str | list[str] | None = None, seed: int | None = None,
                     label: str = "stream") -> AsyncIterator[StreamEvent]:
        if not self._serves(messages, temperature):
            async for event in super().stream(messages=messages, temperature=temperature, max_tokens=max_tokens,
                                              top_logprobs=top_logprobs, stop=stop, seed=seed, label=label):
                yield event
            return
        self._check_budget()
        start = self._start(seed)
        if start < 0 or start >= len(self._pool.candidates):
            raise StrategyError(f"the pool holds {len(self._pool.candidates)} samples; sample {start} was asked for")
        self._next = max(self._next, start + 1)
        candidate = self._pool.candidates[start]
        usage = self._state.usage
        usage.calls += 1
        usage.prompt_tokens += round(self._pool.prompt_tokens_per_sample)
        consumed = 0
        try:
            for entry in candidate.logprobs or ():
                consumed += 1
                yield StreamEvent(entry.token, entry)
            yield StreamEvent("", None, candidate.finish_reason or "stop")
        finally:
            usage.completion_tokens += consumed  # a trace pruned mid-stream costs only what it generated

    async def run_strategy(self, slug: str, params: dict[str, Any] | None = None, *,
                           seed: int | None = None) -> StrategyResult:
        raise StrategyError("nested strategies are not scored on a pool: their samples are not the pool's")


def parse_strategy_string(model_string: str) -> tuple[type[Strategy], dict[str, str], str] | None:
    """`bon:n=8,select=vote-smollm2` -> (Bon, {...}, "smollm2"); a plain model -> None."""
    slug, params, model = split_model_name(model_string, BUILTIN_STRATEGIES)
    return (BUILTIN_STRATEGIES[slug], params, model) if slug is not None else None


@dataclass(frozen=True)
class PooledOutcome:
    reply: str | None
    usage: dict[str, Any] | None
    calls: int
    latency_ms: float
    error: str | None
    details: dict[str, Any] | None


class PooledScorer:
    """Draws pools and runs strategies on them, with live calls going through the proxy's pass-through."""

    def __init__(self, proxy_base_url: str, api_key: str, client: aiohttp.ClientSession,
                 settings: StrategySettings, sampling: Sampling) -> None:
        self.proxy_base_url = proxy_base_url
        self.api_key = api_key
        self.client = client
        self.settings = settings
        self.sampling = sampling
        self._backend: Backend | None = None

    async def backend(self) -> Backend:
        """The proxy itself, as a backend with the abilities of the engine behind it (from its /health)."""
        if self._backend is None:
            root = self.proxy_base_url[: -len("/v1")]
            async with self.client.get(f"{root}/health") as response:
                health = await response.json(content_type=None)
            engine = next(iter(health["backends"].values()))
            config = BackendConfig(
                name="proxy", kind=engine["kind"], base_url=self.proxy_base_url,
                capabilities=CapabilityOverrides(max_n=engine["max_n"]), max_in_flight=64,
            )
            self._backend = Backend(config, self.proxy_base_url, self.client, api_key=self.api_key)
        return self._backend

    def _state(self, backend: Backend, model: str, messages: list[dict[str, Any]], seed: int, label: str) -> RunState:
        sampling = Sampling(self.sampling.temperature, self.sampling.top_p, self.sampling.max_tokens,
                            self.sampling.stop, seed, dict(self.sampling.extra))
        return RunState(backend=backend, model=model, owner=f"pool-{label}-{seed}", request_id=None,
                        sampling=sampling, messages=messages, budget=self.settings.budget, settings=self.settings,
                        registry=BUILTIN_STRATEGIES, trace=Trace(label))

    async def draw(self, model: str, messages: list[dict[str, Any]], size: int, seed: int) -> Pool:
        backend = await self.backend()
        state = self._state(backend, model, messages, seed, "pool")
        temperature = self.sampling.sampling_temperature()
        candidates = await RunContext(state).generate(n=size, temperature=temperature, logprobs=True,
                                                       top_logprobs=POOL_TOP_LOGPROBS, seed=seed, min_success=size)
        return Pool(candidates, temperature, state.usage.prompt_tokens / max(1, size))

    async def score(self, strategy: type[Strategy], params: Mapping[str, Any], model: str,
                    messages: list[dict[str, Any]], pool: Pool, seed: int) -> PooledOutcome:
        backend = await self.backend()
        state = self._state(backend, model, messages, seed, strategy.slug)
        started = time.monotonic()
        try:
            checked: StrategyParams = check_params(strategy, params, self.settings)
            result = await strategy().run(PoolContext(state, pool), checked)
        except (ProxyError, StrategyError) as exc:
            return PooledOutcome(None, None, state.usage.calls, _ms(started), f"{type(exc).__name__}: {exc}", None)
        usage = state.usage
        answer_tokens = sum(c.completion_tokens for c in result.choices)
        return PooledOutcome(
            reply=result.choices[0].content,
            usage={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                   "total_tokens": usage.total_tokens,
                   "completion_tokens_details": {"reasoning_tokens": usage.completion_tokens - answer_tokens}},
            calls=usage.calls, latency_ms=_ms(started), error=None, details=result.details,
        )


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
