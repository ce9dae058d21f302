"""`ttc-proxy eval`: answer checks, statistics, and whole runs against the scripted fake and the real engine."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from ttc_proxy.strategies.answers import boxed_content
from ttc_proxy.tools import cli
from ttc_proxy.tools.eval.checks import check_boxed, check_exact, check_number, check_regex
from ttc_proxy.tools.eval.runner import Progress, Record
from ttc_proxy.tools.eval.stats import paired_difference, percentile, summarise, wilson_interval
from ttc_proxy.tools.eval.tasks import EvalError, load_tasks
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer, closed_port

ARITH_TASKS = Path(__file__).resolve().parents[2] / "tasks" / "arith-dev.jsonl"

# ---- checks ----


@pytest.mark.parametrize(("reply", "answer", "correct", "extracted"), [
    ("The answer is 42.", "42", True, "42"),
    ("56.0", "56", True, "56.0"),
    ("It is 56", "56.0", True, "56"),
    ("That makes 1,000 apples", "1000", True, "1,000"),
    ("1000", "1,000", True, "1000"),
    ("First 3, then 4", "3", False, "4"),  # the last number counts
    ("1,2,3", "3", True, "3"),  # a list, not a thousands separator
    ("8-3=5", "5", True, "5"),
    ("It is -7.", "-7", True, "-7"),
    ("The result: −7", "-7", True, "−7"),  # a Unicode minus
    ("2.50 dollars", "2.5", True, "2.50"),
    ("no digits here", "5", False, None),
    ("", "0", False, None),
])
def test_check_number(reply: str, answer: str, correct: bool, extracted: str | None) -> None:
    verdict = check_number(reply, answer)
    assert verdict.correct is correct
    assert verdict.extracted == extracted


@pytest.mark.parametrize(("reply", "answer", "correct"), [
    ("  Paris. ", "paris", True),
    ("PARIS!", "Paris", True),
    ("New  York\n", "new york", True),
    ("Paris?!", "Paris", True),
    ("Paris is the answer", "paris", False),
    ("", "", True),
    ("Pari", "Paris", False),
])
def test_check_exact(reply: str, answer: str, correct: bool) -> None:
    assert check_exact(reply, answer).correct is correct


@pytest.mark.parametrize(("reply", "pattern", "correct", "extracted"), [
    ("The capital is Paris.", r"\bParis\b", True, "Paris"),
    ("the capital is paris", r"(?i)PARIS", True, "paris"),
    ("Parisian food", r"\bParis\b", False, None),
    ("x = 12 or 13", r"1[23]", True, "12"),
])
def test_check_regex(reply: str, pattern: str, correct: bool, extracted: str | None) -> None:
    verdict = check_regex(reply, pattern)
    assert verdict.correct is correct
    assert verdict.extracted == extracted


@pytest.mark.parametrize(("reply", "answer", "correct", "extracted"), [
    (r"so the answer is \boxed{42}.", "42", True, "42"),
    (r"\boxed{42.0}", "42", True, "42.0"),
    (r"\boxed {1,000}", "1000", True, "1,000"),
    (r"first \boxed{3}, finally \boxed{7}", "7", True, "7"),
    (r"first \boxed{3}, finally \boxed{7}", "3", False, "7"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", True, r"\frac{1}{2}"),  # nested braces, not numeric: exact
    (r"\boxed{ Paris. }", "paris", True, " Paris. "),
    (r"\boxed{3} and then \boxed{4", "3", True, "3"),  # a truncated last box is skipped
    ("42 without a box", "42", False, None),
    (r"\boxed{x}", "42", False, "x"),
])
def test_check_boxed(reply: str, answer: str, correct: bool, extracted: str | None) -> None:
    verdict = check_boxed(reply, answer)
    assert verdict.correct is correct
    assert verdict.extracted == extracted


def test_boxed_content_balances_braces() -> None:
    assert boxed_content(r"\boxed{a{b{c}}d} tail") == "a{b{c}}d"
    assert boxed_content(r"\boxed{never closed") is None


# ---- task files ----


def write_tasks(path: Path, tasks: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(t) for t in tasks) + "\n")
    return path


def test_load_tasks_question_messages_and_limit(tmp_path: Path) -> None:
    path = write_tasks(tmp_path / "t.jsonl", [
        {"id": "a", "question": "What is 1+1?", "answer": 2, "check": "number"},
        {"id": 7, "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
         "answer": "hello", "check": "exact"},
        {"id": "c", "question": "x", "answer": "y", "check": "regex"},
    ])
    tasks = load_tasks(path)
    assert [t.id for t in tasks] == ["a", "7", "c"]
    assert tasks[0].messages == [{"role": "user", "content": "What is 1+1?"}]
    assert tasks[0].answer == "2"
    assert tasks[1].messages[0]["role"] == "system"
    assert len(load_tasks(path, limit=2)) == 2
    # A fixed subset keeps each task's file position: seeds follow it, so the subset draws the whole file's samples.
    half = load_tasks(path, every=2)
    assert [(t.id, t.index) for t in half] == [("a", 0), ("c", 2)]
    other = load_tasks(path, every=2, start=1)  # the other half
    assert [(t.id, t.index) for t in other] == [("7", 1)]
    from ttc_proxy.tools.eval.runner import RunSettings, request_kwargs

    assert request_kwargs("m", half[1], RunSettings(seed=10))["seed"] == 12


@pytest.mark.parametrize("bad", [
    {"id": "a", "question": "q", "answer": "1", "check": "fuzzy"},
    {"id": "a", "question": "q", "answer": "one", "check": "number"},
    {"id": "a", "question": "q", "answer": "(unclosed", "check": "regex"},
    {"id": "a", "answer": "1", "check": "number"},
    {"question": "q", "answer": "1", "check": "number"},
])
def test_load_tasks_rejects_bad_tasks(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(EvalError, match="t.jsonl:1"):
        load_tasks(write_tasks(tmp_path / "t.jsonl", [bad]))


def test_load_tasks_rejects_duplicate_ids(tmp_path: Path) -> None:
    task = {"id": "a", "question": "q", "answer": "1", "check": "number"}
    with pytest.raises(EvalError, match="duplicate"):
        load_tasks(write_tasks(tmp_path / "t.jsonl", [task, task]))


# ---- statistics ----


def test_wilson_interval_known_values() -> None:
    interval = wilson_interval(8, 10)
    assert interval.estimate == 0.8
    assert interval.low == pytest.approx(0.4902, abs=1e-4)
    assert interval.high == pytest.approx(0.9433, abs=1e-4)
    zero = wilson_interval(0, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.2775, abs=1e-4)
    full = wilson_interval(20, 20)
    assert full.high == 1.0 and full.low == pytest.approx(0.8389, abs=1e-4)
    assert math.isnan(wilson_interval(0, 0).estimate)


def test_paired_difference_known_values() -> None:
    model = [True, True, False, True, True]
    baseline = [False, True, True, False, True]  # d = 1, 0, -1, 1, 0: mean 0.2, sd sqrt(0.7)
    diff = paired_difference(model, baseline)
    half = 1.959964 * math.sqrt(0.7) / math.sqrt(5)
    assert diff.estimate == pytest.approx(0.2)
    assert diff.low == pytest.approx(0.2 - half, abs=1e-5)
    assert diff.high == pytest.approx(0.2 + half, abs=1e-5)
    same = paired_difference([True, False, True], [True, False, True])
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    assert math.isnan(paired_difference([True], [False]).low)


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def test_summary_counts_errors_as_wrong_and_pairs_by_task() -> None:
    def rec(task: str, correct: bool, error: str | None = None, tokens: int = 10, calls: int = 1) -> Record:
        usage = None if error else {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens}
        return Record(task, "m", correct, None, None, usage, None if error else calls, 100.0, error=error)

    base = [rec("a", True), rec("b", False), rec("c", False), rec("d", True)]
    model = [rec("a", True, tokens=30, calls=3), rec("b", True, tokens=50, calls=5), rec("c", False, error="HTTP 500"),
             rec("d", True, tokens=10, calls=1)]
    summary = summarise("m", model, base)
    assert (summary.tasks, summary.answered, summary.errors, summary.correct) == (4, 3, 1, 3)
    assert summary.accuracy.estimate == 0.75
    assert summary.diff_vs_baseline is not None and summary.diff_vs_baseline.estimate == 0.25
    assert summary.mean_completion_tokens == 30.0  # per answered task
    assert summary.mean_backend_calls == 3.0
    assert summary.latency_p50_ms == 100.0


def test_progress_redraws_one_line() -> None:
    stream = io.StringIO()
    progress = Progress(3, stream=stream, min_interval=0.0)
    progress.start("m")
    for error in (None, "HTTP 500", None):
        progress.advance(error is None)
    progress.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.startswith("\r")
    assert "3/3  errors 1" in text.split("\r")[-1]


# ---- whole runs against the scripted fake ----

TASKS = [
    {"id": "t1", "question": "What is 2 plus 3?", "answer": "5", "check": "number"},
    {"id": "t2", "question": "What is 4 plus 4?", "answer": "8", "check": "number"},
    {"id": "t3", "question": "What is 6 plus 1?", "answer": "7", "check": "number"},
    {"id": "t4", "question": "What is 9 plus 9?", "answer": "18", "check": "number"},
    {"id": "t5", "question": "Please fail this one.", "answer": "1", "check": "number"},
]
# What a single (pass-through) request answers; self-consistency's multi-sample requests always get it right.
SINGLE = {"t1": "The answer is 5.", "t2": "8", "t3": "6", "t4": "I think 17"}
RIGHT = {"t1": "5", "t2": "It is 8.", "t3": "7", "t4": "18"}


def task_of(body: dict[str, Any]) -> str:
    question = body["messages"][-1]["content"]
    return next(t["id"] for t in TASKS if t["question"] == question)


def script(body: dict[str, Any]) -> FakeReply:
    task = task_of(body)
    if task == "t5":
        return FakeReply(status=500)
    if int(body.get("n") or 1) > 1:
        return FakeReply(texts=[RIGHT[task]])
    return FakeReply(texts=[SINGLE[task]])


def run_eval(*argv: str) -> int:
    return cli.main(["eval", *argv, "--no-progress"])


def test_eval_against_the_fake(proxy: ProxyServer, fake: FakeBackend, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = script
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS)
    out = tmp_path / "out"
    status = run_eval(str(tasks), "--models", "fake-model", "sc:n=6-fake-model", "--proxy", proxy.url,
                      "--out", str(out), "--max-tokens", "20", "--concurrency", "3")
    assert status == 0
    printed = capsys.readouterr().out
    assert "Wilson" in printed and "1.96·sd/√n" in printed
    assert "fake-model" in printed and "sc:n=6-fake-model" in printed

    document = json.loads((out / "results.json").read_text())
    summary = {row["model"]: row for row in document["summary"]}
    single, sc = summary["fake-model"], summary["sc:n=6-fake-model"]
    assert (single["correct"], single["errors"], single["tasks"]) == (2, 1, 5)
    assert (sc["correct"], sc["errors"], sc["tasks"]) == (4, 1, 5)
    assert single["accuracy"] == pytest.approx(0.4) and sc["accuracy"] == pytest.approx(0.8)
    assert single["accuracy_low"] < 0.4 < single["accuracy_high"]
    assert single["diff_vs_baseline"] is None and single["baseline"] == "fake-model"
    assert sc["diff_vs_baseline"] == pytest.approx(0.4)  # d = 0, 0, 1, 1, 0
    assert sc["diff_low"] < 0.4 < sc["diff_high"]
    assert single["mean_backend_calls"] == 1.0
    assert sc["mean_backend_calls"] == 2.0  # 6 samples, at most 4 per call
    assert single["mean_prompt_tokens"] == 5.0  # "What is 2 plus 3?": five words for the fake
    assert 0 < single["mean_completion_tokens"] < sc["mean_completion_tokens"]
    assert single["latency_p50_ms"] > 0

    records = document["records"]
    assert len(records) == 10
    by_key = {(r["model"], r["id"]): r for r in records}
    assert by_key[("fake-model", "t4")]["reply"] == "I think 17"
    assert by_key[("fake-model", "t4")]["extracted"] == "17" and not by_key[("fake-model", "t4")]["correct"]
    assert by_key[("sc:n=6-fake-model", "t4")]["correct"]
    assert by_key[("sc:n=6-fake-model", "t4")]["ttc"]["strategy"] == "sc"
    assert by_key[("fake-model", "t1")]["usage"]["prompt_tokens"] == 5
    failed = [r for r in records if r["error"]]
    assert {(r["model"], r["id"]) for r in failed} == {("fake-model", "t5"), ("sc:n=6-fake-model", "t5")}
    assert by_key[("fake-model", "t5")]["error"].startswith("HTTP 500")
    assert all(r["correct"] is False and r["usage"] is None for r in failed)
    # Every pass-through request asked for the --max-tokens.
    assert {r.body.get("max_tokens") for r in fake.chat_requests() if "n" not in r.body} == {20}

    with (out / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == ["fake-model", "sc:n=6-fake-model"]
    assert float(rows[1]["accuracy"]) == pytest.approx(0.8) and rows[0]["errors"] == "1"

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped" in printed
    else:
        assert (out / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_stream_times_the_first_content_token_and_grades_the_streamed_reply(
        proxy: ProxyServer, fake: FakeBackend, tmp_path: Path) -> None:
    fake.script = script
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS)
    out = tmp_path / "out"
    assert run_eval(str(tasks), "--models", "fake-model", "sc:n=6-fake-model", "--proxy", proxy.url, "--stream",
                    "--out", str(out)) == 0
    document = json.loads((out / "results.json").read_text())
    summary = {row["model"]: row for row in document["summary"]}
    assert summary["fake-model"]["correct"] == 2 and summary["sc:n=6-fake-model"]["correct"] == 4  # as unstreamed
    for row in summary.values():
        assert 0 < row["ttft_p50_ms"] <= row["latency_p50_ms"]
    by_key = {(r["model"], r["id"]): r for r in document["records"]}
    assert by_key[("fake-model", "t4")]["reply"] == "I think 17"
    assert by_key[("sc:n=6-fake-model", "t4")]["ttc"]["strategy"] == "sc"  # from the last chunk
    assert by_key[("sc:n=6-fake-model", "t4")]["usage"]["prompt_tokens"] > 0  # from the usage chunk
    assert all(r.body.get("stream") for r in fake.chat_requests() if "n" not in r.body)


def test_eval_sends_seed_per_task_extra_body_and_temperature(proxy: ProxyServer, fake: FakeBackend,
                                                             tmp_path: Path) -> None:
    fake.script = script
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:4])
    status = run_eval(str(tasks), "--models", "fake-model", "--proxy", proxy.url + "/v1", "--out",
                      str(tmp_path / "out"), "--seed", "100", "--temperature", "0.5",
                      "--extra-body", '{"top_k": 7, "cache_prompt": false}')
    assert status == 0
    bodies = {task_of(r.body): r.body for r in fake.chat_requests()}
    assert {task: body["seed"] for task, body in bodies.items()} == {"t1": 100, "t2": 101, "t3": 102, "t4": 103}
    assert all(b["top_k"] == 7 and b["cache_prompt"] is False and b["temperature"] == 0.5 for b in bodies.values())
    assert all(b["max_tokens"] == 48 for b in bodies.values())  # the default


def test_eval_baseline_option_and_limit(proxy: ProxyServer, fake: FakeBackend, tmp_path: Path) -> None:
    fake.script = script
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS)
    out = tmp_path / "out"
    status = run_eval(str(tasks), "--models", "fake-model", "sc:n=4-fake-model", "--baseline", "sc:n=4-fake-model",
                      "--limit", "4", "--proxy", proxy.url, "--out", str(out))
    assert status == 0
    summary = {row["model"]: row for row in json.loads((out / "results.json").read_text())["summary"]}
    assert summary["fake-model"]["tasks"] == 4 and summary["fake-model"]["errors"] == 0
    assert summary["fake-model"]["diff_vs_baseline"] == pytest.approx(-0.5)
    assert summary["sc:n=4-fake-model"]["diff_vs_baseline"] is None


def test_eval_starts_its_own_proxy_from_a_config(fake: FakeBackend, tmp_path: Path) -> None:
    fake.script = script
    config = tmp_path / "config.yaml"
    config.write_text(f"backends:\n  - name: fake\n    kind: llama_cpp\n    base_url: {fake.base_url}\n")
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:4])
    out = tmp_path / "out"
    assert run_eval(str(tasks), "--models", "fake-model", "--config", str(config), "--out", str(out)) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary[0]["correct"] == 2 and summary[0]["errors"] == 0


def test_eval_counts_timeouts_and_unreachable_proxies_as_errors(proxy: ProxyServer, fake: FakeBackend,
                                                                tmp_path: Path) -> None:
    fake.script = lambda body: FakeReply(texts=["5"], delay=2.0 if task_of(body) == "t2" else 0.0)
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:2])
    out = tmp_path / "out"
    assert run_eval(str(tasks), "--models", "fake-model", "--proxy", proxy.url, "--timeout", "0.5",
                    "--out", str(out)) == 0
    records = {r["id"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert records["t1"]["error"] is None and records["t1"]["correct"]
    assert records["t2"]["error"] == "timeout after 0.5 s"

    # Nothing listens: every request fails, the run still completes and says so with status 1.
    assert run_eval(str(tasks), "--models", "fake-model", "--proxy", f"http://127.0.0.1:{closed_port()}",
                    "--out", str(out)) == 1
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary[0]["errors"] == 2 and summary[0]["accuracy"] == 0.0


def test_eval_without_matplotlib_says_the_plot_was_skipped(proxy: ProxyServer, fake: FakeBackend, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = script
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:1])
    out = tmp_path / "out"
    assert run_eval(str(tasks), "--models", "fake-model", "--proxy", proxy.url, "--out", str(out)) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plot skipped")]
    assert len(skipped) == 1 and "ttc-proxy[plot]" in skipped[0]
    assert not (out / "accuracy_vs_tokens.png").exists()
    assert (out / "summary.csv").exists()


def test_eval_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:1])
    assert run_eval(str(tasks), "--models", "a", "--baseline", "b", "--proxy", "http://127.0.0.1:1") == 2
    assert "--baseline" in capsys.readouterr().err
    assert run_eval(str(tmp_path / "missing.jsonl"), "--models", "a", "--proxy", "http://127.0.0.1:1") == 2
    with pytest.raises(SystemExit):
        run_eval(str(tasks), "--models", "a", "--extra-body", "[1]")


# ---- end to end against the real engine ----


@pytest.mark.engine
def test_eval_against_the_embedded_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default in-process proxy (no ./config.yaml in the working directory: the embedded engine)."""
    monkeypatch.chdir(tmp_path)
    max_tokens = 12
    status = run_eval(str(ARITH_TASKS), "--models", "smollm2", "sc:n=4-smollm2", "--limit", "4",
                      "--max-tokens", str(max_tokens), "--out", "out")
    assert status == 0
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(document["records"]) == 8
    assert [r["error"] for r in document["records"]] == [None] * 8
    summary = {row["model"]: row for row in document["summary"]}
    single, sc = summary["smollm2"], summary["sc:n=4-smollm2"]
    for row in (single, sc):
        assert row["tasks"] == 4 and row["errors"] == 0
        assert 5 <= row["mean_prompt_tokens"] <= 200  # a one-line question in the chat template
        assert 0.0 <= row["accuracy"] <= 1.0
    assert 1 <= single["mean_completion_tokens"] <= max_tokens
    assert single["mean_backend_calls"] == 1.0
    assert single["mean_completion_tokens"] < sc["mean_completion_tokens"] <= 4 * max_tokens  # every sample counted
    assert sc["mean_backend_calls"] >= 1.0
    assert all(r["ttc"]["details"]["samples"] == 4 for r in document["records"] if r["model"] == "sc:n=4-smollm2")
    assert (tmp_path / "out" / "summary.csv").exists()


