"""The proxy's side of the strategy interface: a run's context, its accounting, budget and trace."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import ValidationError

from strategies.framework import (
    Candidate,
    Sampling,
    Strategy,
    StrategyParams,
    StrategyResult,
    StreamEvent,
    TokenLogprob,
)

from .backends import Backend
from .config import Budget, StrategySettings, VerifierEndpoint
from .errors import BudgetExhausted, InvalidRequest, NotFound, ProxyError, StrategyFailed
from .traces import Trace

ProgressSink = Callable[[str], Awaitable[None]]
TRACE_TEXT_LIMIT = 2000


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    estimated: bool = False  # some completion tokens were counted by us, not reported by the engine

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RunState:
    """Everything one client request's strategy run shares across its (nested) contexts."""

    backend: Backend
    model: str
    owner: str
    request_id: str | None
    sampling: Sampling
    messages: list[dict[str, Any]]
    budget: Budget
    settings: StrategySettings
    registry: Mapping[str, type[Strategy]]
    trace: Trace
    progress_sink: ProgressSink | None = None
    # Resolves another model name to the backend serving it (None: only this run's backend is reachable).
    backend_for: Callable[[str], Backend] | None = None
    verifiers: Mapping[str, VerifierEndpoint] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)
    progress_lines: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.started + self.budget.max_seconds


def check_params(strategy: type[Strategy], raw: Mapping[str, Any], settings: StrategySettings) -> StrategyParams:
    """Validate a strategy's parameters (merged with configured defaults) and their configured maxima."""
    merged = {**settings.defaults.get(strategy.slug, {}), **raw}
    try:
        params = strategy.Params.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in exc.errors()
        )
        valid = ", ".join(
            f"{name} ({info.description or info.annotation})" for name, info in strategy.Params.model_fields.items()
        )
        raise InvalidRequest(
            f"bad parameters for strategy {strategy.slug!r}: {problems}. Valid parameters: {valid}",
            param="ttc.params",
            code="invalid_strategy_params",
        ) from exc
    maxima = {"samples": settings.max_samples, "iterations": settings.max_iterations}
    for name, kind in strategy.Params.limits.items():
        value = getattr(params, name)
        if isinstance(value, int) and value > maxima[kind]:
            raise InvalidRequest(
                f"strategy {strategy.slug!r}: {name}={value} is above the configured maximum of {maxima[kind]} {kind}",
                param=f"ttc.params.{name}",
                code="strategy_param_above_maximum",
            )
    return params


def check_budget(raw: Mapping[str, Any], ceiling: Budget) -> Budget:
    """A request may lower the configured budget, never raise it."""
    try:
        asked = Budget.model_validate({**ceiling.model_dump(), **raw})
    except ValidationError as exc:
        raise InvalidRequest(f"bad 'ttc.budget': {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}; "
                             f"keys: max_total_tokens, max_calls, max_seconds", param="ttc.budget") from exc
    return Budget(
        max_total_tokens=min(asked.max_total_tokens, ceiling.max_total_tokens),
        max_calls=min(asked.max_calls, ceiling.max_calls),
        max_seconds=min(asked.max_seconds, ceiling.max_seconds),
    )


def _parse_logprobs(choice: Mapping[str, Any]) -> tuple[TokenLogprob, ...] | None:
    block = choice.get("logprobs")
    entries = block.get("content") if isinstance(block, dict) else None
    if not isinstance(entries, list):
        return None
    return tuple(_token_logprob(e) for e in entries if isinstance(e, dict))


