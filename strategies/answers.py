"""Extracting a comparable final answer from a free-text reply, and voting over answers."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_BOXED = re.compile(r"\\boxed\s*\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed_contents(text: str) -> str | None:
    """The contents of the last \\boxed{...}, with nested braces balanced."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def normalise_number(token: str) -> str:
    """'1,000' -> '1000', '3.50' -> '3.5', '-0' -> '0', '6/3' kept as a fraction string."""
    token = token.replace(",", "").strip()
    if "/" in token:
        return token
    try:
        value = float(token)
    except ValueError:
        return token
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def normalise_text(text: str) -> str:
    text = text.strip().lower()
    text = re.sub(r"[\s]+", " ", text)
    return text.strip(" .!,;:\"'`*$")


def last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def extract_answer(text: str) -> str:
    """\\boxed{}, then '####', then 'the answer is', then the last number, else the normalised text."""
    for found in (_boxed_contents(text), _last_group(_HASHES, text), _last_group(_ANSWER_IS, text)):
        if found is not None and found.strip():
            number = last_number(found)
            return number if number is not None else normalise_text(found)
    number = last_number(text)
    return number if number is not None else normalise_text(text)


def _last_group(pattern: re.Pattern[str], text: str) -> str | None:
    matches = pattern.findall(text)
    return matches[-1] if matches else None


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
