"""FairScheduler: a bound on calls in flight, round-robin between owners, a bounded queue, clean cancellation;
and, end to end, 429 when the queue is full and no starvation of a pass-through behind a strategy."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ttc_proxy.proxy.errors import Overloaded
from ttc_proxy.tools.fakebackend import FakeReply
from ttc_proxy.proxy.backends.scheduler import FairScheduler

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, user, wait_until


async def settle() -> None:
    """Let every ready task run up to its next real wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def holder(scheduler: FairScheduler, owner: str, release: asyncio.Event, cost: int = 1,
                 log: list[str] | None = None, name: str = "") -> None:
    async with scheduler.slot(owner, cost):
        if log is not None:
            log.append(name)
        await release.wait()


async def test_bound_on_in_flight():
    scheduler = FairScheduler(capacity=2, max_queue=100)
    running = 0
    peak = 0

    async def work(i: int) -> None:
        nonlocal running, peak
        async with scheduler.slot(f"owner{i % 3}"):
            running += 1
            peak = max(peak, running)
            assert scheduler.in_use <= 2
            await asyncio.sleep(0.005)
            running -= 1

    await asyncio.gather(*(work(i) for i in range(12)))
    assert peak == 2
    assert scheduler.in_use == 0 and scheduler.queued == 0


async def test_cost_counts_against_capacity():
    scheduler = FairScheduler(capacity=4, max_queue=10)
    release = asyncio.Event()
    big = asyncio.create_task(holder(scheduler, "a", release, cost=3))
    await settle()
    assert scheduler.in_use == 3
    second = asyncio.create_task(holder(scheduler, "b", release, cost=2))
    await settle()
    assert scheduler.queued == 1 and not second.done() and scheduler.in_use == 3
    release.set()
    await asyncio.gather(big, second)
    assert scheduler.in_use == 0 and scheduler.queued == 0


async def test_cost_above_capacity_is_clamped():
    scheduler = FairScheduler(capacity=2, max_queue=10)
    async with scheduler.slot("a", cost=16):
        assert scheduler.in_use == 2
    assert scheduler.in_use == 0


async def test_round_robin_between_owners():
    scheduler = FairScheduler(capacity=1, max_queue=100)
    gate = asyncio.Event()
    order: list[str] = []
    first = asyncio.create_task(holder(scheduler, "gate", gate))
    await settle()

    async def one(owner: str, name: str) -> None:
        async with scheduler.slot(owner):
            order.append(name)

    tasks = []
    for owner, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        tasks.append(asyncio.create_task(one(owner, name)))
        await settle()
    assert scheduler.queued == 6
    gate.set()
    await asyncio.gather(first, *tasks)
    # One turn per owner in arrival order of owners, not all of a's calls first.
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


async def test_new_arrival_does_not_jump_the_queue():
    scheduler = FairScheduler(capacity=2, max_queue=100)
    release = asyncio.Event()
    order: list[str] = []
    hold = asyncio.create_task(holder(scheduler, "h", release, cost=2))
    await settle()
    waiting = asyncio.create_task(holder(scheduler, "w", asyncio.Event(), cost=2, log=order, name="w"))
    await settle()
    # Capacity frees up only through dispatch; a late small caller waits behind the queued one.
    late = asyncio.create_task(holder(scheduler, "l", release, cost=1, log=order, name="l"))
    await settle()
    assert order == [] and scheduler.queued == 2
    release.set()
    await hold
    await settle()
    assert order == ["w"]
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    await late
    assert order == ["w", "l"] and scheduler.in_use == 0


async def test_queue_full_is_overloaded_with_retry_after():
    scheduler = FairScheduler(capacity=1, max_queue=2, retry_after_seconds=3)
    release = asyncio.Event()
    tasks = [asyncio.create_task(holder(scheduler, f"o{i}", release)) for i in range(3)]
    await settle()
    assert scheduler.in_use == 1 and scheduler.queued == 2
    with pytest.raises(Overloaded) as info:
        async with scheduler.slot("late"):
            pass
    assert info.value.status_code == 429
    assert info.value.headers == {"Retry-After": "3"}
    assert info.value.to_body()["error"]["type"] == "rate_limit_error"
    assert scheduler.queued == 2 and scheduler.in_use == 1
    release.set()
    await asyncio.gather(*tasks)
    assert scheduler.in_use == 0 and scheduler.queued == 0