def _token_logprob(entry: Mapping[str, Any]) -> TokenLogprob:
    top = entry.get("top_logprobs") or ()
    return TokenLogprob(
        token=str(entry.get("token", "")),
        logprob=float(entry.get("logprob", 0.0)),
        top=tuple((str(t.get("token", "")), float(t.get("logprob", 0.0))) for t in top if isinstance(t, dict)),
    )


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class RunContext:
    """Implements strategies.framework.StrategyContext over one backend."""

    def __init__(self, state: RunState, node: int = 0, sampling: Sampling | None = None) -> None:
        self._state = state
        self._node = node
        self._sampling = sampling if sampling is not None else state.sampling  # a nested run may reseed

    # ---- what the strategy reads ----

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._state.messages]

    @property
    def sampling(self) -> Sampling:
        return self._sampling

    def supports(self, capability: str) -> bool:
        return self._state.backend.capabilities.supports(capability)

    # ---- budget and bookkeeping ----

    def _check_budget(self) -> None:
        state = self._state
        if state.usage.calls >= state.budget.max_calls:
            raise BudgetExhausted(f"call budget of {state.budget.max_calls} backend calls is spent")
        if state.usage.total_tokens >= state.budget.max_total_tokens:
            raise BudgetExhausted(f"token budget of {state.budget.max_total_tokens} tokens is spent")
        if time.monotonic() >= state.deadline:
            raise BudgetExhausted(f"wall-time budget of {state.budget.max_seconds:g} s is spent")

    def _body(
        self,
        messages: Sequence[Mapping[str, Any]] | None,
        temperature: float | None,
        max_tokens: int | None,
        stop: str | list[str] | None,
        logprobs: bool,
        top_logprobs: int | None,
    ) -> dict[str, Any]:
        sampling = self._sampling
        body: dict[str, Any] = {**sampling.extra}
        body["model"] = self._state.model
        body["messages"] = list(messages) if messages is not None else self._state.messages
        chosen_temperature = temperature if temperature is not None else sampling.temperature
        if chosen_temperature is not None:
            body["temperature"] = chosen_temperature
        if sampling.top_p is not None:
            body["top_p"] = sampling.top_p
        body["max_tokens"] = max_tokens if max_tokens is not None else sampling.max_tokens
        chosen_stop = stop if stop is not None else sampling.stop
        if chosen_stop:
            body["stop"] = chosen_stop
        if logprobs or top_logprobs:
            self._require("logprobs")
            body["logprobs"] = True
            if top_logprobs:
                body["top_logprobs"] = min(top_logprobs, self._state.backend.capabilities.max_top_logprobs)
        return body

    def _require(self, capability: str) -> None:
        if not self.supports(capability):
            raise InvalidRequest(
                f"backend {self._state.backend.name!r} does not support {capability}, which this strategy needs",
                code="backend_capability_missing",
            )

    async def _call(self, body: dict[str, Any], n: int, seed: int | None, label: str) -> list[Candidate]:
        """One backend request drawing n choices; accounted and traced."""
        self._check_budget()
        state = self._state
        backend = state.backend
        body = dict(body)
        if n > 1:
            body["n"] = n
        if seed is not None:
            body["seed"] = seed
        asked_logprobs = bool(body.get("logprobs"))
        # llama-server's usage counts one choice only: the logprob entries count every choice exactly.
        count_from_logprobs = n > 1 and backend.capabilities.usage_counts_one_choice and backend.capabilities.logprobs
        if count_from_logprobs:
            body["logprobs"] = True
        node = state.trace.add(
            self._node, label, "call", n=n, seed=seed, temperature=body.get("temperature"),
            max_tokens=body.get("max_tokens"), status="running",
        )

        def start() -> None:
            # Checked again when the call gets its turn: calls that waited in the queue see what the calls
            # before them spent, so the token budget binds; only calls that really start are counted.
            self._check_budget()
            state.usage.calls += 1

        started = time.monotonic()
        try:
            async with asyncio.timeout_at(_loop_time_of(state.deadline)):
                payload = await backend.call_json("/chat/completions", body, owner=state.owner, cost=n,
                                                  request_id=state.request_id, on_start=start)
        except TimeoutError as exc:
            state.trace.update(node, status="timeout", ms=_ms_since(started))
            raise BudgetExhausted(f"wall-time budget of {state.budget.max_seconds:g} s is spent") from exc
        except ProxyError as exc:
            state.trace.update(node, status="error", error=exc.message, ms=_ms_since(started))
            raise
        except asyncio.CancelledError:
            state.trace.update(node, status="cancelled", ms=_ms_since(started))
            raise
        candidates, prompt_tokens, completion_tokens, estimated = await self._candidates(
            payload, n, seed, label, asked_logprobs
        )
        state.usage.prompt_tokens += prompt_tokens
        state.usage.completion_tokens += completion_tokens
        state.usage.estimated |= estimated
        state.trace.update(
            node, status="ok", ms=_ms_since(started), prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, outputs=[c.text[:TRACE_TEXT_LIMIT] for c in candidates],
        )
        return candidates

    async def _candidates(
        self, payload: Mapping[str, Any], n: int, seed: int | None, label: str, keep_logprobs: bool
    ) -> tuple[list[Candidate], int, int, bool]:
        backend = self._state.backend
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            raise StrategyFailed(f"backend {backend.name} answered without choices")
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        reported = int(usage.get("completion_tokens") or 0)
        parsed = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0)):
            message = choice.get("message") or {}
            parsed.append((message, choice.get("finish_reason"), _parse_logprobs(choice)))
        estimated = False
        logprob_counts = [len(lp) for _, _, lp in parsed if lp is not None]
        if len(parsed) == 1:
            counts, completion_tokens = [reported], reported
        elif len(logprob_counts) == len(parsed):
            counts = logprob_counts
            completion_tokens = sum(counts) if backend.capabilities.usage_counts_one_choice else reported
        elif backend.capabilities.usage_counts_one_choice:
            counts = []
            for message, _, _ in parsed:
                counted = await backend.count_tokens(_message_text(message))
                counts.append(counted if counted is not None else max(1, len(_message_text(message)) // 4))
            completion_tokens, estimated = sum(counts), True
        else:
            counts = [reported // len(parsed)] * len(parsed)
            counts[0] += reported - sum(counts)
            completion_tokens = reported
        candidates = [
            Candidate(
                text=_message_text(message),
                finish_reason=finish_reason,
                message=dict(message),
                completion_tokens=count,
                logprobs=logprobs if keep_logprobs else None,
                seed=seed + i if (seed is not None and len(parsed) > 1) else seed,
                label=label,
            )
            for i, ((message, finish_reason, logprobs), count) in enumerate(zip(parsed, counts))
        ]
        return candidates, prompt_tokens, completion_tokens, estimated

    async def _draw(self, body: dict[str, Any], n: int, label: str) -> list[Candidate]:
        """n unseeded samples in one call; if the backend refuses that n (a 400 that lowered the remembered
        cap, see Backend.lower_n_cap), draw them again in calls within the new cap."""
        try:
            return await self._call(body, n, None, label)
        except ProxyError as exc:
            cap = max(1, self._state.backend.capabilities.max_n)
            if exc.status_code != 400 or n <= cap:
                raise
        results = await asyncio.gather(
            *(self._draw(body, min(cap, n - start), label) for start in range(0, n, cap)), return_exceptions=True
        )
        candidates = [c for result in results if not isinstance(result, BaseException) for c in result]
        if not candidates:
            raise next(result for result in results if isinstance(result, BaseException))
        return candidates

    # ---- the StrategyContext interface ----

    async def generate(
        self,
        *,
        n: int = 1,
        messages: Sequence[dict[str, Any]] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        min_success: int = 1,
        label: str = "sample",
    ) -> list[Candidate]:
        if n < 1:
            return []
        body = self._body(messages, temperature, max_tokens, stop, logprobs, top_logprobs)
        base_seed = seed if seed is not None else self._sampling.seed
        if base_seed is not None:
            # Reproducible: sample i uses seed + i, so each is its own request.
            calls = [self._call(body, 1, base_seed + i, label) for i in range(n)]
        else:
            cap = max(1, self._state.backend.capabilities.max_n)
            sizes = [min(cap, n - start) for start in range(0, n, cap)]
            calls = [self._draw(body, size, label) for size in sizes]
        results = await asyncio.gather(*calls, return_exceptions=True)
        candidates: list[Candidate] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                errors.append(result)
            else:
                candidates.extend(result)
        if len(candidates) >= min_success:
            if errors:
                self.note(f"{label}_failures", [str(e) for e in errors])
            return candidates
        if not candidates and errors:
            raise errors[0]
        raise StrategyFailed(
            f"only {len(candidates)} of {n} {label}s succeeded; at least {min_success} needed"
            + (f"; first error: {errors[0]}" if errors else "")
        )

    async def continue_prefix(
        self,
        prefix: str,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        logprobs: bool = False,
        top_logprobs: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        label: str = "continue",
    ) -> Candidate:
        self._require("prefill")
        base = list(messages) if messages is not None else self._state.messages
        body = self._body([*base, {"role": "assistant", "content": prefix}], temperature, max_tokens, stop,
                          logprobs, top_logprobs)
        if self._state.backend.capabilities.kind == "vllm":
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        (candidate,) = await self._call(body, 1, seed if seed is not None else self._sampling.seed, label)
        text = candidate.text[len(prefix):] if candidate.text.startswith(prefix) else candidate.text
        return Candidate(text, candidate.finish_reason, candidate.message, candidate.completion_tokens,
                         candidate.logprobs, candidate.seed, label)

    async def stream(
        self,
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        top_logprobs: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        label: str = "stream",
    ) -> AsyncIterator[StreamEvent]:
        self._check_budget()
        state = self._state
        body = self._body(messages, temperature, max_tokens, stop, True, top_logprobs)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        chosen_seed = seed if seed is not None else self._sampling.seed
        if chosen_seed is not None:
            body["seed"] = chosen_seed
        node = state.trace.add(self._node, label, "stream", seed=chosen_seed, temperature=body.get("temperature"),
                               max_tokens=body["max_tokens"], status="running")
        state.usage.calls += 1
        started = time.monotonic()
        tokens = 0
        usage: dict[str, Any] | None = None
        text_parts: list[str] = []
        status = "cancelled"
        try:
            async with asyncio.timeout_at(_loop_time_of(state.deadline)):
                async with state.backend.stream("/chat/completions", body, owner=state.owner,
                                                request_id=state.request_id) as response:
                    async for data in _sse_data(response.aiter_lines()):
                        if isinstance(data.get("usage"), dict):
                            usage = data["usage"]
                        for choice in data.get("choices") or []:
                            delta = choice.get("delta") or {}
                            entries = _parse_logprobs(choice) or ()
                            text = delta.get("content") or ""
                            finish = choice.get("finish_reason")
                            if text:
                                text_parts.append(text)
                            tokens += len(entries) if entries else (1 if text else 0)
                            if len(entries) > 1:
                                for entry in entries:
                                    yield StreamEvent(entry.token, entry)
                                if finish:
                                    yield StreamEvent("", None, finish)
                            elif text or finish:
                                yield StreamEvent(text, entries[0] if entries else None, finish)
            status = "ok"
        except TimeoutError as exc:
            status = "timeout"
            raise BudgetExhausted(f"wall-time budget of {state.budget.max_seconds:g} s is spent") from exc
        except ProxyError as exc:
            status = "error"
            state.trace.update(node, error=exc.message)
            raise
        finally:
            prompt_tokens = int((usage or {}).get("prompt_tokens") or 0)
            completion_tokens = int((usage or {}).get("completion_tokens") or tokens) if status == "ok" else tokens
            state.usage.prompt_tokens += prompt_tokens
            state.usage.completion_tokens += completion_tokens
            state.trace.update(node, status=status, ms=_ms_since(started), prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens, outputs=["".join(text_parts)[:TRACE_TEXT_LIMIT]])

    async def verify(self, verifier: str, candidate: str, answer: str) -> bool:
        endpoint = self._state.verifiers.get(verifier)
        if endpoint is None:
            known = ", ".join(sorted(self._state.verifiers)) or "none configured"
            raise InvalidRequest(f"unknown verifier {verifier!r}; configured verifiers: {known}",
                                 param="ttc.params", code="unknown_verifier")
        question = next((_message_text(m) for m in reversed(self._state.messages) if m.get("role") == "user"), "")
        payload = {"question": question, "messages": self._state.messages, "candidate": candidate, "answer": answer}
        headers = {}
        key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        node = self._state.trace.add(self._node, "verify", "verifier", verifier=verifier, answer=answer)
        try:
            async with self._state.backend.client.post(
                endpoint.url, json=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=endpoint.timeout)
            ) as response:
                body = await response.json(content_type=None) if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self._state.trace.update(node, status="error", error=repr(exc))
            raise StrategyFailed(f"verifier {verifier!r} failed: {exc!r}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("pass"), bool):
            self._state.trace.update(node, status="error")
            raise StrategyFailed(f"verifier {verifier!r} must answer 200 with {{\"pass\": true|false}}")
        self._state.trace.update(node, status="ok", passed=body["pass"])
        return body["pass"]

    def for_model(self, model: str) -> "RunContext":
        if model == self._state.model:
            return self
        if self._state.backend_for is None:
            raise InvalidRequest(f"model {model!r} cannot be reached from this run", param="model")
        try:
            backend = self._state.backend_for(model)
        except NotFound as exc:
            raise InvalidRequest(exc.message, param="ttc.params", code="model_not_found") from exc
        # A shallow copy: usage, budget, trace and progress stay shared with this run.
        return RunContext(dataclasses.replace(self._state, backend=backend, model=model), self._node, self._sampling)

    async def progress(self, line: str) -> None:
        self._state.progress_lines.append(line)
        if self._state.progress_sink is not None:
            await self._state.progress_sink(line)

    def note(self, key: str, value: Any) -> None:
        self._state.trace.nodes[self._node].setdefault("notes", {})[key] = value

    async def run_strategy(self, slug: str, params: dict[str, Any] | None = None, *,
                           seed: int | None = None) -> StrategyResult:
        strategy = self._state.registry.get(slug)
        if strategy is None:
            raise InvalidRequest(f"unknown strategy {slug!r}; valid: {', '.join(sorted(self._state.registry))}")
        checked = check_params(strategy, params or {}, self._state.settings)
        for capability in strategy.requirements(checked):
            self._require(capability)
        sampling = dataclasses.replace(self._sampling, seed=seed) if seed is not None else self._sampling
        node = self._state.trace.add(self._node, slug, "strategy", params=checked.model_dump(),
                                     **({"seed": seed} if seed is not None else {}))
        return await strategy().run(RunContext(self._state, node, sampling), checked)


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            parsed = json.loads(data)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            if "error" in parsed:
                raise StrategyFailed(f"backend stream failed: {parsed['error']}")
            yield parsed


def _loop_time_of(monotonic_deadline: float) -> float:
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
