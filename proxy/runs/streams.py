"""A run's streamed call: the engine's SSE chunks translated into the strategy's StreamEvents (tokens with their
logprobs, reasoning, the finish), budgeted, and charged for what was generated however the stream ends (finished,
closed early by the strategy, cut by the deadline, failed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from ttc_proxy.strategies.framework import BudgetExceeded, StreamEvent

from ..backends import Backend
from ..backends.quirks import adapt_call
from ..backends.stops import StreamedStopCutter, stop_strings
from ..errors import BackendConnectFailed, BackendInvalidResponse, ProxyError, StrategyFailed
from ..wire.sse import DONE, event_data, parse_chunk, sse_events
from .budgeted import BudgetedCall, cached_prompt_tokens, deadline
from .calls import CallPlan
from .sampling import TokenReader, logprob_entries
from .state import TRACE_TEXT_LIMIT, RunState, Scope, ms_since, prompt_key
from .watch import CallInFlight


class StreamTranslation:
    """One streamed reply's chunks as StreamEvents: the echoed prefix stripped, tokens read from their logprob
    entries, stop strings the engine leaves in cut, and the tokens and text so far counted as they are yielded."""

    def __init__(self, state: RunState, backend: Backend, chat: bool, body: Mapping[str, Any], echoed: str) -> None:
        self._state, self._backend, self._chat = state, backend, chat
        self._reader = TokenReader(backend.capabilities.merges_split_characters)
        stops = stop_strings(body) if backend.capabilities.stop_kept else []
        self._cutter = StreamedStopCutter(stops) if stops else None
        self._to_strip = echoed  # an echoed prefix arrives at the start of the stream's text: not ours to yield
        self.text_parts: list[str] = []
        self.tokens = 0

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def events(self, choice: Mapping[str, Any]) -> Iterator[StreamEvent]:
        delta = choice.get("delta") or {}
        text = (delta.get("content") if self._chat else choice.get("text")) or ""
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        finish = choice.get("finish_reason")
        text = self._strip_echo(text)
        entries = logprob_entries(choice) or []
        if reasoning:
            yield StreamEvent("", None, None, reasoning)
        if entries and finish and not text:
            # the stop token's own entry (vLLM lists <|im_end|>): counted, not part of the reply
            self.tokens += len(entries)
        elif entries:
            for entry in entries:
                token, piece = self._reader.read(entry)
                self.tokens += 1
                self.text_parts.append(piece)
                yield StreamEvent(piece, token)
        elif text:
            self.tokens += 1
            text = self._cutter.feed(0, text) if self._cutter is not None else text
            if text:
                self.text_parts.append(text)
                yield StreamEvent(text)
        if finish:
            yield from self._held_back()
            if self._cutter is not None and 0 in self._cutter.stopped:
                finish = "stop"
                self._state.adaptations.add(f"stop strings cut by the proxy: backend {self._backend.name} leaves "
                                            f"them in")
            yield StreamEvent("", None, finish)

    def end(self) -> Iterator[StreamEvent]:
        """A stream that ended without a finish: what was held back is still the reply's."""
        yield from self._held_back()

    def _held_back(self) -> Iterator[StreamEvent]:
        rest = self._cutter.flush(0) if self._cutter is not None else ""
        if rest:
            self.text_parts.append(rest)
            yield StreamEvent(rest)

    def _strip_echo(self, text: str) -> str:
        if self._to_strip and text:
            cut = min(len(self._to_strip), len(text))
            if text[:cut] == self._to_strip[:cut]:
                text, self._to_strip = text[cut:], self._to_strip[cut:]
            else:
                self._to_strip = ""
        return text


