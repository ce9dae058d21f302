"""The proxy's side of the strategy interface: RunContext implements strategies.framework.StrategyContext.

One client request's run shares a RunState (trace, progress, accounting root, caches); each context is a view
onto it (`Scope`): which backend and model, which conversation, which trace node and span path, which budget
scope, and which strategy it runs over. Spans and nested runs are new scopes on the same state.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ttc_proxy.strategies.framework import (
    BudgetExceeded,
    BudgetView,
    Candidate,
    Sampling,
    Strategy,
    StrategyResult,
    StrategySpec,
    StreamEvent,
    Token,
    gather_successes,
)

from ..backends import Backend
from ..backends.stops import StreamedStopCutter, cut_stops_in_reply, stop_strings
from ..config import StrategySettings
from ..errors import BackendConnectFailed, BackendError, BackendInvalidResponse, InvalidRequest, NotFound, ProxyError, StrategyFailed
from ..sse import DONE, event_data, parse_chunk, sse_events
from ..traces import Trace
from .accounting import BudgetScope
from .sampling import (
    CallOptions,
    TokenReader,
    chat_body,
    completion_body,
    derive_seed,
    completion_counts,
    logprob_entries,
    make_candidate,
    parse_choices,
    sample_seed,
)
from .validation import check_capabilities, check_engine_fields, check_spec
from .verifier import VerifierClient

T = TypeVar("T")
TextSink = Callable[[str], Awaitable[None]]
# Sampling fields a parent may set for a nested run (run_strategy's `sampling`).
SAMPLING_OVERRIDES = ("temperature", "top_p", "max_tokens", "stop", "top_logprobs", "seed")
TRACE_TEXT_LIMIT = 2000


@dataclass
class RunState:
    """What one client request's run shares across all its contexts."""

    owner: str  # the scheduler's fairness unit: one client request
    request_id: str | None
    settings: StrategySettings
    registry: Mapping[str, type[Strategy]]
    trace: Trace
    verifiers: VerifierClient | None = None
    pivot_sets: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)  # config `pivots:`, by name
    # Resolves another model name to the backend serving it (None: only this run's backend is reachable).
    backend_for: Callable[[str], Backend] | None = None
    progress_sink: TextSink | None = None
    emit_sink: TextSink | None = None
    progress_lines: list[str] = field(default_factory=list)
    emitted: list[str] = field(default_factory=list)
    span_counts: dict[tuple[int, str], int] = field(default_factory=dict)
    rendered: dict[str, str] = field(default_factory=dict)  # render() results, per backend, model and conversation
    # How the run worked around what an engine lacks (ttc.details.adaptations): the client sees the degradation.
    adaptations: set[str] = field(default_factory=set)
    # Prompt tokens the engine reported per prompt, for calls cut before it could report (a pruned stream) and for
    # the budget's reservations; `prompt_overhead`: the most a report exceeded characters / 4 by (the template's own
    # tokens), added to the estimate of a prompt not seen yet.
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    prompt_overhead: int = 0
    counts: dict[str, float] = field(default_factory=dict)  # what the strategies counted (ctx.count), by name

    def learn_prompt(self, key: str, tokens: int) -> None:
        self.prompt_tokens[key] = tokens
        self.prompt_overhead = max(self.prompt_overhead, tokens - len(key) // 4)

    def prompt_size(self, body: Mapping[str, Any]) -> tuple[int, bool]:
        """A call's prompt tokens as the engine reported them for this prompt before, else a character estimate
        (True: estimated)."""
        key = prompt_key(body)
        known = self.prompt_tokens.get(key)
        return (known, False) if known is not None else (len(key) // 4 + self.prompt_overhead, True)

    @property
    def emitted_text(self) -> str:
        return "".join(self.emitted)


@dataclass(frozen=True)
class Scope:
    """Where a context stands: its backend, conversation, sampling, budget, trace node and composition."""

    backend: Backend
    model: str
    messages: list[dict[str, Any]]
    sampling: Sampling
    budget: BudgetScope
    node: int = 0
    path: tuple[str, ...] = ()  # span path, for derived seeds ("" at the top: sample i keeps seed + i)
    over: StrategySpec | None = None
    depth: int = 1  # strategy runs around and including this one
    fan_out: int = 1  # product of the fan-outs of the runs around this one
    emits: bool = True  # its emits reach the client (not in a nested run)


class RunContext:
    """Implements strategies.framework.StrategyContext over one backend."""

    def __init__(self, state: RunState, scope: Scope) -> None:
        self._state = state
        self._scope = scope

    # ---- what the strategy reads ----

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self._scope.messages]

    @property
    def sampling(self) -> Sampling:
        return self._scope.sampling

    @property
    def budget(self) -> BudgetView:
        return self._scope.budget.view()

    @property
    def over(self) -> StrategySpec | None:
        return self._scope.over

    @property
    def random_seed(self) -> int | None:
        seed = self._scope.sampling.seed
        if seed is None or not self._scope.path:
            return seed
        return derive_seed(seed, self._scope.path, -1)

    def supports(self, capability: str) -> bool:
        return self._scope.backend.capabilities.supports(capability)

    def _with(self, scope: Scope) -> RunContext:
        """A context on the same run at another scope (subclasses keep their kind)."""
        return RunContext(self._state, scope)

    def _require(self, capability: str, why: str = "") -> None:
        if not self.supports(capability):
            backend = self._scope.backend
            raise InvalidRequest(
                f"backend {backend.name!r} ({backend.capabilities.kind}) does not support {capability}"
                f"{f', which {why} needs' if why else ', which this strategy needs'}",
                code="backend_capability_missing",
            )

    def _options(self, temperature: float | None, max_tokens: int | None, logprobs: bool,
                 top_logprobs: int | None, stop: str | list[str] | None,
                 extra: Mapping[str, Any] | None, answers: bool = True) -> CallOptions:
        if logprobs or top_logprobs:
            self._require("logprobs")
        if extra:
            check_engine_fields(self._scope.backend, set(extra), "a strategy's call")
            if "logit_bias" in extra:
                self._require("logit_bias")
        return CallOptions(temperature, max_tokens, logprobs, top_logprobs, stop, extra, answers)

    # ---- calls ----

    def _deadline(self) -> float:
        loop = asyncio.get_running_loop()
        return loop.time() + (self._scope.budget.deadline - time.monotonic())

    async def _in_budget(self, work: Awaitable[T]) -> T:
        """Engine work outside the scheduler (tokenizer, template, verifier, the echo probe) ends at the deadline
        too."""
        try:
            async with asyncio.timeout_at(self._deadline()):
                return await work
        except TimeoutError as exc:
            raise self._scope.budget.expire() from exc

    async def _call(self, path: str, body: dict[str, Any], n: int, seed: int | None, label: str,
                    keep_tokens: bool, echoed: str = "") -> list[Candidate]:
        """One backend request drawing n choices; budgeted, accounted and traced."""
        scope = self._scope
        budget = scope.budget
        budget.check()
        backend = scope.backend
        chat = path == "/chat/completions"
        body = dict(body)
        if n > 1:
            body["n"] = n
        if seed is not None:
            body["seed"] = seed
        # llama-server's usage counts one choice only: the logprob entries count every choice exactly.
        if n > 1 and backend.capabilities.usage_counts_one_choice and backend.capabilities.logprobs:
            body["logprobs"] = True if chat else max(1, int(body.get("logprobs") or 1))
        _ask_token_ids(backend, body)
        state = self._state
        node = state.trace.add(scope.node, label, "call", endpoint=path, n=n, seed=seed,
                               temperature=body.get("temperature"), max_tokens=body.get("max_tokens"),
                               status="queued")

        started = time.monotonic()
        start = _Start(budget, state, node, body, n)
        try:
            try:
                async with asyncio.timeout_at(self._deadline()):
                    payload = await backend.call_json(path, body, owner=state.owner, cost=n,
                                                      request_id=state.request_id, on_start=start)
            except TimeoutError as exc:
                self._charge_unanswered(start, body, node)
                state.trace.update(node, status="timeout", ms=_ms_since(started))
                raise budget.expire() from exc
            except BudgetExceeded as exc:
                state.trace.update(node, status="refused", reason=str(exc))
                raise
            except ProxyError as exc:
                # an engine's error status says what it did not do; a connection never made sent nothing
                if not isinstance(exc, (BackendError, BackendConnectFailed)):
                    self._charge_unanswered(start, body, node)
                state.trace.update(node, status="error", error=exc.message, ms=_ms_since(started))
                raise
            except asyncio.CancelledError:
                self._charge_unanswered(start, body, node)
                state.trace.update(node, status="cancelled", ms=_ms_since(started))
                raise
            return await self._account(payload, body, n, seed, label, keep_tokens, echoed, node, started)
        finally:
            start.release()  # only once the real usage is charged: other calls always see one or the other

    def _charge_unanswered(self, start: _Start, body: dict[str, Any], node: int) -> None:
        """A call that was sent and ended with no reply to account (cut by the deadline, cancelled, timed out,
        broken off): the engine read its prompt all the same, counted as that prompt's earlier report, else
        estimated."""
        if not start.started:
            return
        prompt_tokens, estimated = self._state.prompt_size(body)
        self._scope.budget.charge(prompt_tokens=prompt_tokens, estimated=estimated)
        self._state.trace.update(node, prompt_tokens=prompt_tokens)

    async def _account(self, payload: dict[str, Any], body: dict[str, Any], n: int, seed: int | None, label: str,
                       keep_tokens: bool, echoed: str, node: int, started: float) -> list[Candidate]:
        """A finished call's choices as candidates, its usage charged and traced."""
        scope, state = self._scope, self._state
        backend, budget = scope.backend, scope.budget
        chat = "messages" in body
        if backend.capabilities.stop_kept and cut_stops_in_reply(payload, stop_strings(body)):
            state.adaptations.add(f"stop strings cut by the proxy: backend {backend.name} leaves them in")
        parsed = parse_choices(payload, chat)
        if not parsed:
            state.trace.update(node, status="error", error="no choices")
            raise StrategyFailed(f"backend {backend.name} answered without choices")
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        state.learn_prompt(prompt_key(body), prompt_tokens)
        reported = int(usage.get("completion_tokens") or 0)
        counts = completion_counts(parsed, reported, backend.capabilities.usage_counts_one_choice)
        estimated = counts is None
        if counts is None:
            counts = []
            for choice in parsed:
                try:
                    counts.append(len(await self._in_budget(backend.tokenize(scope.model, choice.text))))
                except ProxyError:
                    counts.append(max(1, len(choice.text) // 4))
        merges = backend.capabilities.kind == "llama_cpp"
        candidates = [
            make_candidate(choice, count, seed, label, merges, keep_tokens, echoed, prompt_tokens)
            for choice, count in zip(parsed, counts)
        ]
        budget.charge(prompt_tokens=prompt_tokens, completion_tokens=sum(counts), estimated=estimated,
                      cached_prompt_tokens=cached_prompt_tokens(usage))
        state.trace.update(node, status="ok", ms=_ms_since(started), prompt_tokens=prompt_tokens,
                           completion_tokens=sum(counts),
                           outputs=[c.text[:TRACE_TEXT_LIMIT] for c in candidates])
        return candidates

    async def _unseeded(self, path: str, body: dict[str, Any], n: int, label: str, keep_tokens: bool,
                    echoed: str) -> list[Candidate]:
        """n unseeded samples in one call; if the backend refuses that n (a 400 that lowered the remembered
        cap, see Backend.lower_n_cap), draw them again in calls within the new cap."""
        try:
            return await self._call(path, body, n, None, label, keep_tokens, echoed)
        except ProxyError as exc:
            cap = max(1, self._scope.backend.capabilities.max_n)
            if exc.status_code != 400 or n <= cap:
                raise
        parts, _ = await gather_successes(
            (lambda size=min(cap, n - start): self._unseeded(path, body, size, label, keep_tokens, echoed)
             for start in range(0, n, cap)), min_success=1, what=label)
        return [c for part in parts for c in part]

    async def _sample(self, path: str, body: dict[str, Any], n: int, seed: int | None, index: int,
                      min_success: int, label: str, keep_tokens: bool, echoed: str = "") -> list[Candidate]:
        """n samples of one body: seeded ones each their own call (sample index + i gets the request seed plus
        that at the top, a seed derived from the span path below it; an explicit seed is used as seed + i);
        unseeded ones in as few calls as the engine's n cap allows."""
        if n < 1:
            return []
        scope = self._scope
        if seed is not None or scope.sampling.seed is not None:
            seeds = ([seed + i for i in range(n)] if seed is not None
                     else [sample_seed(scope.sampling.seed, scope.path, index + i) for i in range(n)])
            calls = [
                (lambda s=s: self._call(path, body, 1, s, label, keep_tokens, echoed))
                for s in seeds
            ]
            sizes = [1] * n
        else:
            cap = max(1, scope.backend.capabilities.max_n)
            sizes = [min(cap, n - start) for start in range(0, n, cap)]
            if len(sizes) > 1:
                self._state.adaptations.add(f"samples drawn by concurrent calls of at most {cap}: backend "
                                            f"{scope.backend.name} takes n <= {cap}")
            calls = [
                (lambda size=size: self._unseeded(path, body, size, label, keep_tokens, echoed))
                for size in sizes
            ]
        parts, errors = await gather_successes(calls, min_success=max(1, min_success), what=label, sizes=sizes)
        candidates = [c for part in parts for c in part]
        if len(candidates) < min_success:  # a call gave fewer choices than it asked for
            raise StrategyFailed(f"only {len(candidates)} of {n} {label}s came back; at least {min_success} needed")
        if errors:
            self.note(f"{label}_failures", [str(e) for e in errors])
        return candidates

    # ---- the StrategyContext interface: generation ----

    async def generate(self, *, n: int = 1, messages: Sequence[dict[str, Any]] | None = None,
                       temperature: float | None = None, max_tokens: int | None = None, logprobs: bool = False,
                       top_logprobs: int | None = None, stop: str | list[str] | None = None,
                       seed: int | None = None, index: int = 0, min_success: int = 1, label: str = "sample",
                       extra: Mapping[str, Any] | None = None, answers: bool = True) -> list[Candidate]:
        scope = self._scope
        options = self._options(temperature, max_tokens, logprobs, top_logprobs, stop, extra, answers)
        body = chat_body(scope.model, messages if messages is not None else scope.messages, scope.sampling,
                         options, scope.backend.capabilities.max_top_logprobs)
        return await self._sample("/chat/completions", body, n, seed, index, min_success, label,
                                  self._keeps_tokens(options))

    def _keeps_tokens(self, options: CallOptions) -> bool:
        return bool(options.logprobs or options.top_logprobs
                    or options.request_top_logprobs(self._scope.sampling) is not None)

    async def complete(self, prompt: str | Sequence[int], *, n: int = 1, temperature: float | None = None,
                       max_tokens: int | None = None, logprobs: bool = False, top_logprobs: int | None = None,
                       stop: str | list[str] | None = None, seed: int | None = None, index: int = 0,
                       min_success: int = 1, label: str = "complete",
                       extra: Mapping[str, Any] | None = None) -> list[Candidate]:
        self._require("completions", "a raw completion")
        scope = self._scope
        options = self._options(temperature, max_tokens, logprobs, top_logprobs, stop, extra)
        body = completion_body(scope.model, prompt, scope.sampling, options,
                               scope.backend.capabilities.max_top_logprobs)
        return await self._sample("/completions", body, n, seed, index, min_success, label,
                                  self._keeps_tokens(options))

    async def continue_prefix(self, prefix: str | Sequence[int], *, n: int = 1,
                              messages: Sequence[dict[str, Any]] | None = None, temperature: float | None = None,
                              max_tokens: int | None = None, logprobs: bool = False,
                              top_logprobs: int | None = None, stop: str | list[str] | None = None,
                              seed: int | None = None, index: int = 0, min_success: int = 1,
                              label: str = "continue", extra: Mapping[str, Any] | None = None) -> list[Candidate]:
        scope = self._scope
        conversation = list(messages) if messages is not None else scope.messages
        if isinstance(prefix, str) and self.supports("prefill"):
            options = self._options(temperature, max_tokens, logprobs, top_logprobs, stop, extra)
            body, echoed = await self._prefill_body(conversation, prefix, options)
            return await self._sample("/chat/completions", body, n, seed, index, min_success, label,
                                      self._keeps_tokens(options), echoed)
        prompt = await self._raw_prompt(conversation, prefix)
        return await self.complete(prompt, n=n, temperature=temperature, max_tokens=max_tokens, logprobs=logprobs,
                                   top_logprobs=top_logprobs, stop=stop, seed=seed, index=index,
                                   min_success=min_success, label=label, extra=extra)

    async def _prefill_body(self, conversation: list[dict[str, Any]], prefix: str,
                            options: CallOptions) -> tuple[dict[str, Any], str]:
        """A chat body whose trailing assistant message is continued, and the text the engine will echo."""
        scope = self._scope
        backend = scope.backend
        body = chat_body(scope.model, [*conversation, {"role": "assistant", "content": prefix}], scope.sampling,
                         options, backend.capabilities.max_top_logprobs)
        # A grammar would constrain the continuation alone, not the reply it ends (raw completions never carry
        # response_format either); whole answers are checked against it afterwards.
        body.pop("response_format", None)
        if backend.capabilities.kind == "vllm":
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        scope.budget.check()  # before the echo probe, which may be the run's next call
        echoes, probe = await self._in_budget(backend.prefill_echoes(scope.model, self._state.owner))
        if probe is not None:  # this run asked the engine, once for the backend's lifetime: its call to count
            prompt, completion = int(probe.get("prompt_tokens") or 0), int(probe.get("completion_tokens") or 0)
            scope.budget.charge(calls=1, prompt_tokens=prompt, completion_tokens=completion)
            self._state.trace.add(scope.node, "echo probe", "call", status="ok", echoes=echoes,
                                  prompt_tokens=prompt, completion_tokens=completion)
        return body, prefix if echoes else ""

    async def _raw_prompt(self, conversation: list[dict[str, Any]], prefix: str | Sequence[int]) -> str | list[int]:
        """The rendered conversation followed by the prefix: text, or token ids when the prefix is ids."""
        self._require("completions", "continuing a prefix without prefill")
        rendered = await self.render(conversation)
        if self._scope.backend.config.chat_template is not None:
            self._state.adaptations.add(f"replies continued through /v1/completions with the configured chat "
                                        f"template: backend {self._scope.backend.name} has no prefill")
        if isinstance(prefix, str):
            return rendered + prefix
        self._require("tokenize", "continuing from token ids")
        ids = await self._in_budget(self._scope.backend.tokenize(self._scope.model, rendered))
        return [*ids, *prefix]

    async def stream(self, *, messages: Sequence[dict[str, Any]] | None = None,
                     prefix: str | Sequence[int] | None = None, temperature: float | None = None,
                     max_tokens: int | None = None, top_logprobs: int | None = None,
                     stop: str | list[str] | None = None, seed: int | None = None, index: int = 0,
                     label: str = "stream", extra: Mapping[str, Any] | None = None) -> AsyncIterator[StreamEvent]:
        scope, state = self._scope, self._state
        backend = scope.backend
        options = self._options(temperature, max_tokens, bool(top_logprobs) or self.supports("logprobs"),
                                top_logprobs, stop, extra)
        conversation = list(messages) if messages is not None else scope.messages
        echoed = ""
        if prefix is None:
            path = "/chat/completions"
            body = chat_body(scope.model, conversation, scope.sampling, options, backend.capabilities.max_top_logprobs)
        elif isinstance(prefix, str) and self.supports("prefill"):
            path = "/chat/completions"
            body, echoed = await self._prefill_body(conversation, prefix, options)
        else:
            path = "/completions"
            body = completion_body(scope.model, await self._raw_prompt(conversation, prefix), scope.sampling,
                                   options, backend.capabilities.max_top_logprobs)
        body["stream"] = True
        _ask_token_ids(backend, body)
        body["stream_options"] = {"include_usage": True}
        chosen_seed = seed if seed is not None else sample_seed(scope.sampling.seed, scope.path, index)
        if chosen_seed is not None:
            body["seed"] = chosen_seed
        budget = scope.budget
        budget.check()
        node = state.trace.add(scope.node, label, "stream", endpoint=path, seed=chosen_seed,
                               temperature=body.get("temperature"), max_tokens=body["max_tokens"], status="queued")

        started = time.monotonic()
        start = _Start(budget, state, node, body, 1)
        reader = TokenReader(backend.capabilities.kind == "llama_cpp")
        stops = stop_strings(body) if backend.capabilities.stop_kept else []
        cutter = StreamedStopCutter(stops) if stops else None
        usage: dict[str, Any] | None = None
        text_parts: list[str] = []
        tokens = 0
        status = "cancelled"
        to_strip = echoed  # an echoed prefix arrives at the start of the stream's text: not ours to yield
        try:
            async with asyncio.timeout_at(self._deadline()):
                async with backend.stream(path, body, owner=state.owner, request_id=state.request_id,
                                          on_start=start) as response:
                    async for data in _sse_data(response.aiter_raw(), backend):
                        if isinstance(data.get("usage"), dict):
                            usage = data["usage"]
                        for choice in data.get("choices") or []:
                            delta = choice.get("delta") or {}
                            text = (delta.get("content") if path == "/chat/completions" else choice.get("text")) or ""
                            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
                            finish = choice.get("finish_reason")
                            if to_strip and text:
                                cut = min(len(to_strip), len(text))
                                if text[:cut] == to_strip[:cut]:
                                    text, to_strip = text[cut:], to_strip[cut:]
                                else:
                                    to_strip = ""
                            entries = logprob_entries(choice) or []
                            if reasoning:
                                yield StreamEvent("", None, None, reasoning)
                            if entries and finish and not text:
                                # the stop token's own entry (vLLM lists <|im_end|>): counted, not part of the reply
                                tokens += len(entries)
                            elif entries:
                                for entry in entries:
                                    token, piece = reader.read(entry)
                                    tokens += 1
                                    text_parts.append(piece)
                                    yield StreamEvent(piece, token)
                            elif text:
                                tokens += 1
                                text = cutter.feed(0, text) if cutter is not None else text
                                if text:
                                    text_parts.append(text)
                                    yield StreamEvent(text)
                            if finish:
                                if cutter is not None:
                                    rest = cutter.flush(0)
                                    if rest:
                                        text_parts.append(rest)
                                        yield StreamEvent(rest)
                                    if 0 in cutter.stopped:
                                        finish = "stop"
                                        state.adaptations.add(f"stop strings cut by the proxy: backend "
                                                              f"{backend.name} leaves them in")
                                yield StreamEvent("", None, finish)
                    rest = cutter.flush(0) if cutter is not None else ""
                    if rest:  # a stream that ended without a finish: what was held back is still the reply's
                        text_parts.append(rest)
                        yield StreamEvent(rest)
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
                start.started = False  # no connection was made: nothing reached the engine, nothing to charge
            state.trace.update(node, error=exc.message)
            raise
        except GeneratorExit:
            # The strategy closed the stream on purpose (the backend call is aborted as the block unwinds).
            status = f"cut@{sum(len(p) for p in text_parts)}"
            raise
        finally:
            start.release()
            estimated = False
            if usage is not None and usage.get("prompt_tokens") is not None:
                prompt_tokens = int(usage["prompt_tokens"])
                state.learn_prompt(prompt_key(body), prompt_tokens)
            elif start.started:
                # Sent, and ended before the engine reported usage (cut, cancelled, timed out, broken off): the
                # engine read the prompt all the same. The same prompt's report from another call, else a
                # character estimate (marked as estimated).
                prompt_tokens, estimated = state.prompt_size(body)
            else:
                prompt_tokens = 0  # never sent: refused by the budget, or cancelled while it waited for a slot
            completion_tokens = int((usage or {}).get("completion_tokens") or tokens) if status == "ok" else tokens
            if start.started:
                budget.charge(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, estimated=estimated,
                              cached_prompt_tokens=cached_prompt_tokens(usage or {}))
            state.trace.update(node, status=status, ms=_ms_since(started), prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens,
                               outputs=["".join(text_parts)[:TRACE_TEXT_LIMIT]])

    # ---- raw prompts and tokens ----

    async def render(self, messages: Sequence[dict[str, Any]] | None = None, *,
                     add_generation_prompt: bool = True) -> str:
        self._require("render", "rendering the chat template")
        scope = self._scope
        conversation = list(messages) if messages is not None else scope.messages
        key = json.dumps([scope.backend.name, scope.model, conversation, add_generation_prompt], sort_keys=True)
        rendered = self._state.rendered.get(key)
        if rendered is None:
            rendered = await self._in_budget(scope.backend.render(scope.model, conversation, add_generation_prompt))
            self._state.rendered[key] = rendered
        return rendered

    async def tokenize(self, text: str) -> list[int]:
        self._require("tokenize")
        return await self._in_budget(self._scope.backend.tokenize(self._scope.model, text))

    async def detokenize(self, ids: Sequence[int]) -> str:
        self._require("tokenize")
        return await self._in_budget(self._scope.backend.detokenize(self._scope.model, ids))

    async def token_ids(self, tokens: Sequence[Token]) -> list[int]:
        """Runs of tokens without ids are tokenized together: their bytes may split a character between them."""
        ids: list[int] = []
        run: list[bytes] = []
        for token in [*tokens, None]:
            if token is None or token.id is not None:
                if run:
                    ids.extend(await self.tokenize(b"".join(run).decode("utf-8", "replace")))
                    run = []
                if token is not None:
                    ids.append(token.id)  # type: ignore[arg-type]
            else:
                run.append(token.bytes if token.bytes is not None else token.text.encode())
        return ids

    # ---- structure: spans, other models, nested runs ----

    def span(self, label: str, **attrs: Any) -> RunContext:
        scope, state = self._scope, self._state
        key = (scope.node, label)
        ordinal = state.span_counts.get(key, 0)
        state.span_counts[key] = ordinal + 1
        node = state.trace.add(scope.node, label, "span", **attrs)
        return self._with(replace(scope, node=node, path=(*scope.path, f"{label}#{ordinal}")))

    def for_model(self, model: str) -> RunContext:
        scope = self._scope
        if model == scope.model:
            return self
        if self._state.backend_for is None:
            raise InvalidRequest(f"model {model!r} cannot be reached from this run", param="model")
        try:
            backend = self._state.backend_for(model)
        except NotFound as exc:
            raise InvalidRequest(exc.message, param="ttc.params", code="model_not_found") from exc
        return self._with(replace(scope, backend=backend, model=backend.engine_model(model)))

    async def run_strategy(self, spec: StrategySpec | str, params: Mapping[str, Any] | None = None, *,
                           messages: Sequence[dict[str, Any]] | None = None,
                           budget: Mapping[str, float] | None = None,
                           sampling: Mapping[str, Any] | None = None) -> StrategyResult:
        if isinstance(spec, str):
            spec = StrategySpec(spec, dict(params or {}))
        elif params:
            spec = replace(spec, params={**spec.params, **params})
        scope, state = self._scope, self._state
        checked = check_spec(spec, state.registry, state.settings, depth=scope.depth, fan_out=scope.fan_out,
                             model=scope.model)
        for strategy_class, strategy_params in checked:
            check_capabilities(strategy_class, scope.backend, strategy_params)
        strategy, strategy_params = checked[0]
        key = (scope.node, spec.slug)
        ordinal = state.span_counts.get(key, 0)
        state.span_counts[key] = ordinal + 1
        child_budget = scope.budget.child(budget)
        node = state.trace.add(scope.node, spec.slug, "strategy", params=strategy_params.model_dump(),
                               **({"over": spec.over.describe()} if spec.over else {}),
                               **({"budget": dict(budget)} if budget else {}))
        child_sampling = scope.sampling
        if sampling:
            unknown = set(sampling) - set(SAMPLING_OVERRIDES)
            if unknown:
                raise ValueError(f"run_strategy: cannot replace sampling fields {sorted(unknown)}")
            if sampling.get("top_logprobs") is not None:
                self._require("logprobs", "scoring the nested run's samples")
            child_sampling = replace(child_sampling, **sampling)
        child = self._with(replace(
            scope, messages=list(messages) if messages is not None else scope.messages, budget=child_budget,
            sampling=child_sampling, emits=False,
            node=node, path=(*scope.path, f"{spec.slug}#{ordinal}"), over=spec.over, depth=scope.depth + 1,
            fan_out=scope.fan_out * max(1, strategy.fan_out(strategy_params)),
        ))
        started = time.monotonic()
        try:
            result = await strategy().run(child, strategy_params)
        except BaseException as exc:
            state.trace.update(node, status="cancelled" if isinstance(exc, asyncio.CancelledError) else "error",
                               error=str(exc), ms=_ms_since(started), **child_budget.usage_attrs())
            raise
        result.usage = child_budget.usage
        result.budget_exhausted = result.budget_exhausted or child_budget.exhausted
        state.trace.update(node, status="ok", ms=_ms_since(started), budget_exhausted=result.budget_exhausted,
                           answer=result.answer.text[:TRACE_TEXT_LIMIT] if result.choices else None,
                           **child_budget.usage_attrs())
        return result

    # ---- reporting ----

    async def progress(self, line: str) -> None:
        line = "  " * (self._scope.depth - 1) + line  # a nested run's lines sit under its parent's
        self._state.progress_lines.append(line)
        if self._state.progress_sink is not None:
            await self._state.progress_sink(line)

    async def emit(self, text: str) -> None:
        if not text or not self._scope.emits:
            return
        self._state.emitted.append(text)
        if self._state.emit_sink is not None:
            await self._state.emit_sink(text)

    def note(self, key: str, value: Any) -> None:
        self._state.trace.nodes[self._scope.node].setdefault("notes", {})[key] = value

    def count(self, event: str, amount: float = 1) -> None:
        self._state.counts[event] = self._state.counts.get(event, 0) + amount

    def pivots(self, name: str) -> Sequence[Mapping[str, Any]]:
        records = self._state.pivot_sets.get(name)
        if records is None:
            known = ", ".join(sorted(self._state.pivot_sets)) or "none configured"
            raise InvalidRequest(f"unknown pivot set {name!r}; configured pivot sets: {known}", param="ttc.params",
                                 code="unknown_pivots")
        return records

    async def verify(self, verifier: str, candidate: str, answer: str) -> bool:
        state = self._state
        if state.verifiers is None:
            raise InvalidRequest(f"unknown verifier {verifier!r}; no verifiers are configured",
                                 param="ttc.params", code="unknown_verifier")
        node = state.trace.add(self._scope.node, "verify", "verifier", verifier=verifier, answer=answer)
        try:
            passed = await self._in_budget(state.verifiers.verify(verifier, self._scope.messages, candidate, answer))
        except Exception as exc:
            state.trace.update(node, status="error", error=str(exc))
            raise
        state.trace.update(node, status="ok", passed=passed)
        return passed


class _Start:
    """Run when a call gets its scheduler slot (`on_start`): the budget is checked again (calls that waited see
    what the calls before them spent), the call's worst case (prompt + n × max_tokens) is reserved in the token
    budget, its max_tokens cut to what is left, and only calls that really start are counted."""

    def __init__(self, budget: BudgetScope, state: RunState, node: int, body: dict[str, Any], n: int) -> None:
        self._budget, self._state, self._node, self._body, self._n = budget, state, node, body, n
        self._reserved = 0
        self.started = False  # it got its slot and passed the budget: it is sent

    def __call__(self) -> None:
        prompt, _ = self._state.prompt_size(self._body)  # now: a call that ran meanwhile may have reported it
        asked = int(self._body["max_tokens"])
        granted = self._budget.reserve(prompt, asked, self._n)
        self._reserved = prompt + self._n * granted
        self._budget.charge(calls=1)
        self.started = True
        if granted < asked:
            self._body["max_tokens"] = granted
        self._state.trace.update(self._node, status="running",
                                 **({"max_tokens": granted} if granted < asked else {}))

    def release(self) -> None:
        if self._reserved:
            self._budget.release(self._reserved)
            self._reserved = 0


def cached_prompt_tokens(usage: Mapping[str, Any]) -> int:
    """Prompt tokens the engine says it served from its prefix cache (OpenAI's usage.prompt_tokens_details,
    which llama-server and vLLM fill too); 0 when it does not say."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and cached > 0 else 0


def prompt_key(body: Mapping[str, Any]) -> str:
    return json.dumps(body.get("messages", body.get("prompt")), sort_keys=True)


def _ask_token_ids(backend: Backend, body: dict[str, Any]) -> None:
    """vLLM names sampled tokens by id ("token_id:42") only when asked; the text then comes from their bytes,
    which only its chat logprobs carry (its legacy completions logprobs have none), so chat calls only."""
    if backend.capabilities.kind == "vllm" and body.get("logprobs") and "messages" in body:
        body["return_tokens_as_token_ids"] = True


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


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
