"""Grading a reply against a task's answer. Replies are read with strategies.answers, as strategies read them: a
reasoning model's thinking (`<think>...</think>`) is set apart first, so only the answer is graded.

Checks:
    number  the last number in the reply equals `answer` numerically ("1,000" == "1000", "56.0" == "56", "−3" == "-3")
    exact   normalised equality (case, runs of whitespace, surrounding punctuation and markup ignored)
    regex   `answer` is a Python regular expression searched for in the reply (use (?i) to ignore case)
    boxed   the content of the last \\boxed{...} (balanced braces): compared like `number` when `answer` is a
            number (the last number in the box), else like `exact`
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ttc_proxy.strategies.answers import answer_text, boxed_content, last_number, normalise_text, numbers_equal, parse_number


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None  # what was compared with the answer; None when nothing could be extracted


def check_number(reply: str, answer: str) -> Verdict:
    number = last_number(reply)
    return Verdict(number is not None and numbers_equal(number, answer), number)


def check_exact(reply: str, answer: str) -> Verdict:
    extracted = normalise_text(reply)
    return Verdict(extracted == normalise_text(answer), extracted)


def check_regex(reply: str, answer: str) -> Verdict:
    match = re.search(answer, reply)
    return Verdict(match is not None, match.group(0) if match else None)


def check_boxed(reply: str, answer: str) -> Verdict:
    content = boxed_content(reply)
    if content is None:
        return Verdict(False, None)
    if parse_number(answer) is not None:
        return Verdict(check_number(content, answer).correct, content)
    return Verdict(normalise_text(content) == normalise_text(answer), content)


CHECKS: dict[str, Callable[[str, str], Verdict]] = {
    "number": check_number,
    "exact": check_exact,
    "regex": check_regex,
    "boxed": check_boxed,
}


def check_reply(check: str, reply: str, answer: str) -> Verdict:
    return CHECKS[check](answer_text(reply), answer)
