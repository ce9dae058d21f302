"""`ttc-proxy tune` end to end on the scripted backend: candidates and chains measured on shared pools, the policy
fitted and written, and `auto` running the written policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ttc_proxy.strategies.policy import CascadePolicy
from ttc_proxy.tools import cli
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer

TASKS = [
    {"id": f"t{i}", "question": f"What is {i} plus {i}? Answer with just the number.", "answer": str(2 * i),
     "check": "number"}
    for i in range(1, 11)
]


@pytest.fixture
def tasks(tmp_path: Path) -> Path:
    """TASKS as a task file."""
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    return path


def script(body: dict[str, Any]) -> FakeReply:
    """A cot call (system prompt present) at temperature 0 is right and sure on even tasks, wrong and unsure on odd
    ones; a sampled cot call is always right but unsure; a plain sample is wrong."""
    messages = body["messages"]
    question = messages[-1]["content"]
    i = next(int(t["id"][1:]) for t in TASKS if t["question"] == question)
    cot = any(m["role"] == "system" for m in messages)
    if not cot:
        return FakeReply(texts=[f"{2 * i + 1}"], token_logprob=-0.5)
    if body.get("temperature") == 0:
        right = i % 2 == 0
        return FakeReply(texts=[f"<output>{2 * i if right else 2 * i + 1}</output>"],
                         token_logprob=-0.01 if right else -2.0)
    return FakeReply(texts=[f"<output>{2 * i}</output>"], token_logprob=-0.7)


def test_tune_fits_a_cascade_that_escalates_only_the_unsure_tasks(proxy: ProxyServer, fake: FakeBackend,
                                                                  tmp_path: Path, tasks: Path) -> None:
    fake.script = script
    policy_path, results = tmp_path / "policy.json", tmp_path / "results"
    assert cli.main(["tune", str(tasks), "--model", "fake-model", "--proxy", proxy.url, "--out", str(policy_path),
                     "--results", str(results), "--pool", "4", "--folds", "2", "--no-progress", "--default-budget", "250",
                     "--candidates", "cot", "bon:n=4,select=confidence,confidence=logprob>cot",
                     "--chains", "cot|bon:n=4,select=confidence,confidence=logprob>cot"]) == 0
    policy = CascadePolicy.model_validate_json(policy_path.read_text())
    default = policy.points[policy.default]
    assert [s.name for s in default.stages] == ["cot", "bon:n=4,select=confidence,confidence=logprob>cot"]
    assert default.stages[0].stop is not None and default.stages[0].stop.signal == "logprob"
    assert 0.14 < default.stages[0].stop.threshold <= 0.991  # between the unsure (e^-2) and sure (e^-0.01) answers
    for name in ("frontier.csv", "fixed.csv", "per_task.csv", "tune.json"):
        assert (results / name).exists()


def test_max_tokens_total_stops_cleanly_and_fits_on_the_tasks_done(proxy: ProxyServer, fake: FakeBackend,
                                                                   tmp_path: Path, tasks: Path) -> None:
    fake.script = script
    results = tmp_path / "results"
    # Each task accounts 97 (cot) + 388 (bon:n=4>cot) + 388 (the chain) tokens: 2,000 are spent within 3 tasks.
    assert cli.main(["tune", str(tasks), "--model", "fake-model", "--proxy", proxy.url, "--out",
                     str(tmp_path / "p.json"), "--results", str(results), "--pool", "4", "--folds", "2",
                     "--no-progress", "--concurrency", "1", "--max-tokens-total", "2000",
                     "--candidates", "cot", "bon:n=4,select=confidence,confidence=logprob>cot",
                     "--chains", "cot|bon:n=4,select=confidence,confidence=logprob>cot"]) == 0
    meta = json.loads((results / "tune.json").read_text())["meta"]
    assert meta["stopped_early"] is True and meta["tasks_used"] == 3


def test_a_candidate_that_is_not_a_strategy_is_refused(proxy: ProxyServer, tmp_path: Path, capsys: Any) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(TASKS[0]) + "\n")
    assert cli.main(["tune", str(tasks), "--model", "fake-model", "--proxy", proxy.url, "--candidates",
                     "nope:n=2", "--chains"]) == 2
    assert "'nope:n=2'" in capsys.readouterr().err


def test_an_engine_without_logprobs_gets_no_logprob_rules(proxy: ProxyServer, fake: FakeBackend,
                                                          tmp_path: Path, tasks: Path) -> None:
    def without_logprobs(body: dict[str, Any]) -> FakeReply:
        reply = script(body)
        reply.logprobs = False
        return reply

    fake.script = without_logprobs
    policy_path, results = tmp_path / "policy.json", tmp_path / "results"
    assert cli.main(["tune", str(tasks), "--model", "fake-model", "--proxy", proxy.url, "--out", str(policy_path),
                     "--results", str(results), "--pool", "4", "--folds", "2", "--no-progress",
                     "--candidates", "cot", "--chains", "cot|bon:n=2,select=vote>cot|bon:n=4,select=vote>cot"]) == 0
    per_task = json.loads((results / "tune.json").read_text())["per_task"]
    chain = per_task["cot | bon:n=2,select=vote>cot | bon:n=4,select=vote>cot"]
    assert all("logprob" not in stage["signals"] for row in chain for stage in row)
    assert all("agreement" in row[1]["signals"] for row in chain)  # the sampling stages still expose agreement
    policy = CascadePolicy.model_validate_json(policy_path.read_text())
    rules = [s.stop for p in policy.points for s in p.stages if s.stop is not None]
    assert all(rule.signal == "agreement" for rule in rules)


def test_refit_fits_again_on_an_earlier_runs_tables_without_an_engine(proxy: ProxyServer, fake: FakeBackend,
                                                                       tmp_path: Path, tasks: Path) -> None:
    fake.script = script
    first, again = tmp_path / "first", tmp_path / "again"
    common = ["--model", "fake-model", "--folds", "2", "--no-progress", "--default-budget", "250"]
    assert cli.main(["tune", str(tasks), "--proxy", proxy.url, "--out", str(first / "p.json"), "--results",
                     str(first), "--pool", "4", "--candidates", "cot",
                     "bon:n=4,select=confidence,confidence=logprob>cot",
                     "--chains", "cot|bon:n=4,select=confidence,confidence=logprob>cot", *common]) == 0
    calls = len(fake.requests)
    assert cli.main(["tune", "--refit", str(first / "tune.json"), "--out", str(again / "p.json"), "--results",
                     str(again), *common]) == 0
    assert len(fake.requests) == calls  # nothing measured
    before, after = (json.loads((d / "tune.json").read_text()) for d in (first, again))
    assert after["frontier"] == before["frontier"] and after["per_task"] == before["per_task"]
    assert after["meta"]["refit_of"] == str(first / "tune.json")
    assert after["meta"]["seconds"] == before["meta"]["seconds"]  # the measuring run's time, kept


def test_refit_of_a_file_that_is_not_a_tune_json_is_refused(tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "tune.json"
    bad.write_text('{"meta": {}}')
    assert cli.main(["tune", "--refit", str(bad), "--model", "fake-model"]) == 2
    assert "not a tune.json" in capsys.readouterr().err
