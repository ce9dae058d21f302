"""Decoding guided position by position, through any engine that streams logprobs and continues token ids.

The reply is streamed with `top_logprobs`. A policy looks at each position as it arrives: the token the engine
chose and the alternatives it listed. It keeps the token (which is emitted to the client at once), or intervenes:

  Insert  cut the stream just before this position, put these tokens there instead (a pause text, another
          alternative, a biased draw), and stream on from the new prefix;
  Fork    finish the reply along several alternatives at this position: the open stream finishes its own
          token's branch (nothing is paid twice), each other alternative is continued from its exact token-id
          prefix, concurrently, and the policy picks the branch to keep (the reply ends with it).

Every cut is at a token boundary and every continuation is from token ids (`/v1/completions`), so nothing is
re-tokenized. The decoder keeps the reply's pieces, each token's absolute offset, the interventions made, and
what the client has already been sent; strategies (entropy, pts, pivots) supply only the policy.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from .framework import (
    BudgetExceeded,
    CallOptions,
    Candidate,
    StrategyContext,
    StreamEvent,
    Token,
    TokenAlternative,
)


# What the decoder needs of an engine: streamed logprobs, raw completions of token ids, and the tokenizer and chat
# template that turn a conversation into those ids. A strategy built on it requires these.
NEEDS = frozenset({"logprobs", "completions", "tokenize", "render"})


@dataclass(frozen=True)
class Position:
    """A position of the reply as the stream reached it: its index (in tokens of the reply so far), the token
    the engine put there and the reply's text before it."""

    index: int
    token: Token
    text_before: str


@dataclass(frozen=True)
class Insert:
    """Put `ids` (reading as `text`) at this position instead of the streamed token, then stream on."""

    ids: tuple[int, ...]
    text: str
    action: str
    why: str
    tokens: tuple[Token, ...] = ()  # the inserted tokens with logprobs, when they were sampled


@dataclass(frozen=True)
class Fork:
    """Finish the reply along each alternative at this position; `choose` picks the kept branch's index."""

    alternatives: tuple[TokenAlternative, ...]  # the streamed token's alternative first
    choose: Callable[[list[Branch]], Awaitable[int]]
    action: str
    why: str


Decision = Insert | Fork | None


@dataclass(frozen=True)
class Branch:
    """One finished branch of a fork: the forced token, then its continuation (tokens with logprobs)."""

    alternative: TokenAlternative
    text: str  # the forced token's text and the continuation
    tokens: tuple[Token, ...]
    finish_reason: str | None

    def as_candidate(self, before: str) -> Candidate:
        """The whole reply along this branch (scorers judge its tokens from the fork on)."""
        return Candidate(before + self.text, self.finish_reason, len(self.tokens), self.tokens, label="branch")


# Called at every position, also once no intervention is left (so it can record what it measured): a policy
# checks `decoder.can_intervene` before spending calls on a decision that would be ignored.
Policy = Callable[[Position, "GuidedDecoder"], Awaitable[Decision]]


@dataclass
class _Piece:
    text: str
    ids: tuple[int, ...] | None  # None: a streamed token the engine gave no id for (see ctx.token_ids)
    token: Token | None = None


