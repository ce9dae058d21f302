"""An eval's results as tables (aligned text on stdout, markdown in report.md), results.json (every request),
summary.csv, pairwise.csv (every pair's paired difference) and a plot of accuracy against tokens."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .runner import Record
from .stats import ACCURACY_METHOD, DIFF_METHOD, PAIRWISE_METHOD, PairwiseDifference, Summary


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _pct(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 100:+.1f}" if signed else f"{value * 100:.1f}"


def _table_rows(summaries: Sequence[Summary]) -> tuple[list[str], list[list[str]]]:
    headers = ["model", "tasks", "accuracy %", "95% CI", "Δ vs baseline (pp)", "95% CI", "prompt tok",
               "cached", "compl tok", "calls", "p50 ms", "p95 ms", "TTFT p50", "errors"]
    rows = []
    for s in summaries:
        diff = s.diff_vs_baseline
        rows.append([
            s.model, str(s.tasks), _pct(s.accuracy.estimate), f"[{_pct(s.accuracy.low)}, {_pct(s.accuracy.high)}]",
            "(baseline)" if diff is None else _pct(diff.estimate, signed=True),
            "" if diff is None else f"[{_pct(diff.low, True)}, {_pct(diff.high, True)}]",
            _num(s.mean_prompt_tokens), _num(s.mean_cached_tokens), _num(s.mean_completion_tokens),
            _num(s.mean_backend_calls, 2),
            _num(s.latency_p50_ms, 0), _num(s.latency_p95_ms, 0), _num(s.ttft_p50_ms, 0), str(s.errors),
        ])
    return headers, rows


def _matrix_rows(differences: Sequence[PairwiseDifference]) -> tuple[list[str], list[list[str]]]:
    models = list(dict.fromkeys([d.row for d in differences] + [d.column for d in differences]))
    cell = {(d.row, d.column): d.difference for d in differences}
    numbers = {model: str(number) for number, model in enumerate(models, start=1)}
    headers = ["row − column (pp)", *(numbers[m] for m in models)]
    rows = []
    for row in models:
        cells = [f"{numbers[row]}. {row}"]
        for column in models:
            diff = cell.get((row, column))
            cells.append("" if diff is None else
                         f"{_pct(diff.estimate, True)} [{_pct(diff.low, True)}, {_pct(diff.high, True)}]")
        rows.append(cells)
    return headers, rows


def _aligned(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]


def _markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [fmt(headers), "|" + "|".join("---" for _ in headers) + "|", *(fmt(r) for r in rows)]


TOKENS_NOTE = ("tokens (from `usage`; `cached`: of the prompt tokens, those the engine served from its prefix cache) "
               "and calls (`ttc.backend_calls`, 1 for pass-through) are means per answered task; latency percentiles "
               "over answered requests")


def render_table(summaries: Sequence[Summary], baseline: str) -> str:
    """The summary table as aligned text (the eval's stdout)."""
    return "\n".join([
        ACCURACY_METHOD,
        f"Δ vs baseline {baseline}: {DIFF_METHOD}, in percentage points",
        TOKENS_NOTE,
        "",
        *_aligned(*_table_rows(summaries)),
    ])


def render_matrix(differences: Sequence[PairwiseDifference]) -> str:
    """Every pair's paired difference as aligned text; columns are numbered as the rows."""
    if not differences:
        return ""
    return "\n".join([f"pairwise Δ: {PAIRWISE_METHOD}", "", *_aligned(*_matrix_rows(differences))])


def render_markdown(meta: Mapping[str, Any], summaries: Sequence[Summary], baseline: str,
                    differences: Sequence[PairwiseDifference]) -> str:
    """report.md: what ran, the summary table and the pairwise matrix, regenerated from results.json only."""
    settings = meta.get("settings") or {}
    lines = [
        "<!-- written by ttc-proxy eval / ttc-proxy report from results.json: do not edit by hand -->",
        "",
        f"Tasks: {meta.get('tasks', '-')} from `{meta.get('tasks_file', '-')}`; "
        f"max_tokens {settings.get('max_tokens', '-')}, temperature {settings.get('temperature', 'default')}, "
        f"seed {settings.get('seed', '-')}, concurrency {settings.get('concurrency', '-')}"
        + (f", pool {meta['pool']}" if meta.get("pool") else "")
        + (f"; started {meta['started_at']}, {meta['duration_s']} s" if meta.get("started_at") else "") + ".",
        "",
        f"{ACCURACY_METHOD}. Δ vs baseline `{baseline}`: {DIFF_METHOD}. {TOKENS_NOTE}.",
        "",
        *_markdown(*_table_rows(summaries)),
    ]
    if differences:
        lines += ["", f"Pairwise Δ, {PAIRWISE_METHOD}; the columns are numbered as the rows.", "",
                  *_markdown(*_matrix_rows(differences))]
    return "\n".join(lines) + "\n"


def render_errors(results: Mapping[str, Sequence[Record]], top: int = 5) -> str:
    """The most frequent errors with their counts, and the model strings they came from ("" when none failed)."""
    counts: dict[str, int] = {}
    models: dict[str, list[str]] = {}
    for model, records in results.items():
        for record in records:
            if record.error is not None:
                counts[record.error] = counts.get(record.error, 0) + 1
                if model not in models.setdefault(record.error, []):
                    models[record.error].append(model)
    if not counts:
        return ""
    failed, total = sum(counts.values()), sum(len(r) for r in results.values())
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    lines = [f"errors: {failed} of {total} requests failed; the most frequent:"]
    lines += [f"  {count:>5} x  {error}  ({', '.join(models[error])})" for error, count in ranked[:top]]
    if len(ranked) > top:
        lines.append(f"  ... and {len(ranked) - top} other errors ({sum(c for _, c in ranked[top:])} requests); "
                     f"every one is in results.json")
    return "\n".join(lines)


def _clean(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 6)


def summary_row(s: Summary, baseline: str) -> dict[str, Any]:
    diff = s.diff_vs_baseline
    return {
        "model": s.model, "tasks": s.tasks, "answered": s.answered, "errors": s.errors, "correct": s.correct,
        "accuracy": _clean(s.accuracy.estimate), "accuracy_low": _clean(s.accuracy.low),
        "accuracy_high": _clean(s.accuracy.high), "baseline": baseline,
        "diff_vs_baseline": None if diff is None else _clean(diff.estimate),
        "diff_low": None if diff is None else _clean(diff.low),
        "diff_high": None if diff is None else _clean(diff.high),
        "mean_prompt_tokens": _clean(s.mean_prompt_tokens), "mean_completion_tokens": _clean(s.mean_completion_tokens),
        "mean_total_tokens": _clean(s.mean_total_tokens), "mean_cached_tokens": _clean(s.mean_cached_tokens),
        "mean_backend_calls": _clean(s.mean_backend_calls),
        "latency_p50_ms": _clean(s.latency_p50_ms), "latency_p95_ms": _clean(s.latency_p95_ms),
        "ttft_p50_ms": _clean(s.ttft_p50_ms),
    }


def write_json(path: Path, meta: Mapping[str, Any], summaries: Sequence[Summary], baseline: str,
               results: Mapping[str, Sequence[Record]]) -> None:
    document = {
        "meta": dict(meta),
        "summary": [summary_row(s, baseline) for s in summaries],
        "records": [asdict(r) for records in results.values() for r in records],
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(path: Path, summaries: Sequence[Summary], baseline: str) -> None:
    rows = [summary_row(s, baseline) for s in summaries]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def write_pairwise_csv(path: Path, differences: Sequence[PairwiseDifference]) -> None:
    fields = ["row", "column", "pairs", "only_row", "only_column", "diff", "diff_low", "diff_high", "method"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for d in differences:
            writer.writerow({
                "row": d.row, "column": d.column, "pairs": d.pairs, "only_row": d.only_row,
                "only_column": d.only_column, "diff": _clean(d.difference.estimate),
                "diff_low": _clean(d.difference.low), "diff_high": _clean(d.difference.high),
                "method": "newcombe_paired",
            })


def write_tables(out: Path, meta: Mapping[str, Any], summaries: Sequence[Summary], baseline: str,
                 differences: Sequence[PairwiseDifference], title: str) -> list[Path]:
    """Everything derived from the records: summary.csv, pairwise.csv, report.md and the plot (when matplotlib is
    installed). The paths written."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "summary.csv", summaries, baseline)
    write_pairwise_csv(out / "pairwise.csv", differences)
    (out / "report.md").write_text(render_markdown(meta, summaries, baseline, differences), encoding="utf-8")
    written = [out / "summary.csv", out / "pairwise.csv", out / "report.md"]
    if write_plot(out / "accuracy_vs_tokens.png", summaries, title):
        written.append(out / "accuracy_vs_tokens.png")
    return written


def write_plot(path: Path, summaries: Sequence[Summary], title: str) -> bool:
    """Accuracy (Wilson bars) against mean total tokens per task; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [s for s in summaries if s.mean_total_tokens is not None and not math.isnan(s.accuracy.estimate)]
    figure, axes = plt.subplots(figsize=(11, 5.5))
    colours = plt.get_cmap("tab20").colors
    # Model strings are long and points crowd: each point carries a number, the legend beside the plot its name.
    for number, s in enumerate(points, start=1):
        y = s.accuracy.estimate * 100
        error = [[y - s.accuracy.low * 100], [s.accuracy.high * 100 - y]]
        axes.errorbar([s.mean_total_tokens], [y], yerr=error, fmt="o", capsize=3, alpha=0.8,
                      color=colours[(number - 1) % len(colours)], label=f"{number}. {s.model}")
        axes.annotate(str(number), (s.mean_total_tokens, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if points:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    tokens = [s.mean_total_tokens for s in points if s.mean_total_tokens]
    if tokens and max(tokens) / min(tokens) >= 10:
        axes.set_xscale("log")
    axes.set_xlabel("mean total tokens per task (prompt + completion)")
    axes.set_ylabel("accuracy % (95% Wilson interval)")
    axes.set_ylim(0, 100)
    axes.margins(x=0.2)
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return True

