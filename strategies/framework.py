"""The strategy interface: what a strategy is, and the context through which it reaches a model.

A strategy never sees HTTP. It asks its context for samples, logprobs and continuations, reports progress
and returns a result; the proxy supplies the context, which owns budgets, accounting and the trace.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

DEFAULT_SAMPLING_TEMPERATURE = 0.8


class StrategyError(Exception):
    """A strategy could not produce an answer (e.g. too few candidates survived); reported as a 502."""


class StrategyInputError(StrategyError):
    """This request cannot be served by the strategy as asked (e.g. a parameter clash); reported as a 400."""


class StrategyParams(BaseModel):
    """Base for a strategy's parameters: unknown keys are an error, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields whose value is bounded by a configured maximum: field name -> "samples" | "iterations".
    limits: ClassVar[dict[str, str]] = {}


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def is_truncated(finish_reason: str | None) -> bool:
    """Cut off by max_tokens: the reply may not have reached its answer."""
    return finish_reason == "length"


@dataclass(frozen=True)
class Candidate:
    """One full choice from the backend: message, finish reason and (when asked) token logprobs."""

    text: str
    finish_reason: str | None
    message: dict[str, Any]
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    seed: int | None = None
    label: str = "sample"

    @property
    def truncated(self) -> bool:
        return is_truncated(self.finish_reason)


@dataclass(frozen=True)
class Sampling:
    """The request's sampling parameters, as the client sent them (None when absent)."""

    temperature: float | None
    top_p: float | None
    max_tokens: int
    stop: str | list[str] | None
    seed: int | None
    # Other sampling fields the engine understands (top_k, min_p, presence_penalty, ...): forwarded as they are.
    extra: dict[str, Any] = field(default_factory=dict)

    def sampling_temperature(self, default: float = DEFAULT_SAMPLING_TEMPERATURE) -> float:
        """A sampling strategy draws at the request's temperature when it is above 0, else at its default."""
        return self.temperature if self.temperature is not None and self.temperature > 0 else default


@dataclass(frozen=True)
class FinalChoice:
    content: str
    finish_reason: str = "stop"
    completion_tokens: int = 0  # tokens of this answer; everything else the strategy spent is reasoning


@dataclass
class StrategyResult:
    choices: list[FinalChoice]
    details: dict[str, Any] = field(default_factory=dict)  # strategy-specific facts for the `ttc` object


@dataclass(frozen=True)
class StreamEvent:
    """One token (or text piece) of a streamed sample."""

    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


class StrategyContext(Protocol):
    """What the proxy gives a running strategy."""

    @property
    def messages(self) -> list[dict[str, Any]]: ...

    @property
    def sampling(self) -> Sampling: ...

    def supports(self, capability: str) -> bool: ...

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
        """n chat completions, drawn concurrently (split across requests as the backend needs).

        Candidates that fail are dropped; fewer than `min_success` successes raises.
        Unset arguments default to the request's own sampling parameters.
        """
        ...

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
        """Continue a partial assistant reply; the candidate's text is the continuation only."""
        ...

    def stream(
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
        """One sample streamed token by token with logprobs; closing the iterator aborts the backend call."""
        ...

    async def progress(self, line: str) -> None:
        """A readable progress line for the client (streamed as reasoning_content)."""
        ...

    async def verify(self, verifier: str, candidate: str, answer: str) -> bool:
        """Ask a verifier configured by name (outside the strategy: an HTTP check) whether a candidate is right."""
        ...

    def for_model(self, model: str) -> "StrategyContext":
        """This run (same budget, accounting, trace and progress) talking to another model, served by any
        configured backend; e.g. a judge that is not the model being sampled."""
        ...

    def note(self, key: str, value: Any) -> None:
        """Record a fact in the trace of this run."""
        ...

    async def run_strategy(self, slug: str, params: dict[str, Any] | None = None, *,
                           seed: int | None = None) -> StrategyResult:
        """Run another registered strategy on this request, inside this one's budget and trace.

        `seed` replaces the request's seed for that run (so repeated runs of a seeded request can differ).
        """
        ...


class Strategy(ABC):
    """A test-time-compute strategy. Subclasses set the class attributes and implement `run`."""

    slug: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    requires: ClassVar[frozenset[str]] = frozenset()  # capability names, e.g. {"logprobs", "prefill"}
    multiple_choices: ClassVar[bool] = False  # may a client ask for n > 1?

    @classmethod
    def requirements(cls, params: StrategyParams) -> Mapping[str, str]:
        """Capabilities this run needs with these parameters -> why (shown to the client when missing).

        Checked before the run starts. The default is the static `requires`; override when parameters decide.
        """
        return {capability: "" for capability in cls.requires}

    @abstractmethod
    async def run(self, ctx: StrategyContext, params: StrategyParams) -> StrategyResult: ...