@dataclass
class GuidedDecoder:
    """One reply decoded under a policy. `max_interventions` bounds the cuts; after that the stream runs on."""

    ctx: StrategyContext
    max_tokens: int
    temperature: float
    top_logprobs: int
    max_interventions: int
    live: bool = True  # emit kept text to the client as it arrives
    pieces: list[_Piece] = field(default_factory=list)
    interventions: list[dict[str, Any]] = field(default_factory=list)
    positions: list[dict[str, Any]] = field(default_factory=list)  # what the policy recorded per position
    streams: int = 0
    budget_exhausted: bool = False
    finish_reason: str | None = "length"

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    @property
    def length(self) -> int:
        """Tokens in the reply so far (inserted ones included)."""
        return sum(len(p.ids) if p.ids is not None else 1 for p in self.pieces)

    @property
    def tokens(self) -> tuple[Token, ...]:
        """The streamed and sampled tokens, offsets into `text` (inserted pause tokens have no logprobs)."""
        return tuple(p.token for p in self.pieces if p.token is not None)

    @property
    def can_intervene(self) -> bool:
        return len(self.interventions) < self.max_interventions

    async def prefix_ids(self) -> list[int]:
        """The reply so far as token ids: the engine's ids, with any it did not give recovered by tokenizing
        runs of such tokens together (a run may be one character split across tokens)."""
        ids: list[int] = []
        missing: list[Token] = []
        for piece in [*self.pieces, None]:
            if piece is not None and piece.ids is None and piece.token is not None:
                missing.append(piece.token)
                continue
            if missing:
                ids.extend(await self.ctx.token_ids(missing))
                missing = []
            if piece is not None and piece.ids is not None:
                ids.extend(piece.ids)
        return ids

    def _add(self, text: str, ids: tuple[int, ...] | None, token: Token | None) -> None:
        offset = len(self.text)
        self.pieces.append(_Piece(text, ids, replace(token, offset=offset) if token is not None else None))

    async def _emit(self, text: str) -> None:
        if self.live and text:
            await self.ctx.emit(text)

    def _open(self, prefix: list[int] | None) -> AsyncIterator[StreamEvent]:
        self.streams += 1
        return self.ctx.stream(CallOptions(temperature=self.temperature, top_logprobs=self.top_logprobs,
                                           max_tokens=max(1, self.max_tokens - self.length)),
                               prefix=prefix, index=self.streams - 1,
                               label="stream" if prefix is None else "stream from cut")

    async def run(self, policy: Policy) -> Candidate:
        """Decode to the end (a stop, max_tokens or the budget) and return the reply."""
        prefix: list[int] | None = None
        try:
            while True:
                decision, position = await self._stream_until_intervention(prefix, policy)
                if decision is None or position is None:
                    break
                self._record(decision.action, decision.why, position)
                self.interventions[-1]["inserted"] = decision.text
                await self._insert(decision)
                if self.length >= self.max_tokens:
                    self.finish_reason = "length"
                    break
                prefix = await self.prefix_ids()
        except BudgetExceeded:
            if not self.pieces:
                raise
            self.budget_exhausted = True
            self.finish_reason = "length"
        return Candidate(self.text, self.finish_reason, self.length, self.tokens or None, label="guided",
                         budget_exhausted=self.budget_exhausted)

    def _record(self, action: str, why: str, position: Position) -> None:
        self.interventions.append({"position": position.index, "offset": len(position.text_before),
                                   "token": position.token.text, "action": action, "why": why})

    async def _insert(self, decision: Insert) -> None:
        if decision.tokens and len(decision.tokens) == len(decision.ids):
            for token, token_id in zip(decision.tokens, decision.ids):
                self._add(token.text, (token_id,), token)
        else:
            self._add(decision.text, decision.ids, None)
        await self._emit(decision.text)

    async def _stream_until_intervention(self, prefix: list[int] | None,
                                         policy: Policy) -> tuple[Insert | None, Position | None]:
        """Stream from `prefix` (the chat itself when None), keeping tokens until the policy intervenes at one
        (the stream is cut at that token's offset; a fork reads the rest of it as its own branch) or the stream
        ends. Returns an Insert to make, or None when the reply is finished.

        The stream is read by its own task into a queue, so it keeps flowing (and frees its engine slot on time)
        while a policy waits for calls of its own: a policy holding a stream it does not read while its rollouts
        wait for slots would deadlock an engine with few slots."""
        queue: asyncio.Queue[StreamEvent | Exception | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async with aclosing(self._open(prefix)) as events:
                    async for event in events:
                        queue.put_nowait(event)
                queue.put_nowait(None)
            except Exception as exc:  # noqa: BLE001 - handed to the reader below, raised there
                queue.put_nowait(exc)

        async def next_event() -> StreamEvent | None:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            return item

        reader = asyncio.create_task(read())
        try:
            while (event := await next_event()) is not None:
                if event.finish_reason:
                    self.finish_reason = event.finish_reason
                if event.token is None:
                    if event.text:  # an engine that gave no logprobs for this piece: kept as it is
                        self._add(event.text, None, Token(event.text, 0.0, offset=0))
                        await self._emit(event.text)
                    continue
                position = Position(self.length, event.token, self.text)
                try:
                    decision = await policy(position, self)  # measured even when no intervention is left
                except BudgetExceeded:
                    # The budget refused the policy's own calls (rollouts, a draw): the open stream, already paid
                    # for, finishes the reply; no further intervention is tried.
                    self.budget_exhausted = True
                    self.max_interventions = len(self.interventions)
                    decision = None
                if not self.can_intervene or (isinstance(decision, Insert)
                                              and self.length + len(decision.ids) > self.max_tokens):
                    decision = None  # none left, or the inserted tokens would not fit in max_tokens
                if isinstance(decision, Fork):
                    self._record(decision.action, decision.why, position)
                    await self._fork(decision, event, next_event)
                    return None, position
                if decision is not None:
                    return decision, position  # the reader is cancelled below: the cut
                self._add(event.text, (event.token.id,) if event.token.id is not None else None, event.token)
                await self._emit(event.text)
            return None, None
        finally:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                # the reader's own cancellation, unless this task was cancelled meanwhile (the client left)
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def _fork(self, fork: Fork, event: StreamEvent,
                    next_event: Callable[[], Awaitable[StreamEvent | None]]) -> None:
        """Finish every alternative of the fork and keep the chosen branch. The streamed token's branch is the
        rest of the open stream; the others are continued from their exact token-id prefixes, concurrently."""
        assert event.token is not None
        before = await self.prefix_ids()
        fork = replace(fork, alternatives=(fork.alternatives[0],
                                           *[await alternative_with_text(self.ctx, a) for a in fork.alternatives[1:]]))

        async def own() -> Branch:
            text, tokens, finish = event.text, [replace(event.token, offset=0)], None
            while (later := await next_event()) is not None:
                finish = later.finish_reason or finish
                if later.token is not None:
                    tokens.append(replace(later.token, offset=len(text)))
                text += later.text
            return Branch(fork.alternatives[0], text, tuple(tokens), finish or "length")

        async def other(i: int, alternative: TokenAlternative) -> Branch:
            forced = await alternative_ids(self.ctx, alternative)
            forced_token = Token(alternative.text, alternative.logprob, forced[0] if len(forced) == 1 else None,
                                 alternative.bytes, offset=0)
            remaining = self.max_tokens - self.length - len(forced)
            if remaining < 1:  # the forced token fills the reply: nothing to continue
                return Branch(alternative, alternative.text, (forced_token,), "length")
            (rest,) = await self.ctx.continue_prefix(
                [*before, *forced],
                CallOptions(max_tokens=remaining, temperature=self.temperature, logprobs=True,
                            top_logprobs=self.top_logprobs),
                index=self.streams + i, label=f"branch {alternative.text!r}")
            shift = len(alternative.text)
            tokens = (forced_token, *(replace(t, offset=t.offset + shift) for t in rest.tokens or ()))
            return Branch(alternative, alternative.text + rest.text, tokens, rest.finish_reason)

        async def caught(work: Awaitable[Branch]) -> Branch | Exception:
            try:
                return await work
            except Exception as exc:  # noqa: BLE001 - one branch's failure leaves the others
                return exc

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(caught(other(i, a))) for i, a in enumerate(fork.alternatives[1:], 1)]
            outcomes = [await caught(own()), *(await asyncio.gather(*tasks))]
        branches = [b for b in outcomes if isinstance(b, Branch)]
        errors = [e for e in outcomes if isinstance(e, Exception)]
        if errors:
            self.interventions[-1]["failed_branches"] = [str(e) for e in errors]
            self.budget_exhausted |= any(isinstance(e, BudgetExceeded) for e in errors)
        if not branches:
            raise next((e for e in errors if isinstance(e, BudgetExceeded)), errors[0])
        chosen = branches[await fork.choose(branches)]
        self.interventions[-1]["kept"] = chosen.alternative.text
        for i, token in enumerate(chosen.tokens):
            end = chosen.tokens[i + 1].offset if i + 1 < len(chosen.tokens) else len(chosen.text)
            self._add(chosen.text[token.offset:end], (token.id,) if token.id is not None else None, token)
        self.finish_reason = chosen.finish_reason
        await self._emit(chosen.text)


