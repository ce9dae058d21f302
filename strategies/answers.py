"""Reading a final answer out of a reply: its thinking set apart, then numbers, \\boxed{}, "the answer is",
normalised text; a reply that calls tools answers with its calls.

One module for every reader: strategies vote and select on `candidate_answer` / `extract_answer`, scorers and
checks read `answer_text`, and the eval grades replies with `answer_text`, `last_number`, `numbers_equal`,
`boxed_content` and `normalise_text`, so a reply is read the same way by all of them. The thinking of a reasoning
model (inline `<think>...</think>`, or the engine's separate `reasoning_content`, which never reaches the text) is
never part of the answer: `split_thinking` is the one place that decides where it ends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from .toolcalls import ToolCall, tool_calls_key

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# A number as people write it: thousands separators only in groups of three ("1,000"; "1,2,3" is three numbers),
# an ASCII or Unicode minus glued to the digits, decimals, simple fractions ("3/4").
NUMBER = re.compile(r"(?<![\d.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d])|(?<![\d])[-−]?\.\d+")
_BOXED = re.compile(r"\\boxed\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.IGNORECASE)


def parse_number(text: str) -> Fraction | None:
    """'1,000' -> 1000, '56.0' -> 56, '−3' -> -3, '3/4' -> 3/4; None unless the whole (stripped) text is a
    finite number."""
    cleaned = text.strip().replace(",", "").replace("−", "-")
    if not cleaned or not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?", cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def normalise_number(token: str) -> str:
    """A number's canonical text: '1,000' -> '1000', '3.50' -> '3.5', '-0' -> '0', '6/3' -> '2', '1/2' -> '0.5',
    '1/3' -> '1/3'. Text that is not a number comes back stripped."""
    value = parse_number(token)
    if value is None:
        return token.strip()
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    if denominator != 1:  # not a finite decimal
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    return f"{float(value):.{digits}f}"


def numbers_equal(a: str, b: str) -> bool:
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


def last_number(text: str) -> str | None:
    """The last number written in `text`, as written (thousands separators, minus signs kept)."""
    found = NUMBER.findall(text)
    return found[-1] if found else None


def boxed_content(text: str) -> str | None:
    """The content of the last complete \\boxed{...}, nested braces balanced (a truncated last box is skipped)."""
    start, end = _boxed_span(text)
    return text[start:end] if start is not None and end is not None else None


def normalise_text(text: str) -> str:
    """Lowercase, runs of whitespace collapsed, surrounding punctuation and markup dropped."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .!?,;:\"'`*$。")


def split_thinking(text: str, open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE) -> tuple[str, str]:
    """(thinking, answer) of a reply's content. Thinking is everything up to the last close tag (its open tag
    dropped; a model whose template opened the thinking writes only the close tag); a reply that opens its
    thinking and never closes it has no answer yet. Content without tags is all answer."""
    end = text.rfind(close_tag)
    if end >= 0:
        thinking = text[:end]
        start = thinking.find(open_tag)
        if start >= 0 and not thinking[:start].strip():
            thinking = thinking[start + len(open_tag):]
        return thinking.strip(), text[end + len(close_tag):].lstrip()
    stripped = text.lstrip()
    if stripped.startswith(open_tag):
        return stripped[len(open_tag):].strip(), ""
    return "", text


