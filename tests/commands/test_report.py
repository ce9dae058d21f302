"""`ttc-proxy report` and the eval's pairwise Δ matrix: synthetic results.json files with known numbers give known
differences and intervals, and a report regenerates exactly the tables the eval wrote."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from ttc_proxy.tools import cli
from ttc_proxy.tools.eval.runner import Record
from ttc_proxy.tools.eval.stats import newcombe_paired_interval, pairwise_differences
from ttc_proxy.tools.fakebackend import FakeBackend

from tests.commands.test_eval import TASKS, script, write_tasks
from tests.helpers import ProxyServer

# Cavo et al. (2012), the paired 2x2 example of Fagerland, Lydersen & Laake's chapter 8: 59 right under both,
# 6 under the first only, 16 under the second only, 80 under neither. Their Newcombe square-and-add interval for
# p1 - p2 = -10/161: -0.0621 [-0.1186, -0.0046].
CAVO = [(True, True)] * 59 + [(True, False)] * 6 + [(False, True)] * 16 + [(False, False)] * 80


def test_newcombe_interval_matches_the_published_example() -> None:
    first, second = [a for a, _ in CAVO], [b for _, b in CAVO]
    diff = newcombe_paired_interval(first, second)
    assert diff.estimate == pytest.approx(-10 / 161)
    assert diff.low == pytest.approx(-0.1186, abs=5e-5)
    assert diff.high == pytest.approx(-0.0046, abs=5e-5)
    mirrored = newcombe_paired_interval(second, first)
    assert (mirrored.estimate, mirrored.low, mirrored.high) == pytest.approx((-diff.estimate, -diff.high, -diff.low))


def test_newcombe_interval_edge_cases() -> None:
    same = newcombe_paired_interval([True, False, True, True], [True, False, True, True])
    assert same.estimate == 0.0 and same.low < 0.0 < same.high  # no discordant pair still leaves uncertainty
    all_right = newcombe_paired_interval([True] * 20, [True] * 20)
    assert all_right.estimate == 0.0 and all_right.low == pytest.approx(-0.1611, abs=1e-4)
    assert math.isnan(newcombe_paired_interval([], []).estimate)
    with pytest.raises(ValueError):
        newcombe_paired_interval([True], [True, False])


def record(task: str, model: str, correct: bool, error: str | None = None) -> dict[str, Any]:
    usage = None if error else {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    return {"id": task, "model": model, "correct": correct, "reply": None, "extracted": None, "usage": usage,
            "backend_calls": None if error else 1, "latency_ms": 100.0, "error": error, "seed": None, "ttc": None,
            "ttft_ms": None}


def write_results(folder: Path, outcomes: dict[str, list[bool]], baseline: str | None = None,
                  tasks_file: str = "tasks/synthetic.jsonl") -> Path:
    """A results.json as `ttc-proxy eval` writes it, with no summary (the report must not read one)."""
    folder.mkdir(parents=True, exist_ok=True)
    models = list(outcomes)
    records = [record(f"t{i}", model, correct) for model, column in outcomes.items()
               for i, correct in enumerate(column)]
    meta = {"tasks_file": tasks_file, "tasks": len(next(iter(outcomes.values()))), "models": models,
            "baseline": baseline or models[0], "settings": {"max_tokens": 48, "temperature": 0, "seed": 1,
                                                            "concurrency": 4}}
    (folder / "results.json").write_text(json.dumps({"meta": meta, "summary": [], "records": records}))
    return folder / "results.json"


def pairwise(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as handle:
        return {(row["row"], row["column"]): row for row in csv.DictReader(handle)}


def summary(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["model"]: row for row in csv.DictReader(handle)}


def test_report_regenerates_known_deltas_and_intervals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a, b as in Cavo's table; c right on exactly the first 80 tasks.
    outcomes = {"a": [x for x, _ in CAVO], "b": [y for _, y in CAVO], "c": [i < 80 for i in range(161)]}
    results = write_results(tmp_path / "run", outcomes, baseline="b")
    assert cli.main(["report", str(results.parent)]) == 0
    printed = capsys.readouterr().out

    rows = summary(tmp_path / "run" / "summary.csv")
    assert list(rows) == ["a", "b", "c"]
    assert rows["b"]["diff_vs_baseline"] == ""  # the saved baseline
    assert float(rows["a"]["accuracy"]) == pytest.approx(65 / 161, abs=1e-6)
    # Δ vs baseline: d = +1 on 6 tasks, -1 on 16; mean -10/161, sd with n - 1, ± 1.96·sd/√n.
    mean = -10 / 161
    sd = math.sqrt((6 * (1 - mean) ** 2 + 16 * (-1 - mean) ** 2 + 139 * mean ** 2) / 160)
    assert float(rows["a"]["diff_vs_baseline"]) == pytest.approx(mean, abs=1e-6)
    assert float(rows["a"]["diff_low"]) == pytest.approx(mean - 1.959964 * sd / math.sqrt(161), abs=1e-6)

    cells = pairwise(tmp_path / "run" / "pairwise.csv")
    assert len(cells) == 6  # every ordered pair of three
    a_b = cells[("a", "b")]
    assert (a_b["pairs"], a_b["only_row"], a_b["only_column"]) == ("161", "6", "16")
    assert float(a_b["diff"]) == pytest.approx(-0.062112, abs=1e-6)
    assert float(a_b["diff_low"]) == pytest.approx(-0.1186, abs=5e-5)
    assert float(a_b["diff_high"]) == pytest.approx(-0.0046, abs=5e-5)
    assert float(cells[("b", "a")]["diff_low"]) == pytest.approx(0.0046, abs=5e-5)

    report = (tmp_path / "run" / "report.md").read_text()
    assert report == printed.split("written: ")[0]
    assert "| a | 161 | 40.4 |" in report
    assert "| 1. a |  | -6.2 [-11.9, -0.5] |" in report  # the row of a: the diagonal is empty, then a − b
    assert "Newcombe" in report and "do not edit by hand" in report


def test_report_baseline_option_and_merged_runs_label_the_same_model(tmp_path: Path) -> None:
    write_results(tmp_path / "vllm", {"smollm2": [True, False, False, True], "bon-smollm2": [True, True, False, True]})
    write_results(tmp_path / "llama", {"smollm2": [True, True, True, True]})
    out = tmp_path / "merged"
    assert cli.main(["report", str(tmp_path / "vllm"), str(tmp_path / "llama" / "results.json"), "--out", str(out),
                     "--baseline", "smollm2@llama"]) == 0
    rows = summary(out / "summary.csv")
    assert list(rows) == ["smollm2@vllm", "bon-smollm2", "smollm2@llama"]
    assert {row["baseline"] for row in rows.values()} == {"smollm2@llama"}
    assert float(rows["smollm2@vllm"]["diff_vs_baseline"]) == pytest.approx(-0.5)
    cells = pairwise(out / "pairwise.csv")
    assert float(cells[("smollm2@vllm", "smollm2@llama")]["diff"]) == pytest.approx(-0.5)
    assert float(cells[("bon-smollm2", "smollm2@vllm")]["diff"]) == pytest.approx(0.25)
    assert not (tmp_path / "vllm" / "summary.csv").exists()  # inputs are left as they were


def test_report_pairs_only_the_tasks_both_were_asked(tmp_path: Path) -> None:
    results: dict[str, list[Record]] = {
        "full": [Record(f"t{i}", "full", i % 2 == 0, None, None, None, None, 1.0) for i in range(6)],
        "half": [Record(f"t{i}", "half", True, None, None, None, None, 1.0) for i in range(0, 6, 2)],
    }
    cells = {(d.row, d.column): d for d in pairwise_differences(results)}
    assert cells[("full", "half")].pairs == 3  # t0, t2, t4: all right under both
    assert cells[("full", "half")].difference.estimate == 0.0


@pytest.mark.parametrize(("argv", "message"), [
    (["missing/results.json"], "cannot read"),
    (["NOTJSON"], "cannot read it as JSON"),
    (["NOTEVAL"], "not an eval results.json"),
    (["EMPTY"], "holds no records"),
    (["GOOD", "GOOD2"], "--out is required"),
    (["GOOD", "--baseline", "nope"], "is not among the model strings"),
])
def test_report_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                  message: str) -> None:
    (tmp_path / "notjson.json").write_text("{")
    (tmp_path / "noteval.json").write_text(json.dumps({"meta": {}}))
    (tmp_path / "empty.json").write_text(json.dumps({"meta": {}, "records": []}))
    good = write_results(tmp_path / "good", {"m": [True]})
    good2 = write_results(tmp_path / "good2", {"n": [True]})
    paths = {"NOTJSON": tmp_path / "notjson.json", "NOTEVAL": tmp_path / "noteval.json",
             "EMPTY": tmp_path / "empty.json", "GOOD": good, "GOOD2": good2,
             "missing/results.json": tmp_path / "missing" / "results.json"}
    assert cli.main(["report", *(str(paths.get(a, a)) for a in argv)]) == 2
    assert message in capsys.readouterr().err


def test_report_reproduces_what_the_eval_wrote(proxy: ProxyServer, fake: FakeBackend, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = script
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS)
    out = tmp_path / "out"
    assert cli.main(["eval", str(tasks), "--models", "fake-model", "sc:n=6-fake-model", "--proxy", proxy.url,
                     "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pairwise Δ" in printed and "Newcombe" in printed
    written = {name: (out / name).read_text() for name in ("summary.csv", "pairwise.csv", "report.md")}
    cells = pairwise(out / "pairwise.csv")
    # fake-model is right on t1, t2; sc on t1..t4; both fail t5.
    assert (cells[("sc:n=6-fake-model", "fake-model")]["only_row"],
            cells[("sc:n=6-fake-model", "fake-model")]["only_column"]) == ("2", "0")
    assert float(cells[("sc:n=6-fake-model", "fake-model")]["diff"]) == pytest.approx(0.4)
    for name in written:
        (out / name).unlink()
    assert cli.main(["report", str(out)]) == 0
    assert {name: (out / name).read_text() for name in written} == written
