"""The strategy interface: what a strategy is, and the context through which it reaches a model.

A strategy never sees HTTP. It asks its context for samples, continuations, raw completions and tokens, spends
the run's budget, records a trace tree, reports progress and returns candidates; the proxy supplies the context
(proxy/runs/), which owns budgets, accounting, seeds and the trace.

Everything here is engine-neutral: a strategy asks for what it needs (`requires`/`requirements`) and the proxy
refuses a request with a 400 naming the missing capability before anything is sent.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar, Generic, Protocol, TypeVar, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from .answers import split_thinking
from .formats import parses_as
from .toolcalls import ToolCall

DEFAULT_SAMPLING_TEMPERATURE = 0.8
MAX_COMPOSITION_DEPTH = 3  # strategy runs nested in one request, the outermost included

T = TypeVar("T")


# ---------------------------------------------------------------- errors


class StrategyError(Exception):
    """A strategy could not produce an answer (e.g. too few candidates survived): the request fails."""


class StrategyInputError(StrategyError):
    """This request cannot be served by the strategy as asked (e.g. a parameter clash): the client's mistake."""


class BudgetExceeded(StrategyError):
    """The run's token, call or wall-time budget is spent: no more calls start.

    A strategy catches it to return its best answer so far (the client then sees finish_reason "length" and
    `ttc.budget_exhausted`); uncaught, the request fails as out of budget, marked not to be retried.
    """


# ---------------------------------------------------------------- parameters


class StrategyParams(BaseModel):
    """Base for a strategy's parameters: unknown keys are an error, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields whose value is bounded by a configured maximum: field name -> "samples" | "iterations".
    limits: ClassVar[dict[str, str]] = {}


def _split_models(value: Any) -> Any:
    return [part.strip() for part in value.split("+")] if isinstance(value, str) else value


# A parameter naming several models: a list in `ttc.params`, `a+b` in a model-name prefix (`mcts:models=a+b-m`;
# `+` is not one of the prefix grammar's own characters).
ModelNames = Annotated[list[Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]],
                       BeforeValidator(_split_models), Field(min_length=1)]


@dataclass(frozen=True)
class StrategySpec:
    """A strategy by slug with its parameters, and the strategy it runs over (composition: `bon:n=4>cot`)."""

    slug: str
    params: Mapping[str, Any] = field(default_factory=dict)
    over: StrategySpec | None = None

    def chain(self) -> list[StrategySpec]:
        """This spec and the ones it runs over, outermost first."""
        specs: list[StrategySpec] = []
        spec: StrategySpec | None = self
        while spec is not None:
            specs.append(spec)
            spec = spec.over
        return specs

    def describe(self) -> str:
        def one(s: StrategySpec) -> str:
            params = ",".join(f"{k}={v}" for k, v in s.params.items())
            return f"{s.slug}:{params}" if params else s.slug

        return ">".join(one(s) for s in self.chain())


# ---------------------------------------------------------------- tokens and candidates


@dataclass(frozen=True)
class TokenAlternative:
    """One of the engine's top alternatives at a position (pre-sampling probabilities on llama.cpp)."""

    text: str
    logprob: float
    id: int | None = None
    bytes: bytes | None = None


@dataclass(frozen=True)
class Token:
    """One generated token: its id (None when the engine does not say), text, UTF-8 bytes, log-probability and
    `offset`, the character offset in the reply text at which it starts, plus the top alternatives there.

    Cut a reply at `text[:token.offset]` (or continue from the token ids up to it), never by joining token
    texts: a token may hold part of a multi-byte character.
    """

    text: str
    logprob: float
    id: int | None = None
    bytes: bytes | None = None
    offset: int = 0
    top: tuple[TokenAlternative, ...] = ()


def is_truncated(finish_reason: str | None) -> bool:
    """Cut off by max_tokens: the reply may not have reached its answer."""
    return finish_reason == "length"


