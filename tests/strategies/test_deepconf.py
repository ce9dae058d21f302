"""DeepConf online: warm-up threshold, traces cancelled mid-stream, confidence-weighted vote of survivors."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import user, wait_until

CONFIDENT = [(None, -0.01), ("x1", -8.0), ("x2", -9.0), ("x3", -10.0), ("x4", -11.0)]
UNSURE = [(None, -1.5), ("x1", -1.6), ("x2", -1.7), ("x3", -1.8), ("x4", -1.9)]
LONG_TAIL = " and so on" * 10


def script_by_seed(unsure_seeds: set[int]) -> Any:
    """Confident seeds answer 7; unsure seeds answer 9 with flat top logprobs, token by token, and after their
    first three tokens (a window) send nothing more until the proxy cancels them: a trace the proxy fails to cancel
    never ends on its own in time, however slow the machine."""

    def script(body: dict[str, Any]) -> FakeReply:
        seed = int(body.get("seed") or 0)
        unsure = seed in unsure_seeds
        pairs = UNSURE if unsure else CONFIDENT

        def logprobs(choice: int, index: int, token: str) -> list[tuple[str, float]]:
            return [(token if t is None else t, lp) for t, lp in pairs]

        return FakeReply(texts=[("It is 9" if unsure else "It is 7") + LONG_TAIL], logprobs_fn=logprobs,
                         chunk_delay=0.02, hold_after_chunks=3 if unsure else None)

    return script


def ask(client: openai.OpenAI, model: str, **kwargs: Any) -> dict[str, Any]:
    return client.chat.completions.create(model=model, messages=user(), seed=100, **kwargs).model_dump()


def test_unsure_traces_are_cancelled_mid_stream_and_do_not_vote(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script_by_seed({105, 106, 107})
    body = ask(client, "deepconf:n=8,warmup=4,window=3-fake-model", max_tokens=64)
    details = body["ttc"]["details"]
    assert details["answer"] == "7" and "It is 7" in body["choices"][0]["message"]["content"]
    assert details["pruned"] == 3 and details["survivors"] == 5
    assert "9" not in details["weights"]
    streamed = [r for r in fake.chat_requests() if r.body.get("stream")]
    assert sorted(r.body["seed"] for r in streamed) == [104, 105, 106, 107]
    # The proxy closed each pruned call; the fake notices on its own thread.
    wait_until(lambda: sum(r.aborted for r in streamed) == 3, timeout=10)
    assert sorted(r.body["seed"] for r in streamed if r.aborted) == [105, 106, 107]
    assert all(r.body["logprobs"] and r.body["top_logprobs"] == 5 for r in streamed)
    # Pruned traces are paid only for what they generated: 3 tokens each, not the whole reply.
    full = len(("It is 7" + LONG_TAIL).split(" "))
    assert body["usage"]["completion_tokens"] < 5 * full + 3 * full
    assert body["usage"]["completion_tokens"] >= 5 * full + 3 * 3


def test_progress_reports_threshold_and_pruning(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script_by_seed({106})
    reasoning = ask(client, "deepconf:n=8,warmup=4,window=3-fake-model")["choices"][0]["message"][
        "reasoning_content"]
    assert "threshold" in reasoning and "stopped after 3 tokens" in reasoning and "winner: 7" in reasoning


def test_traces_cut_off_by_max_tokens_do_not_vote(client: openai.OpenAI, fake: FakeBackend) -> None:
    # Seeds 103..107 are confident but cut off mid-sum; 100..102 finished with 7. Counted, 12 would outweigh 7.
    def script(body: dict[str, Any]) -> FakeReply:
        cut = int(body["seed"]) >= 103
        return FakeReply(texts=["So 12 + 12" if cut else "It is 7"], finish_reason="length" if cut else "stop",
                         logprobs_fn=lambda c, i, t: [(t if a is None else a, lp) for a, lp in CONFIDENT])

    fake.script = script
    details = ask(client, "deepconf:n=8,warmup=4,window=3-fake-model")["ttc"]["details"]
    assert details["answer"] == "7" and details["survivors"] == 3 and details["pruned"] == 0
    assert ask(client, "deepconf:n=8,warmup=4,window=3,count_truncated=true-fake-model")["ttc"]["details"][
        "answer"] == "12"


def test_warmup_must_leave_room_for_online_traces(client: openai.OpenAI, fake: FakeBackend) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "deepconf:n=4,warmup=4-fake-model")
    assert "warmup" in str(caught.value)


def test_deepconf_needs_logprobs(fake: FakeBackend) -> None:
    from tests.helpers import fake_config
    from tests.helpers import ProxyServer, sync_client

    config = fake_config(fake)
    config.backends[0].capabilities.logprobs = False
    with ProxyServer(config) as server, sync_client(server) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="deepconf-fake-model", messages=user())
    assert "logprobs" in str(caught.value)
    assert not fake.chat_requests()
