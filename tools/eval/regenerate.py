"""`ttc-proxy report RESULTS...`: the eval's tables rebuilt from saved results.json files, so a committed table is
regenerated, never edited by hand.

Every summary, interval and pairwise difference is recomputed from the records (one per task and model string);
the summary stored in results.json is not read. Several files are merged: a model string found in more than one is
labelled `MODEL@FOLDER` (its results folder's name), so the same model string run on two engines is a pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import render_markdown, write_tables
from .runner import Record
from .stats import pairwise_differences, summarise_all
from .tasks import EvalError

RESULTS_FILE = "results.json"
_RECORD_FIELDS = {f.name for f in dataclasses.fields(Record)}


@dataclasses.dataclass(frozen=True)
class SavedRun:
    path: Path
    meta: dict[str, Any]
    results: dict[str, list[Record]]  # model string -> its records, in the order the eval ran them


def results_path(argument: str) -> Path:
    """A results.json file, or a folder holding one."""
    path = Path(argument)
    return path / RESULTS_FILE if path.is_dir() else path


def load_run(path: Path) -> SavedRun:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvalError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(document, dict) or not isinstance(document.get("records"), list):
        raise EvalError(f"{path}: not an eval results.json (no records list)")
    meta = document.get("meta") if isinstance(document.get("meta"), dict) else {}
    results: dict[str, list[Record]] = {model: [] for model in meta.get("models") or []}
    for index, raw in enumerate(document["records"]):
        try:
            record = Record(**{k: v for k, v in raw.items() if k in _RECORD_FIELDS})
        except (AttributeError, TypeError) as exc:
            raise EvalError(f"{path}: record {index} is not an eval record ({exc})") from exc
        results.setdefault(record.model, []).append(record)
    results = {model: records for model, records in results.items() if records}
    if not results:
        raise EvalError(f"{path}: holds no records")
    return SavedRun(path, meta, results)


def merge_runs(runs: Sequence[SavedRun]) -> dict[str, list[Record]]:
    """One mapping of labelled model strings; a model string in several runs is labelled MODEL@FOLDER."""
    seen: dict[str, int] = {}
    for run in runs:
        for model in run.results:
            seen[model] = seen.get(model, 0) + 1
    merged: dict[str, list[Record]] = {}
    for run in runs:
        for model, records in run.results.items():
            label = f"{model}@{run.path.parent.name}" if seen[model] > 1 else model
            if label in merged:
                raise EvalError(f"{label!r} comes from two results files in folders of the same name")
            merged[label] = records
    return merged


def merged_meta(runs: Sequence[SavedRun], models: Sequence[str], baseline: str) -> dict[str, Any]:
    if len(runs) == 1:
        return {**runs[0].meta, "models": list(models), "baseline": baseline}
    files = sorted({str(run.meta.get("tasks_file", "-")) for run in runs})
    settings = [run.meta.get("settings") or {} for run in runs]
    return {
        "tasks_file": ", ".join(files),
        "tasks": max(int(run.meta.get("tasks") or 0) for run in runs),
        "settings": settings[0] if all(s == settings[0] for s in settings) else {},
        "models": list(models), "baseline": baseline, "sources": [str(run.path) for run in runs],
    }


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "report", help="rebuild the eval's tables from saved results.json files",
        description="Reads one or more results.json files written by `ttc-proxy eval` (or folders holding one), "
                    "recomputes every summary, the Δ against the baseline and the pairwise Δ matrix from the "
                    "records, prints the markdown report and writes report.md, summary.csv, pairwise.csv and the "
                    "plot to --out. A model string found in several files is labelled MODEL@FOLDER.",
    )
    parser.add_argument("results", nargs="+", metavar="RESULTS", help="results.json files or folders holding one")
    parser.add_argument("--baseline", help="the model string (label) the others are compared with (default: the "
                                           "baseline saved in the first file, else its first model string)")
    parser.add_argument("--out", help="output directory (default: the folder of the one results file; required "
                                      "with several)")
    parser.set_defaults(handler=report_command)
    return parser


def report_command(args: argparse.Namespace) -> int:
    """Exit status: 0 written, 2 unreadable input or a bad option."""
    try:
        paths = [results_path(argument) for argument in args.results]
        if len(paths) > 1 and not args.out:
            raise EvalError("--out is required with several results files")
        runs = [load_run(path) for path in paths]
        results = merge_runs(runs)
        models = list(results)
        saved_baseline = runs[0].meta.get("baseline")
        baseline = args.baseline or (saved_baseline if saved_baseline in results else models[0])
        if baseline not in results:
            raise EvalError(f"--baseline {baseline!r} is not among the model strings: {models}")
    except EvalError as exc:
        print(f"ttc-proxy report: {exc}", file=sys.stderr)
        return 2
    summaries = summarise_all(results, baseline)
    differences = pairwise_differences(results)
    meta = merged_meta(runs, models, baseline)
    out = Path(args.out) if args.out else paths[0].parent
    title = f"{meta.get('tasks_file', '-')}, {meta.get('tasks', '-')} tasks"
    written = write_tables(out, meta, summaries, baseline, differences, title)
    print(render_markdown(meta, summaries, baseline, differences), end="")
    print("written: " + ", ".join(str(p) for p in written))
    return 0