@dataclass(frozen=True)
class Candidate:
    """One reply: its content (`text`, the answer without any thinking), reasoning text if the engine or strategy
    separated one (`thinking`: the part that is the model's own, from the engine's reasoning_content or an inline
    <think> block, which the run shows the client for the answer it returns), its tool calls (a reply that acts rather than answers), finish reason, completion tokens (of
    which `thinking_tokens` were thinking) and (when asked) its generated tokens with logprobs.

    `tokens` are the tokens of the reply as generated; their offsets index `generated` (which is `text` unless a
    strategy derived `text` from a longer reply, as `cot` takes its output section).

    `budget_exhausted` marks an answer returned early because the budget ran out: its run stopped, the reply itself
    may have finished, so it is not a max_tokens cut-off and a parent strategy does not drop it.
    """

    text: str
    finish_reason: str | None = "stop"
    completion_tokens: int = 0
    tokens: tuple[Token, ...] | None = None
    reasoning: str = ""
    seed: int | None = None
    label: str = "sample"
    budget_exhausted: bool = False
    generated: str | None = None  # the text the tokens belong to, when it is not `text`
    text_start: int = 0  # where `text` begins in `generated`
    prompt_tokens: int = 0  # what the call that made it reported for its prompt (shared by n choices of one call)
    tool_calls: tuple[ToolCall, ...] = ()
    thinking_tokens: int = 0  # of completion_tokens, those spent on the reasoning (inline or the engine's)
    thinking: str = ""  # of reasoning, the model's own thinking

    @property
    def truncated(self) -> bool:
        return is_truncated(self.finish_reason) and not self.budget_exhausted

    @property
    def answer_tokens(self) -> tuple[Token, ...] | None:
        """The tokens of the answer itself: all of them for a plain reply, those overlapping `text` when it is a
        section of a longer one (cot's output). Scorers judge a candidate by these."""
        if self.tokens is None or self.generated is None:
            return self.tokens
        return tokens_between(self.tokens, self.text_start, self.text_start + len(self.text))

    @property
    def token_ids(self) -> list[int] | None:
        """The generated token ids, when the engine gave every one."""
        if not self.tokens or any(t.id is None for t in self.tokens):
            return None
        return [t.id for t in self.tokens]  # type: ignore[misc]


def tokens_between(tokens: Sequence[Token], start: int, end: int) -> tuple[Token, ...]:
    """The tokens that overlap [start, end) of their reply (a token " The" starting one space before an answer
    that begins at "The" is the answer's)."""
    kept = []
    for i, token in enumerate(tokens):
        token_end = tokens[i + 1].offset if i + 1 < len(tokens) else token.offset + max(1, len(token.text))
        if token.offset < end and token_end > start:
            kept.append(token)
    return tuple(kept)


def estimate_tokens(reply: str, tokens: Sequence[Token] | None, completion_tokens: int, start: int, end: int) -> int:
    """How many of a reply's tokens fall in [start, end): counted from its tokens, else by share of characters."""
    if tokens:
        return len(tokens_between(tokens, start, end))
    return round(completion_tokens * (end - start) / len(reply)) if reply else 0


def with_thinking_apart(candidate: Candidate) -> Candidate:
    """The candidate with the inline thinking of its text (strategies.answers.split_thinking) moved to its reasoning:
    its text is the answer, its tokens stay (the answer's found through `generated` and `text_start`), and the
    thinking's tokens count in `thinking_tokens` (from the tokens, else by share of characters). A candidate without
    inline thinking comes back as it is."""
    thinking, answer = split_thinking(candidate.text)
    if not thinking and answer == candidate.text:
        return candidate
    generated = candidate.generated if candidate.generated is not None else candidate.text
    answer_start = candidate.text_start + len(candidate.text) - len(answer)
    end = candidate.text_start + len(candidate.text)
    # the reply's tokens but the answer's (a token across the boundary, " The" after "</think>", is the answer's)
    spent = (estimate_tokens(generated, candidate.tokens, candidate.completion_tokens, candidate.text_start, end)
             - estimate_tokens(generated, candidate.tokens, candidate.completion_tokens, answer_start, end))
    return replace(candidate, text=answer, generated=generated, text_start=answer_start,
                   reasoning="\n".join(p for p in (candidate.reasoning, thinking) if p),
                   thinking="\n".join(p for p in (candidate.thinking, thinking) if p),
                   thinking_tokens=min(candidate.completion_tokens, candidate.thinking_tokens + spent))


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
    # The request's response_format: every sample is asked for it (see strategies.formats.parses_as).
    response_format: dict[str, Any] | None = None
    # The request asked for logprobs (with this many alternatives): every sample answering it carries its tokens.
    top_logprobs: int | None = None
    # The request's tools, tool_choice and parallel_tool_calls, as sent: every sample answering it carries them.
    tools: dict[str, Any] = field(default_factory=dict)

    def sampling_temperature(self, default: float = DEFAULT_SAMPLING_TEMPERATURE) -> float:
        """A sampling strategy draws at the request's temperature when it is above 0, else at its default."""
        return self.temperature if self.temperature is not None and self.temperature > 0 else default


