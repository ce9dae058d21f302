"""Running a strategy for one chat request, and shaping its result as an OpenAI response or stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from strategies.framework import (
    Sampling,
    Strategy,
    StrategyError,
    StrategyInputError,
    StrategyParams,
    StrategyResult,
)

from .backends import Backend
from .config import Budget, StrategySettings, VerifierEndpoint
from .context import RunContext, RunState
from .errors import InvalidRequest, ProxyError, StrategyFailed
from .protocol import ChatCompletionRequest
from .traces import Trace, TraceStore

# Request fields that a strategy's backend calls never inherit as-is: the context sets them per call.
_NOT_FORWARDED_TO_STRATEGY_CALLS = frozenset({
    "model", "messages", "stream", "stream_options", "n", "ttc", "logprobs", "top_logprobs", "temperature",
    "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "user", "store", "metadata",
})
_UNSUPPORTED_FEATURES = ("tools", "functions", "tool_choice", "response_format", "logprobs", "top_logprobs")


@dataclass(frozen=True)
class StrategyRequest:
    """A validated strategy request: everything a run needs, owned by this request alone."""

    strategy: type[Strategy]
    params: StrategyParams
    budget: Budget
    request: ChatCompletionRequest
    raw_body: Mapping[str, Any]
    client_model: str
    backend: Backend
    backend_model: str
    request_id: str


def check_strategy_request(strategy: type[Strategy], request: ChatCompletionRequest, raw: Mapping[str, Any]) -> None:
    for feature in _UNSUPPORTED_FEATURES:
        value = raw.get(feature)
        if value not in (None, False, [], 0):
            raise InvalidRequest(
                f"strategy {strategy.slug!r} does not support {feature!r} yet; send it without a strategy prefix",
                param=feature,
                code="unsupported_by_strategy",
            )
    if (request.n or 1) > 1 and not strategy.multiple_choices:
        raise InvalidRequest(
            f"strategy {strategy.slug!r} returns one choice; n={request.n} is not supported "
            f"(the strategy's own sample count is a parameter, e.g. ttc params)",
            param="n",
            code="unsupported_by_strategy",
        )


def check_capabilities(strategy: type[Strategy], backend: Backend, params: StrategyParams) -> None:
    """The backend offers what the strategy needs with these parameters (checked before anything is sent)."""
    needed = strategy.requirements(params)
    missing = [c for c in sorted(needed) if not backend.capabilities.supports(c)]
    if missing:
        why = "; ".join(f"{c}: {needed[c]}" for c in missing if needed[c])
        raise InvalidRequest(
            f"strategy {strategy.slug!r} needs {', '.join(missing)}{f' ({why})' if why else ''}, which backend "
            f"{backend.name!r} ({backend.capabilities.kind}) does not offer; set its capabilities in config.yaml "
            f"if it does",
            param="ttc.params" if set(missing) - strategy.requires else "model",
            code="backend_capability_missing",
        )


def sampling_of(request: ChatCompletionRequest, raw: Mapping[str, Any], settings: StrategySettings) -> Sampling:
    return Sampling(
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=request.max_tokens or request.max_completion_tokens or settings.default_max_tokens,
        stop=request.stop,
        seed=request.seed,
        extra={k: v for k, v in raw.items() if k not in _NOT_FORWARDED_TO_STRATEGY_CALLS},
    )


class StrategyRun:
    """One strategy execution for one client request."""

    def __init__(self, job: StrategyRequest, settings: StrategySettings,
                 registry: Mapping[str, type[Strategy]], traces: TraceStore,
                 backend_for: Callable[[str], Backend] | None = None,
                 verifiers: Mapping[str, VerifierEndpoint] | None = None) -> None:
        self.job = job
        self.id = f"chatcmpl-ttc-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.trace = Trace(job.strategy.slug)
        traces.add(self.trace)
        self.state = RunState(
            backend=job.backend,
            model=job.backend_model,
            owner=job.request_id,
            request_id=job.request_id,
            sampling=sampling_of(job.request, job.raw_body, settings),
            messages=[m.model_dump(exclude_none=True) for m in job.request.messages],
            budget=job.budget,
            settings=settings,
            registry=registry,
            trace=self.trace,
            backend_for=backend_for,
            verifiers=verifiers or {},
        )
        self.trace.update(0, params=job.params.model_dump(), backend=job.backend.name, model=job.backend_model)

    async def execute(self) -> StrategyResult:
        try:
            try:
                result = await self.job.strategy().run(RunContext(self.state), self.job.params)
            except StrategyInputError as exc:
                raise InvalidRequest(str(exc), code="unsupported_by_strategy") from exc
            except StrategyError as exc:
                raise StrategyFailed(str(exc)) from exc
        except ProxyError as exc:
            self.trace.update(0, status="error", error=exc.message, ms=self._wall_ms())
            raise
        except asyncio.CancelledError:
            self.trace.update(0, status="cancelled", ms=self._wall_ms())
            raise
        self.trace.update(0, status="ok", ms=self._wall_ms(), details=result.details)
        return result

    def _wall_ms(self) -> float:
        return round((time.monotonic() - self.state.started) * 1000, 1)

    # ---- shaping the answer ----

    def usage(self, result: StrategyResult) -> dict[str, Any]:
        usage = self.state.usage
        answer_tokens = sum(c.completion_tokens for c in result.choices)
        return {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "completion_tokens_details": {"reasoning_tokens": max(0, usage.completion_tokens - answer_tokens)},
        }

    def ttc_object(self, result: StrategyResult | None) -> dict[str, Any]:
        usage = self.state.usage
        return {
            "strategy": self.job.strategy.slug,
            "params": self.job.params.model_dump(),
            "backend": self.job.backend.name,
            "backend_model": self.job.backend_model,
            "backend_calls": usage.calls,
            "wall_time_ms": self._wall_ms(),
            "trace_id": self.trace.id,
            "usage_estimated": usage.estimated,
            "details": result.details if result is not None else {},
        }

    def response_body(self, result: StrategyResult) -> dict[str, Any]:
        reasoning = "\n".join(self.state.progress_lines)
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.job.client_model,
            "choices": [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": choice.content,
                        "refusal": None,
                        "reasoning_content": reasoning,
                    },
                    "finish_reason": choice.finish_reason,
                    "logprobs": None,
                }
                for i, choice in enumerate(result.choices)
            ],
            "usage": self.usage(result),
            "ttc": self.ttc_object(result),
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.job.client_model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            **extra,
        }
        return sse(chunk)

    async def stream(self, keepalive_seconds: float) -> AsyncIterator[bytes]:
        """SSE: progress as reasoning_content, then the answer, then usage (if asked) and [DONE].

        The strategy runs in a task owned by this generator: closing the generator cancels it.
        """
        lines: asyncio.Queue[str] = asyncio.Queue()

        async def sink(line: str) -> None:
            lines.put_nowait(line)

        self.state.progress_sink = sink
        task = asyncio.create_task(self.execute())
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                getter = asyncio.ensure_future(lines.get())
                done, _ = await asyncio.wait({getter, task}, timeout=keepalive_seconds,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield self._chunk({"reasoning_content": getter.result() + "\n"})
                    continue
                getter.cancel()
                if task in done:
                    break
                yield b": keep-alive\n\n"
            while not lines.empty():
                yield self._chunk({"reasoning_content": lines.get_nowait() + "\n"})
            result = task.result()  # a failed run raises here; the stream response sends it as an error event
            answer = result.choices[0]
            yield self._chunk({"content": answer.content})
            yield self._chunk({}, answer.finish_reason, ttc=self.ttc_object(result))
            options = self.job.request.stream_options
            if options is not None and options.include_usage:
                yield sse({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.job.client_model, "choices": [], "usage": self.usage(result),
                })
            yield b"data: [DONE]\n\n"
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
