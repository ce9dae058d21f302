"""Running a strategy for one chat request, and shaping its result as an OpenAI response or stream."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ttc_proxy.strategies.framework import (
    BudgetExceeded,
    Candidate,
    Strategy,
    StrategyError,
    StrategyInputError,
    StrategyParams,
    StrategyResult,
    StrategySpec,
    with_thinking_apart,
)

from ..backends import Backend
from ..config import Budget, StrategySettings
from ..errors import BackendDown, BudgetExhausted, InvalidRequest, Overloaded, ProxyError, StrategyFailed
from ..wire.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    CompletionTokensDetails,
    PromptTokensDetails,
    Delta,
    ResponseMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from ..traces import Trace, TraceObserver, TraceStore
from .accounting import BudgetScope
from .context import RunContext
from .state import RunState, Scope
from .admission import sampling_of
from .verifier import VerifierClient
from .watch import report_slow_calls

log = logging.getLogger("ttc_proxy.runs")

@dataclass(frozen=True)
class StrategyRequest:
    """A validated strategy request: everything a run needs, owned by this request alone."""

    spec: StrategySpec
    strategy: type[Strategy]
    params: StrategyParams
    budget: Budget
    request: ChatCompletionRequest
    raw_body: Mapping[str, Any]
    client_model: str
    backend: Backend
    backend_model: str
    request_id: str
    key_id: str | None = None  # the proxy key that asked (its id): its trace is readable with that key alone


class StrategyRun:
    """One strategy execution for one client request."""

    def __init__(self, job: StrategyRequest, settings: StrategySettings,
                 registry: Mapping[str, type[Strategy]], traces: TraceStore,
                 backend_for: Callable[[str], Backend] | None = None,
                 verifiers: VerifierClient | None = None,
                 pivot_sets: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                 trace_observer: TraceObserver | None = None) -> None:
        self.job = job
        self.id = f"chatcmpl-ttc-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.trace = Trace(job.strategy.slug, owner=job.key_id)
        self.traces = traces
        self.state = RunState(owner=job.request_id, request_id=job.request_id, settings=settings,
                              registry=registry, trace=self.trace, verifiers=verifiers, backend_for=backend_for,
                              pivot_sets=pivot_sets or {})
        self.budget = BudgetScope(job.budget)
        self.scope = Scope(
            backend=job.backend, model=job.backend_model,
            messages=[m.model_dump(exclude_none=True) for m in job.request.messages],
            sampling=sampling_of(job.request, job.raw_body, settings), budget=self.budget,
            over=job.spec.over, fan_out=max(1, job.strategy.fan_out(job.params)),
        )
        self.trace.update(0, params=job.params.model_dump(), backend=job.backend.name, model=job.backend_model,
                          **({"over": job.spec.over.describe()} if job.spec.over else {}))
        if trace_observer is not None:
            self.trace.observe(trace_observer)
        self.result: StrategyResult | None = None
        self.budget_exhausted = False

    async def execute(self) -> StrategyResult:
        await self.traces.save(self.trace)  # readable while it runs
        threshold = self.state.settings.slow_call_seconds
        watch = asyncio.create_task(report_slow_calls(
            self.state.calls_in_flight, lambda node: str(self.trace.nodes[node].get("status")), threshold,
            RunContext(self.state, self.scope).progress)) if threshold > 0 else None
        try:
            return await self._execute()
        finally:  # a cancelled run's too: the store's writer finishes a write its saver stopped waiting for
            if watch is not None:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            await self.traces.save(self.trace)

    async def _execute(self) -> StrategyResult:
        try:
            try:
                result = await self.job.strategy().run(RunContext(self.state, self.scope), self.job.params)
            except BudgetExceeded as exc:
                raise BudgetExhausted(f"{exc}; the strategy had no answer yet") from exc
            except StrategyInputError as exc:
                raise InvalidRequest(str(exc), code="unsupported_by_strategy") from exc
            except StrategyError as exc:
                cause = exc.__cause__
                if isinstance(cause, ProxyError) and 400 <= cause.status_code < 500:
                    raise cause from exc
                raise StrategyFailed(str(exc)) from exc
            if not result.choices:
                raise StrategyFailed(f"strategy {self.job.strategy.slug!r} returned no answer")
            result.choices = await self._thinking_apart(result.choices)
        except ProxyError as exc:
            self.budget_exhausted = isinstance(exc, BudgetExhausted)
            self.trace.update(0, status="error", error=exc.message, ms=self._wall_ms(), **self.budget.usage_attrs())
            if not isinstance(exc, (Overloaded, BackendDown)):  # capacity, for now; anything else would repeat
                exc.not_to_be_retried()
            raise
        except asyncio.CancelledError:
            self.trace.update(0, status="cancelled", ms=self._wall_ms(), **self.budget.usage_attrs())
            raise
        result.usage = self.budget.usage
        result.budget_exhausted = (result.budget_exhausted or self.budget.exhausted
                                   or any(c.budget_exhausted for c in result.choices))
        self.result = result
        self.budget_exhausted = result.budget_exhausted
        if result.budget_exhausted:
            await RunContext(self.state, self.scope).progress(
                f"budget exhausted ({self.budget.reason or 'a nested run ran out'}): answering with the best so far")
        self.trace.update(0, status="ok", ms=self._wall_ms(), details=result.details,
                          budget_exhausted=result.budget_exhausted, **self.budget.usage_attrs())
        return result

    async def _thinking_apart(self, choices: Sequence[Candidate]) -> list[Candidate]:
        """The answers without their inline thinking (with_thinking_apart: a strategy's own stream of an engine's
        tokens keeps it in the text), and the model's thinking behind each shown as progress, unless it streamed
        to the client as the answer was emitted. The one place the client is shown a reply's thinking."""
        streamed = self.state.thinking_sink is not None and bool(self.state.emitted_thinking)
        apart = [with_thinking_apart(choice) for choice in choices]
        for index, choice in enumerate(apart):
            if choice.thinking and not (index == 0 and streamed):
                label = "the chosen reply's thinking" if len(apart) == 1 else f"choice {index}'s thinking"
                await RunContext(self.state, self.scope).progress(f"{label}: {choice.thinking}")
        return apart

    def observations(self) -> dict[str, Any]:
        """For the metrics, once the run has ended: its tokens by kind, whether its budget ran out, and what its
        strategies counted."""
        usage = self.budget.usage
        answer_tokens = sum(c.completion_tokens - c.thinking_tokens for c in self.result.choices) \
            if self.result is not None else 0
        return {
            "tokens": {"prompt": usage.prompt_tokens, "cached": usage.cached_prompt_tokens,
                       "completion": usage.completion_tokens,
                       "reasoning": max(0, usage.completion_tokens - answer_tokens) if self.result is not None else 0},
            "budget_exhausted": self.budget_exhausted,
            "events": dict(self.state.counts),
        }

    def access_fields(self) -> dict[str, Any]:
        """For the access log: the composition that ran and what it spent."""
        usage = self.budget.usage
        return {"strategy": self.job.spec.describe(), "backend_calls": usage.calls,
                "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}

    def _wall_ms(self) -> float:
        return round((time.monotonic() - self.budget.started) * 1000, 1)

    # ---- shaping the answer ----

    def usage(self, result: StrategyResult) -> UsageInfo:
        usage = self.budget.usage
        answer_tokens = sum(c.completion_tokens - c.thinking_tokens for c in result.choices)
        return UsageInfo(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
            completion_tokens_details=CompletionTokensDetails(
                reasoning_tokens=max(0, usage.completion_tokens - answer_tokens)),
        )

    def ttc_object(self, result: StrategyResult | None) -> dict[str, Any]:
        usage = self.budget.usage
        return {
            "strategy": self.job.strategy.slug,
            "params": self.job.params.model_dump(),
            **({"over": self.job.spec.over.describe()} if self.job.spec.over else {}),
            "backend": self.job.backend.name,
            "backend_model": self.job.backend_model,
            "backend_calls": usage.calls,
            "wall_time_ms": self._wall_ms(),
            "trace_id": self.trace.id,
            "usage_estimated": usage.estimated,
            "budget_exhausted": bool(result is not None and result.budget_exhausted),
            "details": {**(result.details if result is not None else {}),
                        **({"adaptations": sorted(self.state.adaptations)} if self.state.adaptations else {})},
        }

    @staticmethod
    def finish_reason(result: StrategyResult, choice: Candidate) -> str:
        if choice.tool_calls:
            return "tool_calls"  # the calls are whole: the client runs them, whatever else ran out
        if result.budget_exhausted:
            return "length"
        return choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"

    def tool_calls(self, choice: Candidate) -> list[dict[str, Any]] | None:
        """The answer's tool calls in OpenAI's shape, each with an id (the engine's, else one of ours)."""
        if not choice.tool_calls:
            return None
        return [{"id": call.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}} for call in choice.tool_calls]

    def logprobs(self, choice: Candidate) -> ChoiceLogprobs | None:
        """The returned answer's own tokens, when the request asked for logprobs."""
        top = self.scope.sampling.top_logprobs
        if top is None:
            return None
        entries = [
            TokenLogprob(token=t.text, logprob=_finite(t.logprob),
                         bytes=list(t.bytes) if t.bytes is not None else None,
                         top_logprobs=[TopLogprob(token=a.text, logprob=_finite(a.logprob),
                                                  bytes=list(a.bytes) if a.bytes is not None else None)
                                       for a in t.top[:top]])
            for t in choice.answer_tokens or ()
        ]
        return ChoiceLogprobs(content=entries)

    def response_body(self, result: StrategyResult) -> dict[str, Any]:
        reasoning = "\n".join(self.state.progress_lines)
        response = ChatCompletionResponse(
            id=self.id, created=self.created, model=self.job.client_model,
            choices=[
                Choice(index=i, message=ResponseMessage(content=choice.text or (None if choice.tool_calls else ""),
                                                        reasoning_content=reasoning,
                                                        tool_calls=self.tool_calls(choice)),
                       finish_reason=self.finish_reason(result, choice), logprobs=self.logprobs(choice))  # type: ignore[arg-type]
                for i, choice in enumerate(result.choices)
            ],
            usage=self.usage(result),
        )
        return {**_dump(response), "ttc": self.ttc_object(result)}

    def _chunk(self, delta: Delta, finish_reason: str | None = None, logprobs: ChoiceLogprobs | None = None,
               index: int = 0, **extra: Any) -> bytes:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.job.client_model,
                                    choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish_reason,  # type: ignore[arg-type]
                                                         logprobs=logprobs)])
        return sse({**_dump(chunk, drop=("usage",)), **extra})

    async def stream(self, keepalive_seconds: float) -> AsyncIterator[bytes]:
        """SSE: progress as reasoning_content, the answer as content (as soon as the strategy emits it, the rest
        at the end), then usage (if asked) and [DONE].

        The strategy runs in a task owned by this generator: closing the generator cancels it.
        """
        events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        async def progress(line: str) -> None:
            events.put_nowait(("reasoning_content", line + "\n"))

        async def answer(text: str) -> None:
            events.put_nowait(("content", text))

        async def thinking(text: str) -> None:
            events.put_nowait(("reasoning_content", text))

        self.state.progress_sink = progress
        self.state.emit_sink = answer
        self.state.thinking_sink = thinking
        task = asyncio.create_task(self.execute())
        getter: asyncio.Future[tuple[str, str]] | None = None
        try:
            yield self._chunk(Delta(role="assistant", content=""))
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, timeout=keepalive_seconds,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    field, text = getter.result()
                    yield self._chunk(Delta(**{field: text}))
                    continue
                getter.cancel()
                if task in done:
                    break
                yield b": keep-alive\n\n"
            while not events.empty():
                field, text = events.get_nowait()
                yield self._chunk(Delta(**{field: text}))
            result = task.result()  # a failed run raises here; the stream response sends it as an error event
            for index, choice in enumerate(result.choices):
                # Only the first choice can have been emitted while the run went on; the others start here.
                emitted = self.state.emitted_text if index == 0 else ""
                rest = choice.text[len(emitted):] if choice.text.startswith(emitted) else ""
                if emitted and not choice.text.startswith(emitted):
                    log.warning("strategy %s emitted text its answer does not begin with", self.job.strategy.slug)
                if index > 0:
                    yield self._chunk(Delta(role="assistant", content=""), index=index)
                logprobs = self.logprobs(choice)
                if rest or logprobs is not None:
                    yield self._chunk(Delta(content=rest), logprobs=logprobs, index=index)
                calls = self.tool_calls(choice)
                for position, call in enumerate(calls or ()):
                    # One delta per call, whole: the SDKs assemble calls by `index`, which is all they need.
                    yield self._chunk(Delta(tool_calls=[{"index": position, **call}]), index=index)
                last = index == len(result.choices) - 1
                yield self._chunk(Delta(), self.finish_reason(result, choice), index=index,
                                  **({"ttc": self.ttc_object(result)} if last else {}))
            options = self.job.request.stream_options
            if options is not None and options.include_usage:
                yield sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.job.client_model, "choices": [], "usage": _dump(self.usage(result))})
            yield b"data: [DONE]\n\n"
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


# JSON has no infinities; some engines report a logprob of -inf for an impossible alternative (vLLM's floor).
LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def _dump(model: BaseModel, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A response model as JSON data: unset optional vendor fields (reasoning_content, logprobs' refusal) left out,
    the spec's required nullable fields (refusal, logprobs, finish_reason) kept as null."""
    data = model.model_dump(mode="json", exclude=set(drop))
    _prune(data)
    return data


_KEEP_NULL = {"refusal", "logprobs", "finish_reason", "content"}


def _prune(node: Any) -> None:
    if isinstance(node, dict):
        for key in [k for k, v in node.items() if v is None and k not in _KEEP_NULL]:
            del node[key]
        for value in node.values():
            _prune(value)
    elif isinstance(node, list):
        for value in node:
            _prune(value)


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
