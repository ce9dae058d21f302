"""Pooled evaluation: strategies scored on one pool of samples per task behave as they do live."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ttc_proxy.tools import cli
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer

TASKS = [
    {"id": f"t{i}", "question": f"What is {i} plus {i}? Answer with just the number.", "answer": str(2 * i),
     "check": "number"}
    for i in range(1, 7)
]


def seeded_script(body: dict[str, Any]) -> FakeReply:
    """Sample with seed s answers right when s % 3 != 0 for even tasks, only when s % 3 == 0 for odd ones."""
    question = body["messages"][-1]["content"]
    task = next(t for t in TASKS if t["question"] == question)
    i = int(task["id"][1:])
    seed = int(body.get("seed") or 0)
    right = (seed % 3 != 0) if i % 2 == 0 else (seed % 3 == 0)
    return FakeReply(texts=[f"The answer is {2 * i if right else 2 * i + 1}."], token_logprob=-0.05 if right else -0.9)


def run(tasks: Path, out: Path, proxy: ProxyServer, *extra: str, status: int = 0) -> dict[str, Any]:
    assert cli.main(["eval", str(tasks), "--proxy", proxy.url, "--out", str(out), "--seed", "10",
                     "--no-progress", *extra]) == status
    return json.loads((out / "results.json").read_text())


def correct_by_task(document: dict[str, Any], model: str) -> dict[str, bool]:
    return {r["id"]: r["correct"] for r in document["records"] if r["model"] == model}


def test_pooled_scores_match_live_runs_with_the_same_seeds(proxy: ProxyServer, fake: FakeBackend,
                                                            tmp_path: Path) -> None:
    fake.script = seeded_script
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    models = ["sc:n=4-fake-model", "sc:n=8,adaptive=true-fake-model"]
    live = run(tasks, tmp_path / "live", proxy, "--models", *models)
    fake.reset(seeded_script)
    pooled = run(tasks, tmp_path / "pooled", proxy, "--models", *models, "--pool", "8")
    for model in models:
        assert correct_by_task(pooled, model) == correct_by_task(live, model)
    for model in models:
        live_usage = [r["usage"] for r in live["records"] if r["model"] == model]
        pooled_usage = [r["usage"] for r in pooled["records"] if r["model"] == model]
        assert [u["completion_tokens"] for u in pooled_usage] == [u["completion_tokens"] for u in live_usage]
        assert [u["prompt_tokens"] for u in pooled_usage] == [u["prompt_tokens"] for u in live_usage]
    # One pool of 8 per task: every sample call is seeded, nothing else was drawn.
    assert len(fake.chat_requests()) == 8 * len(TASKS)
    summary = {row["model"]: row for row in pooled["summary"]}
    assert "oracle@8 (some sample of 8 right)" in summary
    assert summary["oracle@8 (some sample of 8 right)"]["correct"] == len(TASKS)


def test_pool_too_small_for_a_strategy_is_that_tasks_error(proxy: ProxyServer, fake: FakeBackend,
                                                           tmp_path: Path) -> None:
    fake.script = seeded_script
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(TASKS[0]) + "\n")
    document = run(tasks, tmp_path / "out", proxy, "--models", "sc:n=8-fake-model", "--pool", "4",
                   status=1)  # every request failed
    (record,) = [r for r in document["records"] if r["model"] == "sc:n=8-fake-model"]
    assert record["error"] and "pool holds 4 samples" in record["error"]


def test_a_failed_pool_draw_is_every_model_strings_error_on_that_task(proxy: ProxyServer, fake: FakeBackend,
                                                                     tmp_path: Path) -> None:
    fake.script = lambda body: FakeReply(status=503, error="engine overloaded")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(TASKS[0]) + "\n")
    models = ["sc:n=4-fake-model", "bon:n=4,select=vote-fake-model"]
    document = run(tasks, tmp_path / "out", proxy, "--models", *models, "--pool", "4", status=1)
    records = {r["model"]: r for r in document["records"]}
    assert all(records[m]["error"] and not records[m]["correct"] for m in models)
    assert records[models[0]]["error"] == records[models[1]]["error"]
    # Drawn once, not again for the second model string (the first failure may cancel the draw's other calls).
    assert 1 <= len(fake.chat_requests()) <= 4


def test_a_budget_per_model_string_binds_live_and_pooled_runs_alike(proxy: ProxyServer, fake: FakeBackend,
                                                                    tmp_path: Path) -> None:
    fake.script = seeded_script
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS[:3]))
    budget = ["--budget", 'sc:n=8-fake-model={"max_calls": 3}']
    live = run(tasks, tmp_path / "live", proxy, "--models", "sc:n=8-fake-model", "sc:n=4-fake-model", *budget)
    pooled = run(tasks, tmp_path / "pooled", proxy, "--models", "sc:n=8-fake-model", "sc:n=4-fake-model",
                 "--pool", "8", *budget)
    for document in (live, pooled):
        records = [r for r in document["records"] if r["model"] == "sc:n=8-fake-model"]
        assert all(r["backend_calls"] == 3 and r["ttc"]["budget_exhausted"] for r in records)
        others = [r for r in document["records"] if r["model"] == "sc:n=4-fake-model"]
        assert all(r["backend_calls"] == 4 for r in others)
    assert cli.main(["eval", str(tasks), "--proxy", proxy.url, "--models", "sc-fake-model", "--budget",
                     'bon-fake-model={"max_calls": 1}', "--no-progress"]) == 2


def test_composed_samples_come_from_a_pool_of_the_inner_strategys_prompt(proxy: ProxyServer, fake: FakeBackend,
                                                                         tmp_path: Path) -> None:
    from ttc_proxy.strategies.cot import INSTRUCTIONS

    def script(body: dict[str, Any]) -> FakeReply:
        system = [m["content"] for m in body["messages"] if m["role"] == "system"]
        return FakeReply(texts=["<output>4</output>" if system else "It is 5."])

    fake.script = script
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(TASKS[1]) + "\n")
    document = run(tasks, tmp_path / "out", proxy, "--models", "bon:n=4,select=vote>cot-fake-model",
                   "sc:n=4>cot-fake-model", "bon:n=4,select=vote-fake-model", "--pool", "4", "--temperature", "0")
    records = {r["model"]: r for r in document["records"]}
    assert records["bon:n=4,select=vote>cot-fake-model"]["correct"] and records["sc:n=4>cot-fake-model"]["correct"]
    assert not records["bon:n=4,select=vote-fake-model"]["correct"]
    calls = fake.chat_requests()
    cot = [c for c in calls if any(INSTRUCTIONS in str(m["content"]) for m in c.body["messages"])]
    assert len(cot) == 4 and len(calls) == 8  # one pool per prompt, shared by both compositions
    assert all(c.body["temperature"] == 0.8 for c in calls)
