"""Budgets: max_calls, max_total_tokens and max_seconds limit a strategy run; a request may lower the configured
budget, never raise it."""

from __future__ import annotations

import time

import httpx
import pytest

from ttc_proxy.proxy.config import Budget
from ttc_proxy.proxy.runs.accounting import BudgetScope
from ttc_proxy.strategies.framework import BudgetExceeded
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, sync_client, user

# "What is 6 times 7?" is 5 fake tokens; "The answer is 42." is 4: every n=1 call spends 9 tokens.
TOKENS_PER_CALL = 9


@pytest.fixture(scope="module")
def one_at_a_time(fake_backend: FakeBackend):
    """A backend that takes one call at a time, so a strategy's calls start one after another."""
    with ProxyServer(fake_config(fake_backend, backends=[backend_entry(fake_backend, max_in_flight=1)])) as server:
        yield server


@pytest.fixture(scope="module")
def tight_ceiling(fake_backend: FakeBackend):
    budget = {"max_calls": 2, "max_total_tokens": 10 * TOKENS_PER_CALL, "max_seconds": 0.3}
    with ProxyServer(fake_config(fake_backend, strategies={"budget": budget})) as server:
        yield server


def run(client, model: str = "sc:n=8-fake-model", budget: dict | None = None, **kwargs):
    extra = {"ttc": {"budget": budget}} if budget is not None else {}
    return client.chat.completions.create(model=model, messages=user(), extra_body=extra, **kwargs)


def test_max_calls_limits_the_run(client, fake):
    completion = run(client, budget={"max_calls": 3}, seed=0)
    assert len(fake.chat_requests()) == 3
    assert completion.ttc["backend_calls"] == 3
    assert completion.ttc["details"]["samples"] == 3


def test_max_calls_with_split_requests(client, fake):
    completion = run(client, budget={"max_calls": 1})
    assert [r.body["n"] for r in fake.chat_requests()] == [4]
    assert completion.ttc["details"]["samples"] == 4 and completion.ttc["backend_calls"] == 1


def test_max_total_tokens_limits_the_run(one_at_a_time, fake):
    client = sync_client(one_at_a_time)
    completion = run(client, budget={"max_total_tokens": 2 * TOKENS_PER_CALL + 1}, seed=0)
    # A call starts only if its prompt and max_tokens fit in what is left, its max_tokens cut to fit. Call 1: the
    # prompt estimated at 12 tokens (characters / 4), so max_tokens 19 - 12 = 7; it spends 9. Call 2: the prompt now
    # known (5), max_tokens 10 - 5 = 5; 18 spent. Call 3: 1 token left, less than its prompt: refused.
    assert [r.body["max_tokens"] for r in fake.chat_requests()] == [7, 5]
    assert completion.ttc["backend_calls"] == 2
    assert completion.usage.total_tokens == 2 * TOKENS_PER_CALL
    assert completion.ttc["budget_exhausted"] and completion.choices[0].finish_reason == "length"


def test_calls_side_by_side_stay_within_the_token_budget(client, fake):
    # Four calls get a slot at once. Each reserves its prompt and max_tokens when it starts, so together they
    # cannot end above the budget (checking only what was spent, all four would start and spend 36).
    completion = run(client, budget={"max_total_tokens": 30}, seed=0, max_tokens=4)
    assert completion.usage.total_tokens <= 30
    assert all(r.body["max_tokens"] <= 4 for r in fake.chat_requests())
    assert completion.ttc["budget_exhausted"]


def test_without_a_budget_all_calls_run(one_at_a_time, fake):
    completion = run(sync_client(one_at_a_time), seed=0)
    assert completion.ttc["backend_calls"] == 8 and completion.usage.total_tokens == 8 * TOKENS_PER_CALL


