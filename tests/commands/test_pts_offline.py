"""Offline pivotal-token search (`ttc-proxy pts`): the subdivision, the p(success) cache, the record format, the DPO
export, resuming and the token budget, and the proxy's /tokenize and /detokenize endpoints it reaches the engine by."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ttc_proxy.proxy.config import ProxyConfig
from ttc_proxy.tools import cli
from ttc_proxy.tools.fakebackend import TEMPLATE_ASSISTANT, FakeBackend, FakeReply
from ttc_proxy.tools.pts.records import (
    OutputDir,
    OutputError,
    PivotalTokenRecord,
    RecordError,
    TaskDone,
    dpo_pair,
)
from ttc_proxy.tools.pts.search import (
    Estimate,
    Ids,
    Pivot,
    SuccessCache,
    find_counterpart,
    find_pivots,
    select_answers,
    subdivide,
)

from tests.helpers import ProxyServer, assert_openai_error, backend_entry

RECORD_FIELDS = ["model_id", "query", "pivot_context", "pivot_token", "pivot_token_id", "prob_before", "prob_after",
                 "prob_delta", "is_positive", "task_type", "dataset_id", "dataset_item_id", "timestamp"]


# ---------------------------------------------------------------- the algorithm, on a known p(prefix)


def stepped(base: float, steps: dict[int, float], calls: list[Ids] | None = None) -> Callable[[Ids], Any]:
    """p(prefix) = base + the steps at positions the prefix covers (position i: the prefix includes token i)."""
    async def p(prefix: Ids) -> float:
        if calls is not None:
            calls.append(prefix)
        return base + sum(change for position, change in steps.items() if position < len(prefix))
    return p


ANSWER = tuple(range(100, 108))  # eight token ids


async def test_subdivision_finds_exactly_the_pivots_with_their_probabilities() -> None:
    # Exact binary fractions: p is 0.5, then 0.875 from token 2 on, then 0.25 from token 5 on.
    pivots = await find_pivots(stepped(0.5, {2: 0.375, 5: -0.625}), ANSWER, 0.2)
    assert pivots == [Pivot(ANSWER[:2], ANSWER[2], 0.5, 0.875), Pivot(ANSWER[:5], ANSWER[5], 0.875, 0.25)]
    assert [p.positive for p in pivots] == [True, False] and pivots[1].delta == -0.625


async def test_subdivision_leaves_tile_the_answer_and_stop_at_one_token() -> None:
    p = stepped(0.5, {2: 0.375, 5: -0.625})
    leaves = await subdivide(p, (), ANSWER, 0.2)
    assert leaves == [ANSWER[0:2], ANSWER[2:3], ANSWER[3:4], ANSWER[4:5], ANSWER[5:6], ANSWER[6:8]]
    assert sum(leaves, ()) == ANSWER and all(leaf for leaf in leaves)
    calls: list[Ids] = []
    assert await subdivide(stepped(0.0, {0: 1.0}, calls), (), ANSWER[:1], 0.2) == [ANSWER[:1]]
    assert calls == []  # a one-token segment is a leaf without asking p


async def test_small_changes_and_cancelling_changes_are_not_pivots() -> None:
    assert await find_pivots(stepped(0.5, {3: 0.125, 6: 0.0625}), ANSWER, 0.2) == []  # below the threshold
    # The report's algorithm does not look inside a segment whose changes cancel out.
    assert await find_pivots(stepped(0.5, {2: 0.25, 5: -0.25}), ANSWER, 0.2) == []
    single = await find_pivots(stepped(0.25, {0: 0.5}), (7,), 0.2)
    assert single == [Pivot((), 7, 0.25, 0.75)]
    assert await find_pivots(stepped(0.5, {}), (), 0.2) == []
    with pytest.raises(ValueError):
        await find_pivots(stepped(0.5, {}), ANSWER, 0.0)


async def test_the_cache_estimates_every_prefix_once() -> None:
    asked: list[Ids] = []
    p = stepped(0.5, {2: 0.375, 5: -0.625})

    async def estimator(prefix: Ids) -> Estimate:
        asked.append(prefix)
        return Estimate(round(await p(prefix) * 16), 16)

    cache = SuccessCache(estimator)
    first = await find_pivots(cache.p, ANSWER, 0.2)
    assert len(asked) == len(set(asked)) == cache.estimated == len(cache)
    assert await find_pivots(cache.p, ANSWER, 0.2) == first and len(asked) == cache.estimated  # all cached
    # Concurrent askers of one new prefix share one estimate; a known prefix is never estimated.
    await asyncio.gather(*(cache.p(ANSWER[:7]) for _ in range(5)))
    assert asked.count(ANSWER[:7]) == 1
    cache.know((1, 2, 3), Estimate.known(True))
    assert await cache.p((1, 2, 3)) == 1.0 and (1, 2, 3) not in asked


async def test_a_failed_estimate_is_not_cached() -> None:
    attempts = 0

    async def flaky(prefix: Ids) -> Estimate:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("engine down")
        return Estimate(1, 2)

    cache = SuccessCache(flaky)
    with pytest.raises(RuntimeError):
        await cache.p((1,))
    assert await cache.p((1,)) == 0.5 and attempts == 2


async def test_counterparts_are_measured_alternatives() -> None:
    values = {(): 0.5, (1,): 1.0, (2,): 0.375, (3,): 0.0, (4,): 0.875}

    async def p(prefix: Ids) -> float:
        return values[prefix]

    positive = Pivot((), 1, 0.5, 1.0)
    # 2 lowers p by only 0.125; 3 by 0.5: the rejected token. The pivot itself is skipped.
    assert await find_counterpart(p, positive, [1, 2, 3, 4], 0.2) == (await find_counterpart(p, positive, [3], 0.2))
    found = await find_counterpart(p, positive, [1, 2, 3, 4], 0.2)
    assert found is not None and (found.token_id, found.prob) == (3, 0.0)
    negative = Pivot((), 3, 0.5, 0.0)
    found = await find_counterpart(p, negative, [3, 2, 4, 1], 0.2)
    assert found is not None and (found.token_id, found.prob) == (4, 0.875)  # the first that raises p enough
    assert await find_counterpart(p, negative, [2], 0.2) is None


def test_answers_to_search_alternate_right_and_wrong() -> None:
    replies = [("a", True), ("b", False), ("a", True), ("c", True), (" ", False), ("d", False), ("e", False)]
    assert select_answers(replies, 4) == [("a", True), ("b", False), ("c", True), ("d", False)]
    assert select_answers(replies, 1) == [("a", True)]
    assert select_answers([("x", False), ("y", False)], 3) == [("x", False), ("y", False)]


# ---------------------------------------------------------------- the record format and the DPO export


def a_record(**changes: Any) -> PivotalTokenRecord:
    values: dict[str, Any] = dict(model_id="smollm2", query="What is 6 times 7?", pivot_context="<ctx>",
                                  pivot_token=" 4", pivot_token_id=12, prob_before=0.25, prob_after=0.75,
                                  task_type="math", dataset_id="arith-dev", dataset_item_id="t1",
                                  when="2026-11-30T10:00:00")
    values.update(changes)
    return PivotalTokenRecord.make(**values)


def test_record_has_exactly_codelions_fields_and_round_trips() -> None:
    record = a_record()
    data = json.loads(json.dumps(record.to_dict()))
    assert list(data) == RECORD_FIELDS
    assert data["prob_delta"] == 0.5 and data["is_positive"] is True and data["timestamp"] == "2026-11-30T10:00:00"
    types = {"model_id": str, "query": str, "pivot_context": str, "pivot_token": str, "pivot_token_id": int,
             "prob_before": float, "prob_after": float, "prob_delta": float, "is_positive": bool, "task_type": str,
             "dataset_id": str, "dataset_item_id": str, "timestamp": str}
    assert {k: type(v) for k, v in data.items()} == types
    assert PivotalTokenRecord.from_dict(data) == record
    negative = a_record(prob_before=0.75, prob_after=0.25)
    assert negative.prob_delta == -0.5 and negative.is_positive is False
    assert a_record(prob_before=0.3, prob_after=0.1).prob_delta == -0.2  # no float noise in the delta
    for broken in ({**data, "extra": 1}, {k: v for k, v in data.items() if k != "timestamp"},
                   {**data, "pivot_token_id": "12"}, {**data, "is_positive": 1}, {**data, "pivot_token_id": True},
                   {**data, "prob_after": "0.75"}):
        with pytest.raises(RecordError):
            PivotalTokenRecord.from_dict(broken)


def test_dpo_pairs_put_the_pivot_on_the_side_its_delta_says() -> None:
    positive = dpo_pair(a_record(), " 5", 13, 0.0).to_dict()
    assert list(positive) == ["prompt", "chosen", "rejected", "metadata"]
    assert (positive["prompt"], positive["chosen"], positive["rejected"]) == ("<ctx>", " 4", " 5")
    assert {"original_query", "prob_delta", "task_type"} <= set(positive["metadata"])
    assert positive["metadata"]["original_query"] == "What is 6 times 7?"
    assert (positive["metadata"]["prob_chosen"], positive["metadata"]["prob_rejected"]) == (0.75, 0.0)
    negative = dpo_pair(a_record(prob_before=0.75, prob_after=0.25), " 6", 14, 1.0).to_dict()
    assert (negative["chosen"], negative["rejected"]) == (" 6", " 4")
    assert negative["metadata"]["prob_delta"] == -0.5 and negative["metadata"]["rejected_token_id"] == 12


def test_output_dir_keeps_finished_tasks_only_and_refuses_other_settings(tmp_path: Path) -> None:
    settings = {"model": "m", "tasks_file": "t.jsonl", "rollouts": 4, "threshold": 0.2}
    out = OutputDir(tmp_path)
    out.open(settings)
    out.add_pivot(a_record(dataset_item_id="done-task"))
    out.add_pivot(a_record(dataset_item_id="cut-task"))
    out.add_pair(dpo_pair(a_record(dataset_item_id="cut-task"), " 5", 13, 0.0))
    out.finish(TaskDone("done-task", 0, "searched", 0.5, 4, pivots=1))
    out.close()
    with open(tmp_path / "pivotal_tokens.jsonl", "a") as handle:
        handle.write('{"torn')  # a run killed while writing
    again = OutputDir(tmp_path)
    again.open(settings)
    again.close()
    assert set(again.done) == {"done-task"}
    assert [r["dataset_item_id"] for r in again.pivots()] == ["done-task"]
    assert (tmp_path / "dpo_pairs.jsonl").read_text() == ""
    with pytest.raises(OutputError, match="rollouts"):
        OutputDir(tmp_path).open({**settings, "rollouts": 8})


# ---------------------------------------------------------------- the command, through the proxy, on the fake

QUESTION = "What is 6 times 7? Answer with just the number."
PROMPT = f"<|user|>{QUESTION}\n{TEMPLATE_ASSISTANT}"  # the fake's chat template


def scripted(fake: FakeBackend) -> Callable[[dict[str, Any]], FakeReply]:
    """Replies starting "Surely" go on to 42 (right), "Maybe" to 41 (wrong): p is 0.5 from the question, 1 after
    "Surely", 0 after "Maybe". At the first answer token the engine lists Surely, Maybe, Perhaps. "2 plus 2" is
    always answered 4 (p = 1: out of range)."""
    def script(body: dict[str, Any]) -> FakeReply:
        prompt = body.get("prompt")
        text = fake.vocabulary.decode(prompt) if isinstance(prompt, list) else ""
        if "2 plus 2" in text:
            return FakeReply(texts=["4"])
        answer = text.split(TEMPLATE_ASSISTANT, 1)[-1]
        if body.get("logprobs"):
            return FakeReply(texts=["Surely"], logprobs_fn=lambda c, i, t: [
                ("Surely", -0.5), ("Maybe", -0.9), ("Perhaps", -2.0)])
        if answer.startswith("Surely"):
            return FakeReply(texts=[" 42"])
        if answer.startswith("Maybe"):
            return FakeReply(texts=[" 41"])
        return FakeReply(texts=["Surely 42", "Maybe 41"])
    return script


def task_file(tmp_path: Path, *extra: dict[str, Any]) -> Path:
    path = tmp_path / "tasks.jsonl"
    rows = [{"id": "t-mul", "question": QUESTION, "answer": "42", "check": "number"}, *extra]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EASY = {"id": "t-add", "question": "What is 2 plus 2?", "answer": "4", "check": "number"}


def run_pts(tasks: Path, proxy: ProxyServer, out: Path, *options: str) -> int:
    return cli.main(["pts", str(tasks), "--model", "fake-model", "--proxy", proxy.url, "--out", str(out),
                     "--no-progress", *options])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def completions(fake: FakeBackend) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if r.path.endswith("/completions")]


def test_pts_finds_pivots_and_dpo_pairs_through_the_proxy(proxy: ProxyServer, fake: FakeBackend,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake.reset(scripted(fake))
    out = tmp_path / "out"
    # 8 rollouts: above the fake's 4 slots, so the proxy draws each n=8 as two calls of 4 at once.
    assert run_pts(task_file(tmp_path, EASY), proxy, out, "--rollouts", "8") == 0

    pivots = read_jsonl(out / "pivotal_tokens.jsonl")
    assert [list(r) for r in pivots] == [RECORD_FIELDS, RECORD_FIELDS]
    assert [(r["pivot_token"], r["prob_before"], r["prob_after"], r["prob_delta"], r["is_positive"])
            for r in pivots] == [("Surely", 0.5, 1.0, 0.5, True), ("Maybe", 0.5, 0.0, -0.5, False)]
    for record in pivots:
        PivotalTokenRecord.from_dict(record)
        assert record["pivot_context"] == PROMPT  # the whole text before the token, the rendered chat included
        assert record["query"] == QUESTION and record["model_id"] == "fake-model"
        assert (record["task_type"], record["dataset_id"], record["dataset_item_id"]) == ("math", "tasks", "t-mul")
        assert fake.vocabulary.pieces[record["pivot_token_id"]] == record["pivot_token"]

    pairs = read_jsonl(out / "dpo_pairs.jsonl")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [(PROMPT, "Surely", "Maybe")] * 2
    assert [(p["metadata"]["prob_chosen"], p["metadata"]["prob_rejected"], p["metadata"]["prob_delta"])
            for p in pairs] == [(1.0, 0.0, 0.5), (1.0, 0.0, -0.5)]

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["tasks_done"], summary["tasks_searched"], summary["tasks_skipped"]) == (2, 1, 1)
    assert (summary["pivots"], summary["positive"], summary["negative"], summary["dpo_pairs"]) == (2, 1, 1, 2)
    assert [(t["id"], t["status"], t["p"]) for t in summary["tasks"]] == [("t-mul", "searched", 0.5),
                                                                          ("t-add", "skipped", 1.0)]
    assert summary["stopped"] is None and summary["estimates"] == 4  # t-mul's question, Surely, Maybe; t-add's
    # Every prefix was sampled once, 8 continuations in two engine calls of 4; the whole
    # replies were never sampled (a reply's p is its grade); one top-k call per pivot.
    sampled = [b for b in completions(fake) if not b.get("logprobs")]
    counts = Counter(fake.vocabulary.decode(b["prompt"]) for b in sampled if b["n"] == 4)
    assert counts == {PROMPT: 2, PROMPT + "Surely": 2, PROMPT + "Maybe": 2,
                      "<|user|>What is 2 plus 2?\n" + TEMPLATE_ASSISTANT: 2}
    assert [b["n"] for b in sampled].count(8) == 0  # the engine never sees an n above its slots
    assert all(b["max_tokens"] == 48 for b in sampled if fake.vocabulary.decode(b["prompt"]).endswith(">"))
    assert all(b["max_tokens"] == 47 for b in sampled if not fake.vocabulary.decode(b["prompt"]).endswith(">"))
    top = [b for b in completions(fake) if b.get("logprobs")]
    assert [(b["max_tokens"], b["logprobs"]) for b in top] == [(1, 5), (1, 5)]
    spend = summary["this_run"]["spend"]
    assert spend["calls"] == 4 + 2 and spend["prompt_tokens"] > 0 and spend["completion_tokens"] > 0
    # The fake (like llama-server) counts one choice of n; the re-tokenized continuations count them all: 2 x 8 at
    # the question, 8 after "Surely", 8 after "Maybe", 1 per top-k call, 2 x 4 for "2 plus 2".
    assert spend["completion_tokens"] == 16 + 8 + 8 + 2 + 8
    printed = capsys.readouterr().out
    assert "2 pivotal tokens (+1/-1)" in printed and "written:" in printed


def test_a_rerun_skips_finished_tasks(proxy: ProxyServer, fake: FakeBackend, tmp_path: Path) -> None:
    fake.reset(scripted(fake))
    out = tmp_path / "out"
    tasks = task_file(tmp_path, EASY)
    assert run_pts(tasks, proxy, out, "--rollouts", "4", "--limit", "1") == 0
    first = (out / "pivotal_tokens.jsonl").read_text()
    fake.requests.clear()
    assert run_pts(tasks, proxy, out, "--rollouts", "4", "--limit", "1") == 0
    assert completions(fake) == [] and (out / "pivotal_tokens.jsonl").read_text() == first
    assert run_pts(tasks, proxy, out, "--rollouts", "4") == 0  # the second task is new
    assert {fake.vocabulary.decode(b["prompt"]) for b in completions(fake)} == {
        "<|user|>What is 2 plus 2?\n" + TEMPLATE_ASSISTANT}
    progress = read_jsonl(out / "progress.jsonl")
    assert [r["event"] for r in progress] == ["start", "done", "start", "start", "done"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["tasks_done"], summary["pivots"]) == (2, 2)
    assert run_pts(tasks, proxy, out, "--rollouts", "8") == 2  # another search's directory is refused


def test_the_budget_stops_the_run_and_a_rerun_finishes_it(proxy: ProxyServer, fake: FakeBackend,
                                                           tmp_path: Path) -> None:
    fake.reset(scripted(fake))
    out = tmp_path / "out"
    tasks = task_file(tmp_path, EASY)
    # The question's 4 rollouts cost P prompt + 8 completion tokens, "Surely"'s P + 1 + 4. With one token more as
    # the budget, the top-k call at the pivot still goes, the estimate of "Maybe" after it does not.
    prompt = len(fake.vocabulary.encode(PROMPT))
    budget = (prompt + 8) + (prompt + 1 + 4) + 1
    assert run_pts(tasks, proxy, out, "--rollouts", "4", "--concurrency", "1", "--max-tokens-total",
                   str(budget)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "budget" and summary["this_run"]["stopped"] == "budget"
    assert summary["tasks_done"] == 0 and summary["this_run"]["spend"]["total_tokens"] >= budget
    assert summary["this_run"]["spend"]["calls"] == 3
    assert [r["pivot_token"] for r in read_jsonl(out / "pivotal_tokens.jsonl")] == ["Surely"]  # kept
    assert len(completions(fake)) == 3  # nothing was sent for the second task
    assert run_pts(tasks, proxy, out, "--rollouts", "4") == 0
    assert [r["pivot_token"] for r in read_jsonl(out / "pivotal_tokens.jsonl")] == ["Surely", "Maybe"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] is None and summary["tasks_done"] == 2 and summary["dpo_pairs"] == 2


def test_failed_tasks_are_reported_and_not_marked_done(proxy: ProxyServer, fake: FakeBackend,
                                                       tmp_path: Path) -> None:
    fake.reset(lambda body: FakeReply(status=500))
    out = tmp_path / "out"
    assert run_pts(task_file(tmp_path), proxy, out, "--rollouts", "4") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks_done"] == 0 and "HTTP 500" in summary["tasks_failed"]["t-mul"]
    assert run_pts(task_file(tmp_path), proxy, out, "--rollouts", "4", "--min-p", "0.9", "--max-p", "0.1") == 2


# ---------------------------------------------------------------- POST /tokenize and /detokenize


def post(server: ProxyServer, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url + path, content=body, timeout=30, **kwargs)
    return httpx.post(server.url + path, json=body, timeout=30, **kwargs)


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_detokenize_shapes(proxy: ProxyServer, fake: FakeBackend, prefix: str) -> None:
    text = post(proxy, f"{prefix}/tokenize", {"model": "fake-model", "prompt": "hello big world"})
    assert text.status_code == 200 and set(text.json()) == {"tokens", "count"}
    tokens = text.json()["tokens"]
    assert text.json()["count"] == len(tokens) == 3
    back = post(proxy, f"{prefix}/detokenize", {"model": "fake-model", "tokens": tokens})
    assert back.status_code == 200 and back.json() == {"prompt": "hello big world"}
    chat = post(proxy, f"{prefix}/tokenize", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
    rendered = post(proxy, f"{prefix}/detokenize", {"model": "fake-model", "tokens": chat.json()["tokens"]})
    assert rendered.json()["prompt"] == f"<|user|>hi\n{TEMPLATE_ASSISTANT}"
    open_turn = post(proxy, f"{prefix}/tokenize", {"model": "fake-model", "add_generation_prompt": False,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert post(proxy, f"{prefix}/detokenize", {"model": "fake-model", "tokens": open_turn.json()["tokens"]}
                ).json()["prompt"] == "<|user|>hi\n"
    assert not any(r.path.endswith("/completions") for r in fake.requests)  # no generation


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/tokenize", b"{not json", None),
    ("/v1/tokenize", b"[1]", None),
    ("/v1/tokenize", {"prompt": "x"}, "model"),
    ("/v1/tokenize", {"model": "fake-model"}, None),
    ("/v1/tokenize", {"model": "fake-model", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, None),
    ("/v1/tokenize", {"model": "fake-model", "prompt": 5}, "prompt"),
    ("/v1/tokenize", {"model": "fake-model", "messages": []}, "messages"),
    ("/v1/tokenize", {"model": "sc-fake-model", "prompt": "x"}, "model"),
    ("/v1/detokenize", {"model": "fake-model"}, "tokens"),
    ("/v1/detokenize", {"model": "fake-model", "tokens": ["1"]}, "tokens.0"),
    ("/v1/detokenize", {"model": "fake-model", "tokens": [-1]}, "tokens.0"),
    ("/v1/detokenize", {"model": "fake-model", "tokens": [True]}, "tokens.0"),
])
def test_tokenizer_bad_bodies_are_400(proxy: ProxyServer, fake: FakeBackend, path: str, body: Any,
                                      param: str | None) -> None:
    error = assert_openai_error(post(proxy, path, body), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert not any(r.path in ("/tokenize", "/detokenize") for r in fake.requests)


def test_tokenizer_unknown_model_missing_capability_and_auth(fake_backend: FakeBackend, fake: FakeBackend) -> None:
    other = FakeBackend(model="other-model").start_in_thread()
    try:
        config = ProxyConfig.model_validate({"server": {"api_keys": ["k"]}, "backends": [
            backend_entry(fake_backend, name="a", models=["fake-model"], capabilities={"render": False}),
            backend_entry(other, name="b", models=["other-model"], capabilities={"tokenize": False}),
        ]})
        with ProxyServer(config) as server:
            auth = {"headers": {"authorization": "Bearer k"}}
            assert_openai_error(post(server, "/v1/tokenize", {"model": "fake-model", "prompt": "x"}), 401)
            assert_openai_error(post(server, "/v1/detokenize", {"model": "fake-model", "tokens": [0]}), 401)
            assert_openai_error(post(server, "/v1/tokenize", {"model": "nope", "prompt": "x"}, **auth), 404,
                                param="model", code="model_not_found")
            assert post(server, "/v1/tokenize", {"model": "fake-model", "prompt": "x"}, **auth).status_code == 200
            error = assert_openai_error(post(server, "/v1/tokenize", {
                "model": "fake-model", "messages": [{"role": "user", "content": "x"}]}, **auth), 400,
                param="model", code="backend_capability_missing")
            assert "render" in error["message"]
            for path, body in (("/tokenize", {"model": "other-model", "prompt": "x"}),
                               ("/detokenize", {"model": "other-model", "tokens": [0]})):
                error = assert_openai_error(post(server, path, body, **auth), 400, code="backend_capability_missing")
                assert "tokenize" in error["message"]
            assert not any(r.path in ("/tokenize", "/detokenize") for r in other.requests)
    finally:
        other.stop_thread()


def test_tokenizer_relays_backend_errors(proxy: ProxyServer, fake: FakeBackend) -> None:
    # An id the fake's vocabulary has never seen decodes to nothing; an engine error comes back in OpenAI shape.
    assert post(proxy, "/v1/detokenize", {"model": "fake-model", "tokens": [10 ** 9]}).json() == {"prompt": ""}
    unreachable = ProxyConfig.model_validate({"backends": [
        {"name": "gone", "kind": "llama_cpp", "base_url": "http://127.0.0.1:9/v1"}]})
    with ProxyServer(unreachable) as server:
        assert_openai_error(post(server, "/v1/tokenize", {"model": "m", "prompt": "x"}), 502,
                            code="backend_unreachable")