class ThinkingSplitter:
    """`split_thinking` for a reply that arrives in pieces (a streamed answer): `feed` returns the (thinking,
    answer) text each piece releases. A `<think>` block at the reply's start (after whitespace) is thinking, what
    follows its close tag the answer (its leading whitespace dropped, as split_thinking drops it); a reply that
    does not open with the tag is all answer. A tag split across pieces is held back until it is whole: what is
    held when the reply ends is still the reply's, in its text (never released as answer here)."""

    def __init__(self, open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE) -> None:
        self._open, self._close = open_tag, close_tag
        self._state = "start"  # start -> thinking -> after (the close tag) -> answer; start -> answer
        self._held = ""

    def feed(self, piece: str) -> tuple[str, str]:
        text = self._held + piece
        self._held = ""
        thinking = ""
        if self._state == "start":
            stripped = text.lstrip()
            if len(stripped) < len(self._open) and self._open.startswith(stripped):
                self._held = text  # nothing but whitespace and the start of an open tag yet
                return "", ""
            if not stripped.startswith(self._open):
                self._state = "answer"
                return "", text
            self._state = "thinking"
            text = stripped[len(self._open):]
        if self._state == "thinking":
            end = text.find(self._close)
            if end < 0:
                keep = _partial_suffix(text, self._close)
                self._held = text[len(text) - keep:]
                return text[:len(text) - keep], ""
            thinking, text = text[:end], text[end + len(self._close):]
            self._state = "after"
        if self._state == "after":
            text = text.lstrip()
            if not text:
                return thinking, ""
            self._state = "answer"
        return thinking, text


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is the start of `tag` (a tag cut by a piece boundary)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def answer_text(text: str) -> str:
    """A reply's content without its thinking: what is graded, voted on, scored and checked."""
    return split_thinking(text)[1]


class Reply(Protocol):
    """What `candidate_answer` reads of a candidate (strategies.framework.Candidate)."""

    @property
    def text(self) -> str: ...

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]: ...


def candidate_answer(reply: Reply) -> str:
    """The answer a candidate votes with: its tool calls (name and canonical arguments, see
    strategies.toolcalls.tool_calls_key) when it made any, else the answer extracted from its text."""
    if reply.tool_calls:
        return tool_calls_key(reply.tool_calls)
    return extract_answer(reply.text)


def extract_answer(text: str) -> str:
    """From the reply's answer (its thinking set apart): \\boxed{}, then '####', then 'the answer is', then the
    last number, else the normalised text; a number is given in canonical form (see normalise_number), so '1,000',
    '1000.0' and '1000' vote together."""
    return locate_answer(answer_text(text)).answer


@dataclass(frozen=True)
class LocatedAnswer:
    """The answer `extract_answer` reads and where its text is in the reply: [start, end) (the whole reply when
    the answer is the normalised text)."""

    answer: str
    start: int
    end: int


def locate_answer(text: str) -> LocatedAnswer:
    """The answer as `extract_answer` reads it (from text without thinking), with the span of the text it was read
    from (strategies that judge the answer's own tokens, such as cot_decoding's margin, need where it is)."""
    for start, end in (_boxed_span(text), _last_group_span(_HASHES, text), _last_group_span(_ANSWER_IS, text)):
        if start is None or end is None or not text[start:end].strip():
            continue
        found = text[start:end]
        numbers = list(NUMBER.finditer(found))
        if numbers:
            number = numbers[-1]
            return LocatedAnswer(normalise_number(number.group()), start + number.start(), start + number.end())
        return LocatedAnswer(normalise_text(found), start, end)
    numbers = list(NUMBER.finditer(text))
    if numbers:
        return LocatedAnswer(normalise_number(numbers[-1].group()), numbers[-1].start(), numbers[-1].end())
    return LocatedAnswer(normalise_text(text), 0, len(text))


def _boxed_span(text: str) -> tuple[int | None, int | None]:
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return match.end(), i
    return None, None


def _last_group_span(pattern: re.Pattern[str], text: str) -> tuple[int | None, int | None]:
    matches = list(pattern.finditer(text))
    return (matches[-1].start(1), matches[-1].end(1)) if matches else (None, None)


@dataclass(frozen=True)
class Tally:
    """Votes per answer, in order of first appearance for stable tie-breaking."""

    counts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.counts.values())

    def ranked(self) -> list[tuple[str, float]]:
        order = {a: i for i, a in enumerate(self.counts)}
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], order[kv[0]]))

    @property
    def leader(self) -> str:
        return self.ranked()[0][0]


def tally(answers: Iterable[str], weights: Sequence[float] | None = None) -> Tally:
    counts: dict[str, float] = {}
    for i, answer in enumerate(answers):
        counts[answer] = counts.get(answer, 0.0) + (weights[i] if weights is not None else 1.0)
    return Tally(counts)