def test_eval_prints_the_most_frequent_errors_with_counts(proxy: ProxyServer, fake: FakeBackend, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 17: the cause was only in results.json; the output says what failed, how often, for which models."""
    fake.script = lambda body: FakeReply(status=503, error={"error": {"message": "backend local is down",
                                                                      "type": "x"}})
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:3])
    capsys.readouterr()
    assert run_eval(str(tasks), "--models", "fake-model", "sc:n=2-fake-model", "--proxy", proxy.url,
                    "--out", str(tmp_path / "out")) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    at = lines.index("errors: 6 of 6 requests failed; the most frequent:")
    assert lines[at + 1] == "      6 x  HTTP 503: backend local is down  (fake-model, sc:n=2-fake-model)"
    assert "every request failed; the most frequent error: 6 x  HTTP 503: backend local is down" in captured.err


def test_eval_lists_no_errors_when_none_failed(proxy: ProxyServer, fake: FakeBackend, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    fake.script = lambda body: FakeReply(texts=["5"])
    tasks = write_tasks(tmp_path / "tasks.jsonl", TASKS[:2])
    capsys.readouterr()
    assert run_eval(str(tasks), "--models", "fake-model", "--proxy", proxy.url, "--out", str(tmp_path / "out")) == 0
    assert "errors:" not in capsys.readouterr().out