async def alternative_with_text(ctx: StrategyContext, alternative: TokenAlternative) -> TokenAlternative:
    """The alternative with its text: an engine that named only its id (vLLM's top alternatives) is asked."""
    if alternative.text or alternative.id is None:
        return alternative
    return replace(alternative, text=await ctx.detokenize([alternative.id]))


async def alternative_ids(ctx: StrategyContext, alternative: TokenAlternative) -> tuple[int, ...]:
    """The ids that force this alternative: its own id, else its text tokenized."""
    if alternative.id is not None:
        return (alternative.id,)
    return tuple(await ctx.tokenize(alternative.text))


def top_alternatives(token: Token, k: int, min_probability: float) -> tuple[TokenAlternative, ...]:
    """The streamed token's alternative first, then the most likely others with at least `min_probability`,
    k in all."""
    own = next((a for a in token.top if same_token(a, token)), None)
    own = replace(own, text=token.text) if own is not None else \
        TokenAlternative(token.text, token.logprob, token.id, token.bytes)
    others = [a for a in sorted(token.top, key=lambda a: -a.logprob)
              if not same_token(a, token) and math.exp(a.logprob) >= min_probability]
    return (own, *others[:max(0, k - 1)])


def sample_alternative(token: Token, temperature: float, rng: Any) -> TokenAlternative | None:
    """Draw from the listed alternatives at `temperature` (p^(1/T), renormalised over the list, as top-k
    sampling does); None when nothing is listed. At temperature 0, the most likely."""
    listed = [a for a in token.top if math.isfinite(a.logprob)]
    if not listed:
        return None
    if temperature <= 0:
        return max(listed, key=lambda a: a.logprob)
    top = max(a.logprob for a in listed)
    weights = [math.exp((a.logprob - top) / temperature) for a in listed]
    return rng.choices(listed, weights=weights, k=1)[0]


def same_token(alternative: TokenAlternative, token: Token) -> bool:
    if alternative.id is not None and token.id is not None:
        return alternative.id == token.id
    return alternative.text == token.text