@dataclass(frozen=True)
class CallOptions:
    """How one call samples; an option left unset (None) is the request's own (`Sampling`).

    `seed`: an explicit seed, used as seed + i for the call's i-th sample (None: derived from the request's).
    `extra`: engine fields for this call (logit_bias, cache_prompt, ...).
    `answers`: the call answers the client's question, so it carries the request's response_format, stop, top_p,
    engine fields and logprobs; `answers=False` marks a helper question (a judge's yes/no, a plan), which carries
    none of them.
    """

    temperature: float | None = None
    max_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    extra: Mapping[str, Any] | None = None
    answers: bool = True

    def request_top_logprobs(self, sampling: Sampling) -> int | None:
        """The alternatives the client asked for, which an answer carries (a helper question does not)."""
        return sampling.top_logprobs if self.answers else None

    def keeps_tokens(self, sampling: Sampling) -> bool:
        """Whether the call's candidates keep their tokens (someone asked for logprobs)."""
        return bool(self.logprobs or self.top_logprobs or self.request_top_logprobs(sampling) is not None)


@dataclass
class Usage:
    """Tokens and backend calls spent (by a run, a span or one nested run)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    estimated: bool = False  # some completion tokens were counted by us, not reported by the engine
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the engine reported serving from its prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class BudgetView:
    """What is left of the budget that binds this context (the tightest of its own and its parents')."""

    tokens: int
    calls: int
    seconds: float

    @property
    def exhausted(self) -> bool:
        return self.tokens <= 0 or self.calls <= 0 or self.seconds <= 0


@dataclass
class StrategyResult:
    """What a run returns: its answer(s) as candidates, strategy-specific facts for the `ttc` object, and
    (filled in by the context for a nested run) what the run spent."""

    choices: list[Candidate]
    details: dict[str, Any] = field(default_factory=dict)
    usage: Usage | None = None
    budget_exhausted: bool = False

    @property
    def answer(self) -> Candidate:
        return self.choices[0]


@dataclass(frozen=True)
class StreamEvent:
    """One piece of a streamed reply: a token (with its logprobs when the engine gave them) or reasoning text,
    and the finish reason on the last event."""

    text: str
    token: Token | None = None
    finish_reason: str | None = None
    reasoning: str = ""


# ---------------------------------------------------------------- the context


class StrategyContext(Protocol):
    """What the proxy gives a running strategy. Every call is checked against the budget before it starts."""

    @property
    def messages(self) -> list[dict[str, Any]]: ...

    @property
    def sampling(self) -> Sampling: ...

    @property
    def budget(self) -> BudgetView:
        """What is left of this run's budget (a nested run's own budget, capped by its parents')."""
        ...

    @property
    def over(self) -> StrategySpec | None:
        """The strategy this one runs over (`bon:n=4>cot`), whose runs replace plain samples in `draw`."""
        ...

    @property
    def random_seed(self) -> int | None:
        """A seed for the strategy's own random choices: the request's seed at the top, one derived from the
        run's place in a nested run (so sibling runs differ); None when the request has no seed."""
        ...

    def supports(self, capability: str) -> bool: ...

    async def generate(
        self,
        options: CallOptions = CallOptions(),
        *,
        n: int = 1,
        messages: Sequence[dict[str, Any]] | None = None,
        index: int = 0,
        min_success: int = 1,
        label: str = "sample",
    ) -> list[Candidate]:
        """n chat completions, drawn concurrently (split across requests as the backend needs).

        Candidates that fail are dropped; fewer than `min_success` successes raises (BudgetExceeded when the
        budget stopped them). Options left unset default to the request's own sampling parameters. Seeds: with a
        request seed, sample `index + i` of a top-level context uses seed + index + i; inside a span or nested
        run, a seed derived from (seed, span path, index + i); an explicit `options.seed` is used as seed + i.
        """
        ...

    async def continue_prefix(
        self,
        prefix: str | Sequence[int],
        options: CallOptions = CallOptions(),
        *,
        n: int = 1,
        messages: Sequence[dict[str, Any]] | None = None,
        index: int = 0,
        min_success: int = 1,
        label: str = "continue",
    ) -> list[Candidate]:
        """n continuations of a partial assistant reply; each candidate's text is the continuation only.

        A text prefix is continued by prefill (a trailing assistant message) where the engine can, else through
        /v1/completions on the rendered conversation; token ids always go through /v1/completions, exactly.
        """
        ...

    def stream(
        self,
        options: CallOptions = CallOptions(),
        *,
        messages: Sequence[dict[str, Any]] | None = None,
        prefix: str | Sequence[int] | None = None,
        index: int = 0,
        label: str = "stream",
    ) -> AsyncIterator[StreamEvent]:
        """One sample streamed token by token with logprobs (continuing `prefix` when given).

        Closing the iterator early aborts the backend call and is recorded as a cut at the current offset.
        """
        ...

    async def complete(
        self,
        prompt: str | Sequence[int],
        options: CallOptions = CallOptions(),
        *,
        n: int = 1,
        index: int = 0,
        min_success: int = 1,
        label: str = "complete",
    ) -> list[Candidate]:
        """Raw completions (/v1/completions) of a prompt given as text or token ids (see `render`)."""
        ...

    async def render(self, messages: Sequence[dict[str, Any]] | None = None, *,
                     add_generation_prompt: bool = True) -> str:
        """The conversation as the model sees it: the engine's chat template applied (or the configured one)."""
        ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def detokenize(self, ids: Sequence[int]) -> str: ...

    async def token_ids(self, tokens: Sequence[Token]) -> list[int]:
        """The ids of these tokens: the engine's where it gave them, else from its tokenizer (a token text
        re-tokenized may split differently from what was sampled; llama-server gives every id but those of
        tokens it merged into one multi-byte character)."""
        ...

    def span(self, label: str, **attrs: Any) -> StrategyContext:
        """A child context: its calls, notes and spans form a child node of this one in the trace (with `attrs`;
        id, parent, label and kind are the tree's own), and its samples derive their seeds from its path."""
        ...

    async def progress(self, line: str) -> None:
        """A readable progress line for the client (streamed as reasoning_content)."""
        ...

    async def emit(self, text: str) -> None:
        """Stream this text of the final answer now (appended to what was emitted before). The answer the run
        returns must begin with everything emitted. In a nested run (whose answer is not the client's) it does
        nothing."""
        ...

    async def verify(self, verifier: str, candidate: str, answer: str) -> bool:
        """Ask a verifier configured by name (outside the strategy: an HTTP check) whether a candidate is right."""
        ...

    def pivots(self, name: str) -> Sequence[Mapping[str, Any]]:
        """A pivotal-token dataset configured by name (`pivots:` in config): codelion/pts records with at least
        pivot_context, pivot_token, prob_delta (and pivot_token_id, is_positive when known)."""
        ...

    def for_model(self, model: str) -> StrategyContext:
        """This run (same budget, accounting, trace and progress) talking to another model, served by any
        configured backend; e.g. a judge that is not the model being sampled."""
        ...

    def note(self, key: str, value: Any) -> None:
        """Record a fact in this context's trace node."""
        ...

    def count(self, event: str, amount: float = 1) -> None:
        """Add to one of the run's counters (the proxy's ttc_strategy_events_total{event=...}): a name the
        strategy fixes in its code (mcts_nodes, entropy_interventions, ...), never one made from the request."""
        ...

    async def run_strategy(self, spec: StrategySpec | str, params: Mapping[str, Any] | None = None, *,
                           messages: Sequence[dict[str, Any]] | None = None,
                           budget: Mapping[str, float] | None = None,
                           sampling: Mapping[str, Any] | None = None) -> StrategyResult:
        """Run another registered strategy inside this one's budget and trace, on `messages` (default: this
        run's), with an optional budget of its own (capped by what is left here) and `sampling` fields replaced
        for it (e.g. {"temperature": 0.8, "top_logprobs": 5}: a parent that samples and scores its runs). Returns
        its candidates with their tokens and what it spent (`usage`). Its emits do not reach the client. Depth
        and fan-out limits apply."""
        ...


# ---------------------------------------------------------------- strategies


P = TypeVar("P", bound=StrategyParams)


class Strategy(ABC, Generic[P]):
    """A test-time-compute strategy, generic over its parameters model: `class SelfConsistency(Strategy[SCParams])`
    validates `ttc.params` with SCParams (found as `Params`) and gets them as an SCParams. Subclasses set the class
    attributes and implement `run`."""

    slug: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[StrategyParams]] = StrategyParams  # set from the generic argument
    requires: ClassVar[frozenset[str]] = frozenset()  # capability names, e.g. {"logprobs", "prefill"}
    multiple_choices: ClassVar[bool] = False  # may a client ask for n > 1?
    composable: ClassVar[bool] = False  # may run over another strategy (`draw` then runs it)
    # Can honour a JSON response_format: False for a strategy whose one reply is continued from raw token ids,
    # where no grammar follows it and there are no other candidates to filter by it.
    structured_output: ClassVar[bool] = True
    # Takes requests with `tools` (tool_choice, parallel_tool_calls): its samples carry them and it compares
    # candidates by their tool calls (strategies.answers.candidate_answer). Others refuse tools with a 400.
    tool_calls: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            (params, *_) = get_args(base) or (None,)
            if get_origin(base) is Strategy and isinstance(params, type) and issubclass(params, StrategyParams):
                cls.Params = params

    @classmethod
    def requirements(cls, params: P) -> Mapping[str, str]:
        """Capabilities this run needs with these parameters -> why (shown to the client when missing).

        Checked before the run starts. The default is the static `requires`; override when parameters decide.
        """
        return {capability: "" for capability in cls.requires}

    @classmethod
    def check_request(cls, params: P, sampling: Sampling) -> None:
        """Raise StrategyInputError when these parameters cannot serve a request with this sampling (e.g. a check
        that needs the request's tools); checked before the run starts."""

    @classmethod
    def references(cls, params: P) -> Mapping[str, Sequence[str]]:
        """Configured things these parameters name, checked before the run starts: {"verifiers": [names],
        "models": [model names], "pivots": [pivot set names]} (an HTTP verifier, a judge model, a pivot set)."""
        return {}

    @classmethod
    def fan_out(cls, params: P) -> int:
        """How many runs of the strategy it runs over this one may start (n, k, iterations x batch): the product
        along a composition is bounded by `strategies.max_samples`."""
        return 1

    @abstractmethod
    async def run(self, ctx: StrategyContext, params: P) -> StrategyResult: ...


