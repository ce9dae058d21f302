"""Task files: JSON Lines, one object a line:
    {"id": "t1", "question": "What is 6 times 7?", "answer": "42", "check": "number"}
`messages` (an OpenAI chat message list) may replace `question`; `check` is one of tools.eval.checks.CHECKS.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ttc_proxy.strategies.answers import parse_number

from ..argtypes import positive_int
from .checks import CHECKS, Verdict, check_reply


class EvalError(Exception):
    """The evaluation cannot run: a bad task file or option, or a proxy that did not start."""


@dataclass(frozen=True)
class Task:
    id: str
    messages: list[dict[str, Any]]
    answer: str
    check: str
    index: int = 0  # position in the task file (seeds follow it, so a subset draws what the whole file would)

    def grade(self, reply: str) -> Verdict:
        return check_reply(self.check, reply, self.answer)


def parse_task(raw: Any, where: str) -> Task:
    if not isinstance(raw, dict):
        raise EvalError(f"{where}: a task must be a JSON object")
    task_id = raw.get("id")
    if not isinstance(task_id, (str, int)) or isinstance(task_id, bool) or str(task_id) == "":
        raise EvalError(f"{where}: `id` must be a non-empty string or integer")
    if "question" in raw and "messages" in raw:
        raise EvalError(f"{where}: give `question` or `messages`, not both")
    if isinstance(raw.get("question"), str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": raw["question"]}]
    elif isinstance(raw.get("messages"), list) and raw["messages"] and all(isinstance(m, dict) for m in raw["messages"]):
        messages = raw["messages"]
    else:
        raise EvalError(f"{where}: needs `question` (a string) or `messages` (a non-empty list of objects)")
    answer = raw.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise EvalError(f"{where}: `answer` must be a string or a number")
    check = raw.get("check")
    if check not in CHECKS:
        raise EvalError(f"{where}: `check` must be one of {', '.join(CHECKS)}, got {check!r}")
    answer_text = str(answer)
    if check == "number" and parse_number(answer_text) is None:
        raise EvalError(f"{where}: check `number` needs a numeric answer, got {answer_text!r}")
    if check == "regex":
        try:
            re.compile(answer_text)
        except re.error as exc:
            raise EvalError(f"{where}: `answer` is not a valid regular expression: {exc}") from exc
    return Task(str(task_id), messages, answer_text, check)


def add_subset_arguments(parser: argparse.ArgumentParser) -> None:
    """--every, --start, --limit: which tasks of the file a command uses (`load_tasks` takes them)."""
    parser.add_argument("--every", type=positive_int, default=1, metavar="N",
                        help="every N-th task of the file (a fixed subset; seeds follow the file position, so the "
                             "subset's samples are the whole file's)")
    parser.add_argument("--start", type=int, default=0, metavar="K",
                        help="begin at the file's K-th task, 0-based (default 0): --every 2 is one half of the "
                             "file, --every 2 --start 1 the other")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N tasks (after --every)")


def load_tasks(path: str | Path, limit: int | None = None, every: int = 1, start: int = 0) -> list[Task]:
    """The tasks of a JSON Lines file (blank lines skipped): every `every`-th one from task `start` (a fixed,
    type-stratified subset when the file is grouped by type: `every=2` is one half, `every=2, start=1` the other),
    the first `limit` of those when given."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"cannot read the task file: {exc}") from exc
    tasks: list[Task] = []
    seen: set[str] = set()
    index = -1
    for number, line in enumerate(lines, 1):
        if limit is not None and len(tasks) >= limit:
            break
        if not line.strip():
            continue
        index += 1
        where = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise EvalError(f"{where}: not valid JSON: {exc}") from exc
        task = replace(parse_task(raw, where), index=index)
        if task.id in seen:
            raise EvalError(f"{where}: duplicate task id {task.id!r}")
        seen.add(task.id)
        if index >= start and (index - start) % every == 0:
            tasks.append(task)
    if not tasks:
        raise EvalError(f"{path}: no tasks")
    return tasks

