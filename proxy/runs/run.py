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
    Sampling,
    Strategy,
    StrategyError,
    StrategyInputError,
    StrategyParams,
    StrategyResult,
    StrategySpec,
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
from ..traces import Trace, TraceStore
from .accounting import BudgetScope
from .context import RunContext
from .state import RunState, Scope
from .sampling import SEED_SPACE
from .verifier import VerifierClient
from .watch import report_slow_calls

log = logging.getLogger("ttc_proxy.runs")

# Request fields that a strategy's backend calls never inherit as-is: the context sets them per call.
_NOT_FORWARDED_TO_STRATEGY_CALLS = frozenset({
    "model", "messages", "stream", "stream_options", "n", "ttc", "logprobs", "top_logprobs", "temperature",
    "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "user", "store", "metadata", "response_format",
})
_UNSUPPORTED_FEATURES = ("tools", "functions", "tool_choice")


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


def check_strategy_request(strategy: type[Strategy], request: ChatCompletionRequest, raw: Mapping[str, Any]) -> None:
    for feature in _UNSUPPORTED_FEATURES:
        value = raw.get(feature)
        if value not in (None, False, [], 0):
            raise InvalidRequest(
                f"strategy {strategy.slug!r} does not support {feature!r} (tool calls are not run by strategies); "
                f"send it without a strategy prefix",
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
    response_format = raw.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
        if kind not in ("text", "json_object", "json_schema") or (
                kind == "json_schema" and not (isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict))):
            raise InvalidRequest("response_format must be {type: text | json_object} or {type: json_schema, "
                                 "json_schema: {name, schema: {...}}}", param="response_format", code="invalid_value")
        if kind != "text" and not strategy.structured_output:
            raise InvalidRequest(f"strategy {strategy.slug!r} continues its reply from raw token ids, where the "
                                 f"engine applies no grammar: a {kind} response_format is not supported",
                                 param="response_format", code="unsupported_by_strategy")


def sampling_of(request: ChatCompletionRequest, raw: Mapping[str, Any], settings: StrategySettings) -> Sampling:
    return Sampling(
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=request.max_tokens or request.max_completion_tokens or settings.default_max_tokens,
        stop=request.stop,
        seed=request.seed % SEED_SPACE if request.seed is not None else None,
        extra={k: v for k, v in raw.items() if k not in _NOT_FORWARDED_TO_STRATEGY_CALLS},
        response_format=raw.get("response_format") if isinstance(raw.get("response_format"), dict) else None,
        top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
    )


class StrategyRun:
    """One strategy execution for one client request."""

    def __init__(self, job: StrategyRequest, settings: StrategySettings,
                 registry: Mapping[str, type[Strategy]], traces: TraceStore,
                 backend_for: Callable[[str], Backend] | None = None,
                 verifiers: VerifierClient | None = None,
                 pivot_sets: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> None:
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
        except ProxyError as exc:
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
        if result.budget_exhausted:
            await RunContext(self.state, self.scope).progress(
                f"budget exhausted ({self.budget.reason or 'a nested run ran out'}): answering with the best so far")
        self.trace.update(0, status="ok", ms=self._wall_ms(), details=result.details,
                          budget_exhausted=result.budget_exhausted, **self.budget.usage_attrs())
        return result

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
        answer_tokens = sum(c.completion_tokens for c in result.choices)
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
        if result.budget_exhausted:
            return "length"
        return choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"

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
                Choice(index=i, message=ResponseMessage(content=choice.text, reasoning_content=reasoning),
                       finish_reason=self.finish_reason(result, choice), logprobs=self.logprobs(choice))  # type: ignore[arg-type]
                for i, choice in enumerate(result.choices)
            ],
            usage=self.usage(result),
        )
        return {**_dump(response), "ttc": self.ttc_object(result)}

    def _chunk(self, delta: Delta, finish_reason: str | None = None, logprobs: ChoiceLogprobs | None = None,
               **extra: Any) -> bytes:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.job.client_model,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish_reason,  # type: ignore[arg-type]
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

        self.state.progress_sink = progress
        self.state.emit_sink = answer
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
            choice = result.answer
            emitted = self.state.emitted_text
            rest = choice.text[len(emitted):] if choice.text.startswith(emitted) else ""
            if emitted and not choice.text.startswith(emitted):
                log.warning("strategy %s emitted text its answer does not begin with", self.job.strategy.slug)
            logprobs = self.logprobs(choice)
            if rest or logprobs is not None:
                yield self._chunk(Delta(content=rest), logprobs=logprobs)
            yield self._chunk(Delta(), self.finish_reason(result, choice), ttc=self.ttc_object(result))
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