async def test_no_queue_at_all():
    scheduler = FairScheduler(capacity=1, max_queue=0)
    async with scheduler.slot("a"):
        with pytest.raises(Overloaded):
            async with scheduler.slot("b"):
                pass
    async with scheduler.slot("b"):
        assert scheduler.in_use == 1


async def test_cancelled_waiter_leaves_the_queue():
    scheduler = FairScheduler(capacity=1, max_queue=10)
    release = asyncio.Event()
    order: list[str] = []
    hold = asyncio.create_task(holder(scheduler, "h", release))
    await settle()
    w1 = asyncio.create_task(holder(scheduler, "a", release, log=order, name="a"))
    w2 = asyncio.create_task(holder(scheduler, "b", release, log=order, name="b"))
    await settle()
    assert scheduler.queued == 2
    w1.cancel()
    await asyncio.gather(w1, return_exceptions=True)
    assert scheduler.queued == 1 and scheduler.in_use == 1
    release.set()
    await asyncio.gather(hold, w2)
    assert order == ["b"]
    assert scheduler.in_use == 0 and scheduler.queued == 0


async def test_cancelling_a_blocked_head_lets_the_rest_through():
    scheduler = FairScheduler(capacity=4, max_queue=10)
    release = asyncio.Event()
    order: list[str] = []
    hold = asyncio.create_task(holder(scheduler, "h", release, cost=2))
    await settle()
    big = asyncio.create_task(holder(scheduler, "a", release, cost=4, log=order, name="big"))
    await settle()
    small = asyncio.create_task(holder(scheduler, "b", release, cost=1, log=order, name="small"))
    await settle()
    assert order == [] and scheduler.queued == 2  # small waits behind big, which does not fit yet
    big.cancel()
    await asyncio.gather(big, return_exceptions=True)
    await settle()
    # With big gone, small fits in the 2 free units at once: it must not wait for the holder to finish.
    assert order == ["small"] and scheduler.in_use == 3
    release.set()
    await asyncio.gather(hold, small)
    assert scheduler.in_use == 0 and scheduler.queued == 0


async def test_granted_then_cancelled_in_the_same_tick_gives_capacity_back():
    scheduler = FairScheduler(capacity=1, max_queue=10)
    entered: list[str] = []

    async def waiter() -> None:
        async with scheduler.slot("w"):
            entered.append("w")

    async with scheduler.slot("h"):
        w = asyncio.create_task(waiter())
        await settle()
        assert scheduler.queued == 1
    # Leaving the block granted the slot to w, which has not run yet; cancel it now.
    assert scheduler.in_use == 1 and scheduler.queued == 0
    w.cancel()
    await asyncio.gather(w, return_exceptions=True)
    assert entered == []
    assert scheduler.in_use == 0
    async with scheduler.slot("next"):
        assert scheduler.in_use == 1
    assert scheduler.in_use == 0


async def test_cancelled_holder_releases():
    scheduler = FairScheduler(capacity=1, max_queue=10)
    hold = asyncio.create_task(holder(scheduler, "h", asyncio.Event()))
    await settle()
    assert scheduler.in_use == 1
    hold.cancel()
    await asyncio.gather(hold, return_exceptions=True)
    assert scheduler.in_use == 0


async def test_overloaded_waiter_does_not_disturb_others():
    scheduler = FairScheduler(capacity=1, max_queue=1)
    release = asyncio.Event()
    order: list[str] = []
    hold = asyncio.create_task(holder(scheduler, "h", release))
    await settle()
    queued = asyncio.create_task(holder(scheduler, "q", release, log=order, name="q"))
    await settle()
    rejected = asyncio.create_task(holder(scheduler, "r", release, log=order, name="r"))
    await settle()
    assert rejected.done() and isinstance(rejected.exception(), Overloaded)
    release.set()
    await asyncio.gather(hold, queued)
    assert order == ["q"] and scheduler.in_use == 0 and scheduler.queued == 0