# ---------------------------------------------------------------- helpers every strategy shares


async def gather_successes(
    calls: Iterable[Callable[[], Awaitable[T]]],
    *,
    min_success: int,
    what: str = "call",
    sizes: Sequence[int] | None = None,
) -> tuple[list[T], list[Exception]]:
    """Run calls concurrently; each one's failure is caught in its own task.

    Returns (results in call order, errors). As soon as enough calls have failed that `min_success` cannot be
    reached (counting call i as `sizes[i]` successes, default 1), the others are cancelled and the first error is
    raised (BudgetExceeded if the budget stopped any). Cancellation from outside (a client leaving) cancels them
    all (asyncio.TaskGroup).
    """
    factories = list(calls)
    weights = list(sizes) if sizes is not None else [1] * len(factories)
    results: list[T | None] = [None] * len(factories)
    done: list[bool] = [False] * len(factories)
    errors: list[Exception] = []
    failed: list[int] = []

    class _Unreachable(Exception):
        pass

    async def one(i: int) -> None:
        try:
            results[i] = await factories[i]()
            done[i] = True
        except Exception as exc:  # noqa: BLE001 - one call's failure is recorded; the group decides
            errors.append(exc)
            failed.append(i)
            if sum(weights) - sum(weights[j] for j in failed) < min_success:
                raise _Unreachable() from exc

    try:
        async with asyncio.TaskGroup() as group:
            for i in range(len(factories)):
                group.create_task(one(i))
    except* _Unreachable:
        reached = sum(w for w, ok in zip(weights, done) if ok)
        raise _first_error(errors, what, reached, sum(weights), min_success) from None
    successes = [r for r, ok in zip(results, done) if ok]
    return successes, errors  # type: ignore[return-value]


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await all concurrently; the first failure cancels the rest and is raised as itself (asyncio.TaskGroup)."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            for awaitable in awaitables:
                tasks.append(group.create_task(_awaited(awaitable)))
    except BaseExceptionGroup as group_error:
        first = group_error.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _first_error(errors: Sequence[Exception], what: str, succeeded: int, asked: int, needed: int) -> Exception:
    budget = next((e for e in errors if isinstance(e, BudgetExceeded)), None)
    if budget is not None:
        return budget
    if errors and succeeded == 0 and needed <= 1:
        return errors[0]
    first = f"; first error: {errors[0]}" if errors else ""
    error = StrategyError(f"only {succeeded} of {asked} {what}s succeeded; at least {needed} needed{first}")
    if errors and not isinstance(errors[0], StrategyError):
        # Keep the original type reachable (e.g. a backend's 400), so the proxy can report it faithfully.
        error.__cause__ = errors[0]
    return error


