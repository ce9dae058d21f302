"""What one client request's run shares (RunState), and where one of its contexts stands (Scope).

Each context is a view onto the run's state at a scope: which backend and model, which conversation, which trace
node and span path, which budget scope, and which strategy it runs over. Spans and nested runs are new scopes on
the same state.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ttc_proxy.strategies.answers import ThinkingSplitter
from ttc_proxy.strategies.framework import CallOptions, Candidate, Sampling, Strategy, StrategySpec, StreamEvent

from ..backends import Backend
from ..config import StrategySettings
from ..traces import Trace
from .accounting import BudgetScope
from .verifier import VerifierClient
from .watch import CallInFlight

TextSink = Callable[[str], Awaitable[None]]
TRACE_TEXT_LIMIT = 2000


class SampleSource(Protocol):
    """Serves a run's samples from somewhere other than its engine (the eval's pools draw each sample once for
    every strategy scored on it). Each method answers None when it cannot serve the call, which then goes to the
    engine; what it serves it admits and charges through the run's budget (budgeted.BudgetedCall)."""

    async def generate(self, state: RunState, scope: Scope, options: CallOptions, n: int,
                       messages: Sequence[dict[str, Any]] | None, index: int,
                       min_success: int) -> list[Candidate] | None: ...

    def stream(self, state: RunState, scope: Scope, options: CallOptions, messages: Sequence[dict[str, Any]] | None,
               prefix: str | Sequence[int] | None, index: int) -> AsyncIterator[StreamEvent] | None: ...


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
    thinking_sink: TextSink | None = None  # the emitted answer's inline thinking, streamed as reasoning
    sample_source: SampleSource | None = None  # None: every sample comes from the engine
    progress_lines: list[str] = field(default_factory=list)
    emitted: list[str] = field(default_factory=list)  # the answer as sent, its inline thinking set apart
    emitted_thinking: list[str] = field(default_factory=list)
    answer_stream: ThinkingSplitter = field(default_factory=ThinkingSplitter)  # splits what the strategy emits
    span_counts: dict[tuple[int, str], int] = field(default_factory=dict)
    rendered: dict[str, str] = field(default_factory=dict)  # render() results, per backend, model and conversation
    # How the run worked around what an engine lacks (ttc.details.adaptations): the client sees the degradation.
    adaptations: set[str] = field(default_factory=set)
    # Prompt tokens the engine reported per prompt, for calls cut before it could report (a pruned stream) and for
    # the budget's reservations; `prompt_overhead`: the most a report exceeded characters / 4 by (the template's own
    # tokens), added to the estimate of a prompt not seen yet.
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    prompt_overhead: int = 0
    calls_in_flight: dict[int, CallInFlight] = field(default_factory=dict)  # by trace node, for report_slow_calls
    # What nested runs said, per (parent node, strategy): a line a sibling run already said is not repeated.
    said: set[tuple[int, str, str]] = field(default_factory=set)
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

    def note(self, node: int, key: str, value: Any) -> None:
        """A fact recorded in a trace node."""
        self.trace.nodes[node].setdefault("notes", {})[key] = value

    def next_ordinal(self, node: int, label: str) -> int:
        """How many children labelled so the node had before this one (a span path's `label#ordinal`)."""
        key = (node, label)
        ordinal = self.span_counts.get(key, 0)
        self.span_counts[key] = ordinal + 1
        return ordinal

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
    run_name: str = ""  # a nested run's name in progress lines ("cot 3": the third cot run of its parent)
    siblings: tuple[int, str] | None = None  # a nested run's (parent node, strategy): whose lines are shared


def prompt_key(body: Mapping[str, Any]) -> str:
    return json.dumps(body.get("messages", body.get("prompt")), sort_keys=True)


def ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
