"""Backend calls as data: the request bodies a strategy's calls send, seeds, and parsing replies into candidates
and tokens (ids, bytes, character offsets) whatever the engine's logprob format."""

from __future__ import annotations

import codecs
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ttc_proxy.strategies.framework import (
    CallOptions,
    Candidate,
    Sampling,
    Token,
    TokenAlternative,
    message_text,
    with_thinking_apart,
)
from ttc_proxy.strategies.toolcalls import ToolCall, tool_calls_of

from ..wire.protocol import choice_index

SEED_SPACE = 2**31 - 1


def derive_seed(seed: int, path: Sequence[str], index: int) -> int:
    """A child sample's seed from the request seed, its span path and its index: siblings differ, reruns
    repeat. Top-level samples keep seed + i (`sample_seed`)."""
    digest = hashlib.blake2b(f"{seed}/{'/'.join(path)}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SEED_SPACE


def sample_seed(seed: int | None, path: Sequence[str], index: int) -> int | None:
    if seed is None:
        return None
    # Kept within [0, 2**31 - 1): engines take 32-bit seeds and read -1 as "random".
    return (seed + index) % SEED_SPACE if not path else derive_seed(seed, path, index)


def sampling_fields(sampling: Sampling, options: CallOptions) -> dict[str, Any]:
    """The body fields every call shares (chat or raw completion): request extras, then this call's choices."""
    body: dict[str, Any] = {**(sampling.extra if options.answers else {}), **(options.extra or {})}
    temperature = options.temperature if options.temperature is not None else sampling.temperature
    if temperature is not None:
        body["temperature"] = temperature
    if sampling.top_p is not None and options.answers:
        body["top_p"] = sampling.top_p
    body["max_tokens"] = options.max_tokens if options.max_tokens is not None else sampling.max_tokens
    stop = options.stop if options.stop is not None else (sampling.stop if options.answers else None)
    if stop is not None:
        body["stop"] = stop
    return body


def chat_body(model: str, messages: Sequence[Mapping[str, Any]], sampling: Sampling, options: CallOptions,
              max_top_logprobs: int) -> dict[str, Any]:
    body = sampling_fields(sampling, options)
    body["model"] = model
    body["messages"] = list(messages)
    if sampling.response_format is not None and options.answers:
        body["response_format"] = sampling.response_format
    if options.answers:
        body.update(sampling.tools)
    requested = options.request_top_logprobs(sampling)
    top = max(options.top_logprobs or 0, requested or 0)
    if options.logprobs or top or requested is not None:
        body["logprobs"] = True
        if top:
            body["top_logprobs"] = min(top, max_top_logprobs)
    return body


def completion_body(model: str, prompt: str | Sequence[int], sampling: Sampling, options: CallOptions,
                    max_top_logprobs: int) -> dict[str, Any]:
    body = sampling_fields(sampling, options)
    body["model"] = model
    body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
    requested = options.request_top_logprobs(sampling)
    top = max(options.top_logprobs or 0, requested or 0)
    if options.logprobs or top or requested is not None:
        # The completions API asks for logprobs by count: the sampled token plus that many alternatives.
        body["logprobs"] = min(max(1, top), max_top_logprobs)
    return body


# ---------------------------------------------------------------- tokens


def _token_id(entry: Mapping[str, Any]) -> int | None:
    value = entry.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    token = entry.get("token")
    if isinstance(token, str) and token.startswith("token_id:"):  # vLLM's return_tokens_as_token_ids
        try:
            return int(token[9:])
        except ValueError:
            return None
    return None


def _token_bytes(entry: Mapping[str, Any]) -> bytes | None:
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        value = bytes(raw)
        token = entry.get("token")
        if isinstance(token, str) and token.startswith("token_id:") and value == token.encode():
            return None  # vLLM gives a top alternative the bytes of its "token_id:N" name, not of its text
        return value
    return None


def _token_text(entry: Mapping[str, Any], raw: bytes | None) -> str:
    token = entry.get("token")
    if isinstance(token, str) and not token.startswith("token_id:"):
        return token
    return raw.decode("utf-8", "replace") if raw is not None else ""


def _logprob(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return -math.inf
    return number if not math.isnan(number) else -math.inf


class TokenReader:
    """Turns an engine's logprob entries into Tokens with character offsets, as they arrive (streams too).

    Offsets count the characters decoded from the bytes before a token. An engine that names no bytes gets them
    from the token text. On engines that merge the tokens of a split multi-byte character into one entry with the
    last token's id (llama-server does), such an entry's id is dropped (None): see RunContext.token_ids.
    """

    def __init__(self, merges_split_characters: bool) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._offset = 0
        self._merges = merges_split_characters

    def read(self, entry: Mapping[str, Any]) -> tuple[Token, str]:
        """The token, and the characters it completes in the reply (what a stream appends)."""
        raw = _token_bytes(entry)
        text = _token_text(entry, raw)
        if raw is None:
            raw = text.encode("utf-8")
        token_id = _token_id(entry)
        if self._merges and token_id is not None and any(b >= 0x80 for b in raw):
            token_id = None
        offset = self._offset
        piece = self._decoder.decode(raw)
        self._offset += len(piece)
        top = tuple(
            # text "" when the engine named only the id (vLLM's alternatives): see GuidedDecoder.alternative_text
            TokenAlternative(text=_token_text(alt, _token_bytes(alt)), logprob=_logprob(alt.get("logprob")),
                             id=_token_id(alt), bytes=_token_bytes(alt))
            for alt in entry.get("top_logprobs") or () if isinstance(alt, dict)
        )
        return Token(text=text, logprob=_logprob(entry.get("logprob")), id=token_id, bytes=raw, offset=offset,
                     top=top), piece


def logprob_entries(choice: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """A choice's logprob entries in the chat shape ({token, logprob, bytes?, id?, top_logprobs: [...]}),
    converting the legacy completions shape ({tokens, token_logprobs, top_logprobs: [{token: logprob}]})."""
    block = choice.get("logprobs")
    if not isinstance(block, dict):
        return None
    content = block.get("content")
    if isinstance(content, list):
        return [e for e in content if isinstance(e, dict)]
    tokens = block.get("tokens")
    if isinstance(tokens, list):
        values = block.get("token_logprobs") or []
        tops = block.get("top_logprobs") or []
        entries = []
        for i, token in enumerate(tokens):
            top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
            entries.append({"token": token, "logprob": values[i] if i < len(values) else None,
                            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]})
        return entries
    return None


def read_tokens(entries: Sequence[Mapping[str, Any]] | None, merges_split_characters: bool) -> tuple[Token, ...] | None:
    if entries is None:
        return None
    reader = TokenReader(merges_split_characters)
    return tuple(reader.read(e)[0] for e in entries)


# ---------------------------------------------------------------- replies


@dataclass(frozen=True)
class ParsedChoice:
    text: str
    reasoning: str
    finish_reason: str | None
    entries: list[dict[str, Any]] | None
    tool_calls: tuple[ToolCall, ...] = ()


def parse_choices(payload: Mapping[str, Any], chat: bool) -> list[ParsedChoice]:
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        return []
    parsed = []
    for choice in sorted((c for c in choices if isinstance(c, dict)), key=choice_index):
        if chat:
            message = choice.get("message") or {}
            text = message_text(message)
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            calls = tool_calls_of(message) if isinstance(message, dict) else ()
        else:
            text, reasoning, calls = str(choice.get("text") or ""), "", ()
        parsed.append(ParsedChoice(text, reasoning if isinstance(reasoning, str) else "",
                                   choice.get("finish_reason"), logprob_entries(choice), calls))
    return parsed


def completion_counts(parsed: Sequence[ParsedChoice], reported: int, counts_one_choice: bool) -> list[int] | None:
    """Completion tokens per choice: the engine's usage for one choice, logprob entries for several, an even
    split where usage covers all; None when only the tokenizer can tell (the caller estimates)."""
    if len(parsed) == 1:
        return [reported]
    if all(p.entries is not None for p in parsed) and counts_one_choice:
        return [len(p.entries or ()) for p in parsed]
    if counts_one_choice:
        return None
    counts = [reported // len(parsed)] * len(parsed)
    counts[0] += reported - sum(counts)
    return counts


def is_whole_reply(body: Mapping[str, Any]) -> bool:
    """A chat call that asks for a new reply, not the continuation of a trailing assistant message."""
    messages = body.get("messages") or []
    return not (messages and isinstance(messages[-1], Mapping) and messages[-1].get("role") == "assistant")


def make_candidate(choice: ParsedChoice, completion_tokens: int, seed: int | None, label: str,
                   merges_split_characters: bool, keep_tokens: bool, echoed: str = "",
                   prompt_tokens: int = 0, whole_reply: bool = False,
                   reported_thinking_tokens: int | None = None) -> Candidate:
    """`whole_reply`: the choice is a whole assistant reply (not the continuation of a prefix), so inline thinking
    at its start is set apart as reasoning (strategies.framework.with_thinking_apart), the tokens kept for the
    answer. The engine's own count of thinking tokens, when it reports one, is the count."""
    text = choice.text
    if echoed and text.startswith(echoed):
        text = text[len(echoed):]
    tokens = read_tokens(choice.entries, merges_split_characters) if keep_tokens else None
    separate = choice.reasoning  # the engine's reasoning_content: never in the text, nor in its logprobs
    candidate = Candidate(text=text, finish_reason=choice.finish_reason, completion_tokens=completion_tokens,
                          tokens=tokens, reasoning=separate, thinking=separate, seed=seed, label=label,
                          prompt_tokens=prompt_tokens, tool_calls=choice.tool_calls)
    if whole_reply:
        candidate = with_thinking_apart(candidate)
    if reported_thinking_tokens is not None:
        thinking_tokens = min(completion_tokens, reported_thinking_tokens)
    else:
        # The engine did not say: its separate reasoning's share of the reply's characters.
        thinking_tokens = candidate.thinking_tokens + (
            round(completion_tokens * len(separate) / (len(separate) + len(text))) if separate else 0)
    return replace(candidate, thinking_tokens=min(completion_tokens, thinking_tokens))