async def stream_call(state: RunState, scope: Scope, plan: CallPlan, seed: int | None) -> AsyncIterator[StreamEvent]:
    """One sample of the plan's body streamed from the engine; closing the iterator early aborts the call and is
    traced as a cut at the current offset."""
    backend, budget = scope.backend, scope.budget
    body = dict(plan.body)
    body["stream"] = True
    adapt_call(backend.capabilities, body, 1)
    body["stream_options"] = {"include_usage": True}
    if seed is not None:
        body["seed"] = seed
    budget.check()
    node = state.trace.add(scope.node, plan.label, "stream", endpoint=plan.path, seed=seed,
                           temperature=body.get("temperature"), max_tokens=body["max_tokens"], status="queued")
    started = time.monotonic()
    budgeted = BudgetedCall(state, budget, body, 1, node)
    waiting = state.calls_in_flight[node] = CallInFlight(backend, plan.label, started)
    translation = StreamTranslation(state, backend, plan.path == "/chat/completions", body, plan.echoed)
    usage: dict[str, Any] | None = None
    status = "cancelled"
    try:
        async with asyncio.timeout_at(deadline(budget)):
            async with backend.stream(plan.path, body, owner=state.owner, request_id=state.request_id,
                                      on_start=budgeted.on_start) as response:
                async for data in _sse_data(response.aiter_raw(), backend):
                    waiting.since = time.monotonic()  # a stream that delivers is not waiting
                    if isinstance(data.get("usage"), dict):
                        usage = data["usage"]
                    for choice in data.get("choices") or []:
                        for event in translation.events(choice):
                            yield event
                for event in translation.end():
                    yield event
        status = "ok"
    except TimeoutError as exc:
        status = "timeout"
        raise budget.expire() from exc
    except BudgetExceeded as exc:
        status = "refused"
        state.trace.update(node, reason=str(exc))
        raise
    except ProxyError as exc:
        status = "error"
        if isinstance(exc, BackendConnectFailed):
            budgeted.started = False  # no connection was made: nothing reached the engine, nothing to charge
        state.trace.update(node, error=exc.message)
        raise
    except GeneratorExit:
        # The strategy closed the stream on purpose (the backend call is aborted as the block unwinds).
        status = f"cut@{len(translation.text)}"
        raise
    finally:
        state.calls_in_flight.pop(node, None)
        budgeted.release()
        _settle(state, budgeted, body, usage, status, translation, node, started)


def _settle(state: RunState, budgeted: BudgetedCall, body: Mapping[str, Any], usage: Mapping[str, Any] | None,
            status: str, translation: StreamTranslation, node: int, started: float) -> None:
    """Charge and trace what a stream spent, however it ended."""
    estimated = False
    if usage is not None and usage.get("prompt_tokens") is not None:
        prompt_tokens = int(usage["prompt_tokens"])
        state.learn_prompt(prompt_key(body), prompt_tokens)
    elif budgeted.started:
        # Sent, and ended before the engine reported usage (cut, cancelled, timed out, broken off): the engine read
        # the prompt all the same. The same prompt's report from another call, else a character estimate (marked
        # as estimated).
        prompt_tokens, estimated = state.prompt_size(body)
    else:
        prompt_tokens = 0  # never sent: refused by the budget, or cancelled while it waited for a slot
    generated = translation.tokens
    completion_tokens = int((usage or {}).get("completion_tokens") or generated) if status == "ok" else generated
    if budgeted.started:
        budgeted.settle(prompt_tokens, completion_tokens, estimated=estimated,
                        cached_prompt_tokens=cached_prompt_tokens(usage or {}))
    state.trace.update(node, status=status, ms=ms_since(started), prompt_tokens=prompt_tokens,
                       completion_tokens=completion_tokens, outputs=[translation.text[:TRACE_TEXT_LIMIT]])


async def _sse_data(chunks: AsyncIterator[bytes], backend: Backend) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a backend's stream until `[DONE]`; an error event fails the call, and so does an event that is
    not a chunk (BackendInvalidResponse). What they quote has the backend's key blanked out."""
    async for lines in sse_events(chunks, backend.name):
        data = event_data(lines)
        if data is None:
            continue
        if data == DONE:
            return
        try:
            parsed = parse_chunk(data, backend.name)
        except BackendInvalidResponse as exc:
            raise backend.without_key_error(exc) from None
        if "error" in parsed:
            raise backend.without_key_error(StrategyFailed(f"backend stream failed: {parsed['error']}"))
        yield parsed