async def draw(
    ctx: StrategyContext,
    n: int,
    *,
    messages: Sequence[dict[str, Any]] | None = None,
    temperature: float | None = None,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    index: int = 0,
    min_success: int = 1,
    label: str = "sample",
) -> list[Candidate]:
    """n candidate answers: plain samples (`ctx.generate`; `index` as there), or, when this strategy runs over
    another (`ctx.over`), n concurrent runs of that one, each run's answer a candidate (with its tokens).

    A run stopped by the budget still gives its best-so-far answer, flagged `budget_exhausted`. With a
    request `response_format`, candidates that do not parse as it are dropped, unless none parses.
    """
    inner = ctx.over
    if inner is None:
        options = CallOptions(temperature=temperature, logprobs=logprobs, top_logprobs=top_logprobs)
        candidates = await ctx.generate(options, n=n, messages=messages, index=index, min_success=min_success,
                                        label=label)
    else:
        async def one() -> Candidate:
            overrides: dict[str, Any] = {"temperature": temperature} if temperature is not None else {}
            if logprobs or top_logprobs:
                overrides["top_logprobs"] = top_logprobs or 1
            result = await ctx.run_strategy(inner, messages=messages, sampling=overrides)
            answer = result.answer
            return replace(answer, label=inner.slug,
                           budget_exhausted=answer.budget_exhausted or result.budget_exhausted)

        candidates, errors = await gather_successes((one for _ in range(n)), min_success=min_success,
                                                    what=f"{inner.slug} run")
        if errors:
            ctx.note(f"{label}_failures", [str(e) for e in errors])
    return keep_parsing(ctx, candidates, label)


def keep_parsing(ctx: StrategyContext, candidates: list[Candidate], label: str = "sample") -> list[Candidate]:
    """With a request `response_format`, the candidates whose text parses as it (all of them when none does);
    every strategy filters its answers through this before selecting."""
    response_format = ctx.sampling.response_format
    if response_format is None:
        return candidates
    parsing = [c for c in candidates if parses_as(c.text, response_format)]
    if parsing and len(parsing) < len(candidates):
        ctx.note(f"{label}_not_parsing", len(candidates) - len(parsing))
    return parsing or candidates


def last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    """Where the last user message (the question) is; a strategy that restates it refuses a conversation
    without one."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise StrategyInputError("this strategy restates the last user message, and the conversation has none")


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message (the question, for prompts that restate it)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
