"""What `ttc-proxy pts` writes, and how a run resumes from it.

DIR/pivotal_tokens.jsonl  one pivotal token a line, with exactly the fields of codelion/pts's (v1) PivotalToken
                          records, in their meaning: `pivot_context` is the whole text before the token, the
                          rendered chat prompt included (as pts decodes its prompt-plus-prefix ids), `prob_delta`
                          is prob_after - prob_before, `is_positive` is prob_delta > 0.
DIR/dpo_pairs.jsonl       {prompt, chosen, rejected, metadata: {original_query, prob_delta, task_type, ...}}: a
                          positive pivot and an alternative measured to lower p by the threshold (rejected), or a
                          negative pivot (rejected) and an alternative measured to raise it (chosen).
DIR/progress.jsonl        a `start` line per run (its settings) and a `done` line per finished task (its stats);
                          a task without a `done` line is searched again by the next run with this DIR.
DIR/summary.json          the totals, rewritten at the end of every run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

PIVOTS_FILE = "pivotal_tokens.jsonl"
DPO_FILE = "dpo_pairs.jsonl"
PROGRESS_FILE = "progress.jsonl"
SUMMARY_FILE = "summary.json"

# Settings that must match for a run to continue another's output (the others, e.g. --limit, may change).
RESUME_KEYS = ("model", "tasks_file", "rollouts", "threshold", "min_p", "max_p", "answers_per_task", "temperature",
               "max_tokens", "dpo_candidates", "seed", "extra_body")


class RecordError(ValueError):
    """A record that does not have the format's fields and types."""


class OutputError(Exception):
    """The output directory cannot be used (unreadable, or holding a search made with other settings)."""


def timestamp() -> str:
    """codelion/pts's timestamp format (local time, to the second)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


@dataclass(frozen=True)
class PivotalTokenRecord:
    model_id: str
    query: str
    pivot_context: str
    pivot_token: str
    pivot_token_id: int
    prob_before: float
    prob_after: float
    prob_delta: float
    is_positive: bool
    task_type: str
    dataset_id: str | None
    dataset_item_id: str | None
    timestamp: str

    @classmethod
    def make(cls, *, model_id: str, query: str, pivot_context: str, pivot_token: str, pivot_token_id: int,
             prob_before: float, prob_after: float, task_type: str, dataset_id: str | None,
             dataset_item_id: str | None, when: str | None = None) -> "PivotalTokenRecord":
        delta = round(prob_after - prob_before, 10)
        return cls(model_id, query, pivot_context, pivot_token, pivot_token_id, prob_before, prob_after, delta,
                   delta > 0, task_type, dataset_id, dataset_item_id, when or timestamp())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PivotalTokenRecord":
        names = [f.name for f in fields(cls)]
        if set(data) != set(names):
            raise RecordError(f"a pivotal-token record has exactly the fields {names}; got {sorted(data)}")
        expected: dict[str, tuple[type, ...]] = {
            "pivot_token_id": (int,), "prob_before": (int, float), "prob_after": (int, float),
            "prob_delta": (int, float), "is_positive": (bool,), "dataset_id": (str, type(None)),
            "dataset_item_id": (str, type(None)),
        }
        for name in names:
            value = data[name]
            kinds = expected.get(name, (str,))
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise RecordError(f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        return cls(**{name: data[name] for name in names})


@dataclass(frozen=True)
class DpoPair:
    prompt: str
    chosen: str
    rejected: str
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dpo_pair(record: PivotalTokenRecord, other_token: str, other_token_id: int, other_prob: float) -> DpoPair:
    """The pair of a pivot and its measured counterpart: the pivot is chosen if it raised p, else rejected."""
    if record.is_positive:
        chosen, chosen_id, prob_chosen = record.pivot_token, record.pivot_token_id, record.prob_after
        rejected, rejected_id, prob_rejected = other_token, other_token_id, other_prob
    else:
        chosen, chosen_id, prob_chosen = other_token, other_token_id, other_prob
        rejected, rejected_id, prob_rejected = record.pivot_token, record.pivot_token_id, record.prob_after
    return DpoPair(record.pivot_context, chosen, rejected, {
        "original_query": record.query, "prob_chosen": prob_chosen, "prob_rejected": prob_rejected,
        "prob_before": record.prob_before, "prob_delta": record.prob_delta, "task_type": record.task_type,
        "chosen_token_id": chosen_id, "rejected_token_id": rejected_id, "dataset_id": record.dataset_id,
        "dataset_item_id": record.dataset_item_id,
    })


@dataclass
class Spend:
    """What the engine was asked for: generation calls and their tokens as the engine reports them (with n > 1,
    completion tokens are the larger of the report and the continuations re-tokenized: llama-server counts one
    choice), prompt tokens it served from its cache when it says so, and tokenizer calls (free)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int | None = None  # None: the engine never reported it
    tokenizer_calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Spend") -> None:
        self.calls += other.calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        if other.cached_prompt_tokens is not None:
            self.cached_prompt_tokens = (self.cached_prompt_tokens or 0) + other.cached_prompt_tokens
        self.tokenizer_calls += other.tokenizer_calls

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Spend":
        return cls(**{f.name: data.get(f.name, f.default) for f in fields(cls)})


