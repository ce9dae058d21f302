"""The proxy's side of the strategy interface: RunContext implements strategies.framework.StrategyContext.

A context is a view onto its run's state (state.RunState) at a scope (state.Scope). It builds each call's body from
the run's sampling and the call's options, and hands it to the budgeted calls (calls.py) or the stream
(streams.py); spans and nested runs are contexts at new scopes on the same state.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from ttc_proxy.strategies.framework import (
    BudgetView,
    CallOptions,
    Candidate,
    Sampling,
    StrategyResult,
    StrategySpec,
    StreamEvent,
    Token,
)

from ..backends.quirks import adapt_prefill
from ..errors import InvalidRequest, NotFound
from .budgeted import in_budget
from .calls import CallPlan, sample
from .sampling import chat_body, completion_body, derive_seed, sample_seed
from .state import TRACE_TEXT_LIMIT, RunState, Scope, ms_since
from .streams import stream_call
from .validation import check_capabilities, check_engine_fields, check_request_fits, check_spec

# Sampling fields a parent may set for a nested run (run_strategy's `sampling`).
SAMPLING_OVERRIDES = ("temperature", "top_p", "max_tokens", "stop", "top_logprobs", "seed")
NESTED_LINE_LIMIT = 160  # characters of a nested run's progress line


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
        """A context on the same run at another scope."""
        return RunContext(self._state, scope)

    def _require(self, capability: str, why: str = "") -> None:
        if not self.supports(capability):
            backend = self._scope.backend
            raise InvalidRequest(
                f"backend {backend.name!r} ({backend.capabilities.kind}) does not support {capability}"
                f"{f', which {why} needs' if why else ', which this strategy needs'}",
                code="backend_capability_missing",
            )

    def _check(self, options: CallOptions) -> None:
        """Refuse options the backend cannot honour, before anything is sent."""
        if options.logprobs or options.top_logprobs:
            self._require("logprobs")
        if options.extra:
            check_engine_fields(self._scope.backend, set(options.extra), "a strategy's call")
            if "logit_bias" in options.extra:
                self._require("logit_bias")

    def _plan(self, path: str, body: dict[str, Any], label: str, options: CallOptions,
              echoed: str = "") -> CallPlan:
        return CallPlan(path, body, label, options.keeps_tokens(self._scope.sampling), echoed)

    # ---- generation ----

    async def generate(self, options: CallOptions = CallOptions(), *, n: int = 1,
                       messages: Sequence[dict[str, Any]] | None = None, index: int = 0, min_success: int = 1,
                       label: str = "sample") -> list[Candidate]:
        scope, state = self._scope, self._state
        if state.sample_source is not None:
            served = await state.sample_source.generate(state, scope, options, n, messages, index, min_success)
            if served is not None:
                return served
        self._check(options)
        body = chat_body(scope.model, messages if messages is not None else scope.messages, scope.sampling,
                         options, scope.backend.capabilities.max_top_logprobs)
        plan = self._plan("/chat/completions", body, label, options)
        return await sample(state, scope, plan, n, options.seed, index, min_success)

    async def complete(self, prompt: str | Sequence[int], options: CallOptions = CallOptions(), *, n: int = 1,
                       index: int = 0, min_success: int = 1, label: str = "complete") -> list[Candidate]:
        self._require("completions", "a raw completion")
        scope = self._scope
        self._check(options)
        body = completion_body(scope.model, prompt, scope.sampling, options,
                               scope.backend.capabilities.max_top_logprobs)
        plan = self._plan("/completions", body, label, options)
        return await sample(self._state, scope, plan, n, options.seed, index, min_success)

    async def continue_prefix(self, prefix: str | Sequence[int], options: CallOptions = CallOptions(), *,
                              n: int = 1, messages: Sequence[dict[str, Any]] | None = None, index: int = 0,
                              min_success: int = 1, label: str = "continue") -> list[Candidate]:
        scope = self._scope
        conversation = list(messages) if messages is not None else scope.messages
        if isinstance(prefix, str) and self.supports("prefill"):
            self._check(options)
            body, echoed = await self._prefill_body(conversation, prefix, options)
            plan = self._plan("/chat/completions", body, label, options, echoed)
            return await sample(self._state, scope, plan, n, options.seed, index, min_success)
        prompt = await self._raw_prompt(conversation, prefix)
        return await self.complete(prompt, options, n=n, index=index, min_success=min_success, label=label)

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
        adapt_prefill(backend.capabilities, body)
        scope.budget.check()  # before the echo probe, which may be the run's next call
        echoes, probe = await in_budget(scope.budget, backend.prefill_echoes(scope.model, self._state.owner))
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
        return [*await self.tokenize(rendered), *prefix]

    async def stream(self, options: CallOptions = CallOptions(), *, messages: Sequence[dict[str, Any]] | None = None,
                     prefix: str | Sequence[int] | None = None, index: int = 0,
                     label: str = "stream") -> AsyncIterator[StreamEvent]:
        scope, state = self._scope, self._state
        # A stream always carries its tokens' logprobs where the engine gives them.
        options = replace(options, logprobs=bool(options.top_logprobs) or self.supports("logprobs"))
        served = (state.sample_source.stream(state, scope, options, messages, prefix, index)
                  if state.sample_source is not None else None)
        if served is None:
            self._check(options)
            plan = await self._stream_plan(options, messages, prefix, label)
            seed = options.seed if options.seed is not None else sample_seed(scope.sampling.seed, scope.path, index)
            served = stream_call(state, scope, plan, seed)
        async with aclosing(served) as events:  # closing this stream closes the call's at once (it aborts it)
            async for event in events:
                yield event

    async def _stream_plan(self, options: CallOptions, messages: Sequence[dict[str, Any]] | None,
                           prefix: str | Sequence[int] | None, label: str) -> CallPlan:
        scope = self._scope
        max_top = scope.backend.capabilities.max_top_logprobs
        conversation = list(messages) if messages is not None else scope.messages
        if prefix is None:
            return self._plan("/chat/completions", chat_body(scope.model, conversation, scope.sampling, options,
                                                             max_top), label, options)
        if isinstance(prefix, str) and self.supports("prefill"):
            body, echoed = await self._prefill_body(conversation, prefix, options)
            return self._plan("/chat/completions", body, label, options, echoed)
        prompt = await self._raw_prompt(conversation, prefix)
        return self._plan("/completions", completion_body(scope.model, prompt, scope.sampling, options, max_top),
                          label, options)

    # ---- raw prompts and tokens ----

    async def render(self, messages: Sequence[dict[str, Any]] | None = None, *,
                     add_generation_prompt: bool = True) -> str:
        self._require("render", "rendering the chat template")
        scope = self._scope
        conversation = list(messages) if messages is not None else scope.messages
        key = json.dumps([scope.backend.name, scope.model, conversation, add_generation_prompt], sort_keys=True)
        rendered = self._state.rendered.get(key)
        if rendered is None:
            rendered = await in_budget(scope.budget,
                                       scope.backend.render(scope.model, conversation, add_generation_prompt))
            self._state.rendered[key] = rendered
        return rendered

    async def tokenize(self, text: str) -> list[int]:
        self._require("tokenize")
        return await in_budget(self._scope.budget, self._scope.backend.tokenize(self._scope.model, text))

    async def detokenize(self, ids: Sequence[int]) -> str:
        self._require("tokenize")
        return await in_budget(self._scope.budget, self._scope.backend.detokenize(self._scope.model, ids))

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
        ordinal = state.next_ordinal(scope.node, label)
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
        child_sampling = scope.sampling
        if sampling:
            unknown = set(sampling) - set(SAMPLING_OVERRIDES)
            if unknown:
                raise ValueError(f"run_strategy: cannot replace sampling fields {sorted(unknown)}")
            if sampling.get("top_logprobs") is not None:
                self._require("logprobs", "scoring the nested run's samples")
            child_sampling = replace(child_sampling, **sampling)
        check_request_fits(checked, child_sampling)
        strategy, strategy_params = checked[0]
        ordinal = state.next_ordinal(scope.node, spec.slug)
        child_budget = scope.budget.child(budget)
        node = state.trace.add(scope.node, spec.slug, "strategy", params=strategy_params.model_dump(),
                               **({"over": spec.over.describe()} if spec.over else {}),
                               **({"budget": dict(budget)} if budget else {}))
        child = self._with(replace(
            scope, messages=list(messages) if messages is not None else scope.messages, budget=child_budget,
            sampling=child_sampling, emits=False,
            node=node, path=(*scope.path, f"{spec.slug}#{ordinal}"), over=spec.over, depth=scope.depth + 1,
            fan_out=scope.fan_out * max(1, strategy.fan_out(strategy_params)),
            run_name=f"{spec.slug} {ordinal + 1}", siblings=(scope.node, spec.slug),
        ))
        started = time.monotonic()
        try:
            result = await strategy().run(child, strategy_params)
        except BaseException as exc:
            state.trace.update(node, status="cancelled" if isinstance(exc, asyncio.CancelledError) else "error",
                               error=str(exc), ms=ms_since(started), **child_budget.usage_attrs())
            raise
        result.usage = child_budget.usage
        result.budget_exhausted = result.budget_exhausted or child_budget.exhausted
        state.trace.update(node, status="ok", ms=ms_since(started), budget_exhausted=result.budget_exhausted,
                           answer=result.answer.text[:TRACE_TEXT_LIMIT] if result.choices else None,
                           **child_budget.usage_attrs())
        return result

    # ---- reporting ----

    async def progress(self, line: str) -> None:
        scope = self._scope
        if scope.siblings is not None:
            # A nested run's line is one line, named by its run; what a sibling run already said (the same
            # strategy under the same parent: `bon:n=8>cot`'s eight cot runs) is said once.
            text = " ".join(line.split())
            if len(text) > NESTED_LINE_LIMIT:
                text = text[:NESTED_LINE_LIMIT - 1] + "…"
            key = (*scope.siblings, text)
            if key in self._state.said:
                return
            self._state.said.add(key)
            line = f"{scope.run_name}: {text}"
        line = "  " * (scope.depth - 1) + line  # a nested run's lines sit under its parent's
        self._state.progress_lines.append(line)
        if self._state.progress_sink is not None:
            await self._state.progress_sink(line)

    async def emit(self, text: str) -> None:
        if not text or not self._scope.emits:
            return
        # Every strategy's answer passes here on its way to the client: an inline <think> block at its start (an
        # engine's tokens streamed as they come) leaves as reasoning, never as the answer's content.
        state = self._state
        thinking, answer = state.answer_stream.feed(text)
        if thinking:
            state.emitted_thinking.append(thinking)
            if state.thinking_sink is not None:
                await state.thinking_sink(thinking)
        if answer:
            if state.emitted_thinking and not state.emitted and state.thinking_sink is not None:
                await state.thinking_sink("\n")  # the thinking's end: progress lines go on from a new line
            state.emitted.append(answer)
            if state.emit_sink is not None:
                await state.emit_sink(answer)

    def note(self, key: str, value: Any) -> None:
        self._state.note(self._scope.node, key, value)

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
            passed = await in_budget(self._scope.budget,
                                     state.verifiers.verify(verifier, self._scope.messages, candidate, answer))
        except Exception as exc:
            state.trace.update(node, status="error", error=str(exc))
            raise
        state.trace.update(node, status="ok", passed=passed)
        return passed