# ---- end to end ----

def run_in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_queue_full_end_to_end_is_429(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, max_in_flight=2, max_queue=0)])
    fake.script = lambda body: FakeReply(delay=0.4)
    with ProxyServer(config) as server:
        body = {"model": "fake-model", "messages": user()}
        slow = [run_in_thread(lambda: chat(server, body)) for _ in range(2)]
        wait_until(lambda: fake.in_flight == 2)
        response = chat(server, body)
        assert_openai_error(response, 429, code="proxy_queue_full")
        assert response.headers["retry-after"] == "1"
        assert response.headers["x-request-id"]
        for thread, out in slow:
            thread.join(5)
            assert out[0].status_code == 200
        assert len(fake.chat_requests()) == 2  # the surplus request never reached the backend
        fake.script = lambda body: FakeReply()
        assert chat(server, body).status_code == 200


def test_queue_full_during_streaming_pass_through(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, max_in_flight=1, max_queue=0)])
    fake.script = lambda body: FakeReply(texts=["a b c"], chunk_delay=0.15)
    with ProxyServer(config) as server:
        stream_body = {"model": "fake-model", "messages": user(), "stream": True}
        thread, out = run_in_thread(lambda: chat(server, stream_body))
        wait_until(lambda: fake.in_flight == 1)
        assert_openai_error(chat(server, {"model": "fake-model", "messages": user()}), 429)
        thread.join(5)
        assert "[DONE]" in out[0].text  # the stream held its slot until it ended, then let it go
        fake.script = lambda body: FakeReply()
        assert chat(server, {"model": "fake-model", "messages": user()}).status_code == 200


def test_pass_through_not_starved_behind_strategy(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, max_in_flight=1)])
    # Strategy calls carry a seed; they are answered only once the pass-through waits in the queue behind them,
    # however long its request takes to get there.
    release = threading.Event()
    fake.script = lambda body: FakeReply(release=release if "seed" in body else None)
    with ProxyServer(config) as server:
        scheduler = server.server.config.app.state.proxy.backends["fake"].scheduler
        strategy = {"model": "sc:n=8-fake-model", "messages": user(), "seed": 1}
        thread, out = run_in_thread(lambda: chat(server, strategy))
        try:
            wait_until(lambda: fake.in_flight == 1 and scheduler.queued == 7, timeout=10)  # one in flight, 7 queued
            quick, answer = run_in_thread(lambda: chat(server, {"model": "fake-model",
                                                                "messages": user("quick one")}))
            wait_until(lambda: scheduler.queued == 8, timeout=10)
        finally:
            release.set()  # a failed wait must not leave the held calls waiting out their hold
        quick.join(10)
        thread.join(10)
        assert answer[0].status_code == 200
        assert out[0].status_code == 200 and out[0].json()["ttc"]["backend_calls"] == 8
    order = [("pass" if "seed" not in r.body else "sc") for r in fake.chat_requests()]
    # The strategy's 8 calls queue under one owner, which was first in line: it gets one more turn, then the
    # pass-through its turn, not the end of the strategy's queue.
    assert order.index("pass") == 2, order


async def test_a_slot_freed_in_the_tick_a_waiter_is_cancelled_is_not_lost():
    # A client disconnect cancels a strategy's held call and its queued call together; if the held call gives
    # its slot back before the queued call's task has run its cancellation, the slot must not go to it.
    scheduler = FairScheduler(capacity=1, max_queue=10)
    entered = asyncio.Event()

    async def held() -> None:
        async with scheduler.slot("a"):
            entered.set()
            await asyncio.sleep(10)

    first = asyncio.create_task(held())
    await entered.wait()
    queued = asyncio.create_task(holder(scheduler, "a", asyncio.Event()))
    await settle()
    assert scheduler.queued == 1
    first.cancel()  # the held call runs first and gives its slot back ...
    queued.cancel()  # ... while the queued call's wait is already cancelled but its task has not run yet
    await asyncio.gather(first, queued, return_exceptions=True)
    assert scheduler.in_use == 0 and scheduler.queued == 0
    async with scheduler.slot("b"):
        assert scheduler.in_use == 1