@dataclass
class TaskDone:
    """A finished task's line in progress.jsonl: `searched` (its p was in range) or `skipped` (it was not)."""

    task: str
    index: int
    status: str
    p: float
    samples: int
    answers: int = 0  # replies searched
    pivots: int = 0
    positive: int = 0
    dpo_pairs: int = 0
    estimates: int = 0  # prefixes whose p was measured by rollouts
    spend: Spend = field(default_factory=Spend)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"event": "done", **asdict(self), "spend": self.spend.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TaskDone":
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["spend"] = Spend.from_dict(data.get("spend") or {})
        return cls(**values)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file; a torn last line (a run killed while writing) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            if number == len(lines):
                break
            raise OutputError(f"{path}:{number}: not valid JSON: {exc}") from exc
        if isinstance(value, dict):
            records.append(value)
    return records


class OutputDir:
    """DIR as one run uses it: what earlier runs finished, and appends that reach the disk line by line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.done: dict[str, TaskDone] = {}
        self.starts: list[dict[str, Any]] = []
        self._files: dict[str, TextIO] = {}

    def open(self, settings: Mapping[str, Any]) -> None:
        """Read what is there, refuse other settings, keep only finished tasks' records, and log this run's start."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            progress = _read_jsonl(self.path / PROGRESS_FILE)
        except OSError as exc:
            raise OutputError(f"cannot use {self.path}: {exc}") from exc
        self.starts = [r for r in progress if r.get("event") == "start"]
        if self.starts:
            before = self.starts[0].get("settings") or {}
            changed = [k for k in RESUME_KEYS if before.get(k) != settings.get(k)]
            if changed:
                raise OutputError(f"{self.path} holds a search made with other settings "
                                  f"({', '.join(f'{k}: {before.get(k)!r}' for k in changed)}); "
                                  f"use another --out, or the same settings to continue it")
        self.done = {r["task"]: TaskDone.from_dict(r) for r in progress if r.get("event") == "done"}
        self._keep_finished()
        for name in (PIVOTS_FILE, DPO_FILE):
            (self.path / name).touch()  # there, if empty, when nothing is found
        self._append(PROGRESS_FILE, {"event": "start", "time": timestamp(), "settings": dict(settings)})

    def _keep_finished(self) -> None:
        """Drop the records of tasks no run finished (they are searched again, and would otherwise repeat)."""
        for name, item in ((PIVOTS_FILE, lambda r: r.get("dataset_item_id")),
                           (DPO_FILE, lambda r: (r.get("metadata") or {}).get("dataset_item_id"))):
            path = self.path / name
            if not path.exists():
                continue
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [r for r in _read_jsonl(path) if item(r) in self.done]
            if len(kept) != len(lines):  # records of unfinished tasks, or a torn last line
                temporary = path.with_suffix(".tmp")
                temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept),
                                     encoding="utf-8")
                os.replace(temporary, path)

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        handle = self._files.get(name)
        if handle is None:
            handle = self._files[name] = open(self.path / name, "a", encoding="utf-8")
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()

    def add_pivot(self, record: PivotalTokenRecord) -> None:
        self._append(PIVOTS_FILE, record.to_dict())

    def add_pair(self, pair: DpoPair) -> None:
        self._append(DPO_FILE, pair.to_dict())

    def finish(self, done: TaskDone) -> None:
        self.done[done.task] = done
        self._append(PROGRESS_FILE, done.to_dict())

    def pivots(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / PIVOTS_FILE)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        (self.path / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def summarise(done: Iterable[TaskDone], pivots: Iterable[Mapping[str, Any]], *, settings: Mapping[str, Any],
              tasks_selected: int, errors: Mapping[str, str], this_run: Spend, seconds: float,
              stopped: str | None) -> dict[str, Any]:
    """summary.json: every run's finished tasks together, and this run's spend and why it stopped."""
    finished = sorted(done, key=lambda d: d.index)
    total = Spend()
    for item in finished:
        total.add(item.spend)
    records = list(pivots)
    searched = [d for d in finished if d.status == "searched"]
    return {
        "model": settings.get("model"),
        "tasks_file": settings.get("tasks_file"),
        "tasks_selected": tasks_selected,
        "tasks_done": len(finished),
        "tasks_searched": len(searched),
        "tasks_skipped": len(finished) - len(searched),
        "tasks_failed": dict(errors),
        "p_range": [settings.get("min_p"), settings.get("max_p")],
        "pivots": len(records),
        "positive": sum(1 for r in records if r.get("is_positive") is True),
        "negative": sum(1 for r in records if r.get("is_positive") is False),
        "dpo_pairs": sum(d.dpo_pairs for d in finished),
        "estimates": sum(d.estimates for d in finished),
        "spend_finished_tasks": total.to_dict(),
        "task_seconds_total": round(sum(d.seconds for d in finished), 1),  # tasks overlap under --concurrency
        "this_run": {"spend": this_run.to_dict(), "seconds": round(seconds, 1), "stopped": stopped},
        "stopped": stopped,
        "settings": dict(settings),
        "tasks": [{"id": d.task, "status": d.status, "p": d.p, "samples": d.samples, "answers": d.answers,
                   "pivots": d.pivots, "positive": d.positive, "dpo_pairs": d.dpo_pairs, "estimates": d.estimates}
                  for d in finished],
    }