def test_max_seconds_limits_the_run(proxy, client, fake):
    fake.script = lambda body: FakeReply(delay=0.0 if body["seed"] < 2 else 3.0)
    started = time.monotonic()
    completion = run(client, budget={"max_seconds": 0.3}, seed=0)
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 1.0
    assert completion.ttc["details"]["samples"] == 2  # the two fast samples; the slow ones were cut off
    slow = [r for r in fake.chat_requests() if r.body["seed"] >= 2]
    assert slow and all(not r.finished for r in slow)
    deadline = time.monotonic() + 1
    while not all(r.aborted for r in slow):
        assert time.monotonic() < deadline, "the cut-off calls must be aborted at the backend"
        time.sleep(0.005)
    # 4 slots: seeds 2-5 reached the backend; 6 and 7 were queued in the proxy when time ran out (one may slip out
    # as the aborted calls free their slots at the deadline, and is aborted with them: checked above).
    assert sorted(r.body["seed"] for r in slow)[:4] == [2, 3, 4, 5]
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.ttc['trace_id']}").json()
    status = {n["seed"]: n["status"] for n in trace["nodes"][1:]}
    assert [status[seed] for seed in range(6)] == ["ok", "ok", "timeout", "timeout", "timeout", "timeout"]
    # The queued calls never ran: each ended at the deadline, was refused as it got a slot just after it, or was
    # cancelled when a sibling's timeout ended the batch first.
    assert {status[6], status[7]} <= {"timeout", "refused", "cancelled"}


def test_max_seconds_with_nothing_done_is_429(proxy, fake):
    fake.script = lambda body: FakeReply(delay=3.0)
    started = time.monotonic()
    response = chat(proxy, {"model": "sc:n=4-fake-model", "messages": user(),
                            "ttc": {"budget": {"max_seconds": 0.2}}})
    assert time.monotonic() - started < 1.0
    error = assert_openai_error(response, 429, code="budget_exhausted")
    assert "wall-time budget" in error["message"]


def test_request_cannot_raise_the_configured_budget(tight_ceiling, fake):
    client = sync_client(tight_ceiling)
    # (max_tokens 4: a call reserves its max_tokens in the token budget, and the default 512 would not fit.)
    completion = run(client, budget={"max_calls": 100}, seed=0, max_tokens=4)
    assert completion.ttc["backend_calls"] == 2 and len(fake.chat_requests()) == 2
    # The configured ceiling applies with no budget asked for at all.
    assert run(client, seed=0, max_tokens=4).ttc["backend_calls"] == 2


def test_request_cannot_raise_the_configured_time(tight_ceiling, fake):
    fake.script = lambda body: FakeReply(delay=3.0)
    started = time.monotonic()
    response = chat(tight_ceiling, {"model": "sc:n=2-fake-model", "messages": user(), "seed": 0,
                                    "ttc": {"budget": {"max_seconds": 100}}})
    assert time.monotonic() - started < 1.0
    assert_openai_error(response, 429, code="budget_exhausted")


def test_request_may_lower_the_configured_budget(tight_ceiling, fake):
    completion = run(sync_client(tight_ceiling), budget={"max_calls": 1}, seed=0)
    assert completion.ttc["backend_calls"] == 1


@pytest.mark.parametrize("budget", [{"max_calls": 0}, {"max_calls": "many"}, {"max_seconds": -1},
                                    {"max_tokens": 5}])
def test_bad_budget_is_400(proxy, fake, budget):
    response = chat(proxy, {"model": "sc-fake-model", "messages": user(), "ttc": {"budget": budget}})
    assert_openai_error(response, 400, param="ttc.budget")
    assert fake.requests == []


def test_no_call_starts_once_a_call_was_cut_at_the_deadline():
    # The cut runs on the event loop's clock, which may be a little behind time.monotonic: the call that gets the
    # cut call's slot must not start because time.monotonic says a moment is left (it did, under load).
    run = BudgetScope(Budget(max_total_tokens=10_000, max_calls=100, max_seconds=60))
    nested = run.child({"max_seconds": 30})
    nested.check()  # 30 s left on either clock
    nested.expire()  # a call of the nested run was cut at its deadline
    with pytest.raises(BudgetExceeded, match="wall-time budget of 30 s"):
        nested.check()
    assert nested.exhausted and not run.exhausted
    # what the nested run sees of its budget agrees: no time left, and a run nested in it gets none either
    assert nested.view().seconds == 0.0
    assert nested.child(None).view().seconds == 0.0
    run.check()  # the run's own deadline is still ahead: its other calls go on
    assert run.view().seconds > 29
