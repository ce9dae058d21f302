"""Usage accounting, the `ttc` object, traces, and strategies going on when some candidates fail."""

from __future__ import annotations

import re

import httpx
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, sync_client, user

# Fake tokens are whitespace pieces: 3, 4, 1 and 3 tokens; answers 5, 5, 5, 6.
CHOICES = ["x = 5", "so it is 5", "5", "maybe 6 then"]
PROMPT = user("what is 2+3")  # 3 prompt tokens per backend request


@pytest.fixture(scope="module")
def no_logprobs_proxy(fake_backend: FakeBackend):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities={"logprobs": False})])
    with ProxyServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def vllm_like():
    backend = FakeBackend(slots=64, owned_by="vllm", usage_counts_one_choice=False).start_in_thread()
    config = fake_config(backend, backends=[{"name": "v", "kind": "generic", "base_url": backend.base_url}])
    with ProxyServer(config) as server:
        yield backend, server
    backend.stop_thread()


def test_usage_counts_every_sample(client, fake):
    fake.script = lambda body: FakeReply(texts=CHOICES)
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=PROMPT)
    requests = fake.chat_requests()
    assert [r.body["n"] for r in requests] == [4, 4]
    # The fake, like llama-server, reports only the first choice's 3 tokens per request; all 8 samples count.
    usage = completion.usage
    assert usage.completion_tokens == 22
    assert usage.prompt_tokens == 6  # one prompt per request, not per sample
    assert usage.total_tokens == 28
    assert completion.choices[0].message.content == "x = 5"
    assert usage.completion_tokens_details.reasoning_tokens == 22 - 3
    assert completion.ttc["usage_estimated"] is False


def test_usage_with_seeds(client, fake):
    fake.script = lambda body: FakeReply(texts=[CHOICES[(body["seed"] - 10) % 4]])
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=PROMPT, seed=10)
    assert len(fake.chat_requests()) == 8
    assert completion.usage.prompt_tokens == 24
    assert completion.usage.completion_tokens == 22
    assert completion.usage.completion_tokens_details.reasoning_tokens == 19


def test_usage_counted_with_tokenize_when_no_logprobs(no_logprobs_proxy, fake):
    fake.script = lambda body: FakeReply(texts=CHOICES)
    completion = sync_client(no_logprobs_proxy).chat.completions.create(model="sc:n=8-fake-model", messages=PROMPT)
    assert all("logprobs" not in r.body for r in fake.chat_requests())
    assert completion.usage.completion_tokens == 22
    assert completion.usage.completion_tokens_details.reasoning_tokens == 19
    assert completion.ttc["usage_estimated"] is True


def test_usage_when_backend_counts_all_choices(vllm_like):
    backend, server = vllm_like
    backend.reset(lambda body: FakeReply(texts=CHOICES))
    completion = sync_client(server).chat.completions.create(model="sc:n=8-fake-model", messages=PROMPT)
    (request,) = backend.chat_requests()  # a vLLM-like backend takes n=8 in one request
    assert request.body["n"] == 8 and "logprobs" not in request.body
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == 22


def test_ttc_object(client, fake):
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user())
    ttc = completion.ttc
    assert ttc["strategy"] == "sc"
    assert {k: ttc["params"][k] for k in ("n", "temperature", "min_success")} == \
        {"n": 8, "temperature": None, "min_success": 1}  # every param, defaults included, is reported
    assert ttc["backend_calls"] == 2
    assert isinstance(ttc["wall_time_ms"], (int, float)) and ttc["wall_time_ms"] > 0
    assert ttc["trace_id"].startswith("trace-")
    assert ttc["backend"] == "fake" and ttc["backend_model"] == "fake-model"


def test_trace_records_the_calls(proxy, client, fake):
    fake.script = lambda body: FakeReply(texts=[f"The answer is {body['seed'] % 2}"])
    completion = client.chat.completions.create(model="sc:n=4-fake-model", messages=PROMPT, seed=20)
    response = httpx.get(f"{proxy.url}/v1/traces/{completion.ttc['trace_id']}")
    assert response.status_code == 200
    trace = response.json()
    assert trace["id"] == completion.ttc["trace_id"] and trace["object"] == "ttc.trace"
    root, *calls = trace["nodes"]
    assert root["kind"] == "run" and root["label"] == "sc" and root["status"] == "ok"
    assert root["params"]["n"] == 4
    assert len(calls) == completion.ttc["backend_calls"] == 4
    assert sorted(c["seed"] for c in calls) == [20, 21, 22, 23]
    for call in calls:
        assert call["kind"] == "call" and call["parent"] == 0 and call["status"] == "ok"
        assert call["temperature"] == 0.8
        assert call["outputs"] == [f"The answer is {call['seed'] % 2}"]
    assert sum(c["prompt_tokens"] for c in calls) == completion.usage.prompt_tokens
    assert sum(c["completion_tokens"] for c in calls) == completion.usage.completion_tokens


def test_unknown_trace_is_404(proxy):
    error = assert_openai_error(httpx.get(f"{proxy.url}/v1/traces/trace-doesnotexist"), 404, param="trace_id")
    assert "trace-doesnotexist" in error["message"]


def test_trace_store_is_bounded(fake_backend, fake):
    with ProxyServer(fake_config(fake_backend, server={"trace_store_size": 2})) as server:
        client = sync_client(server)
        ids = [client.chat.completions.create(model="sc:n=1-fake-model", messages=user()).ttc["trace_id"]
               for _ in range(3)]
        assert httpx.get(f"{server.url}/v1/traces/{ids[0]}").status_code == 404
        assert httpx.get(f"{server.url}/v1/traces/{ids[2]}").status_code == 200


# ---- partial failure ----

def failing_seeds(seeds: set[int], status: int = 500):
    def script(body):
        if body.get("seed") in seeds:
            return FakeReply(status=status, error={"error": {"message": f"seed {body['seed']} crashed"}})
        return FakeReply(texts=[f"The answer is {body['seed'] % 3}"])
    return script


def test_strategy_goes_on_with_survivors(proxy, client, fake):
    fake.script = failing_seeds({101, 103, 105})
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user(), seed=100)
    assert len(fake.chat_requests()) == 8
    details = completion.ttc["details"]
    assert details["samples"] == 5
    assert sum(details["votes"].values()) == 5
    # Survivors: seeds 100, 102, 104, 106, 107 -> answers 1, 0, 2, 1, 2; 1 comes first among the tied.
    assert details["votes"] == {"1": 2, "2": 2, "0": 1}
    assert completion.choices[0].message.content == "The answer is 1"
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.ttc['trace_id']}").json()
    assert len(trace["nodes"][0]["notes"]["sample_failures"]) == 3
    assert [n["status"] for n in trace["nodes"][1:]].count("error") == 3


def test_split_request_failure_drops_its_samples(client, fake):
    calls = []

    def script(body):
        calls.append(body)
        if len(calls) == 1:
            return FakeReply(status=500)
        return FakeReply(texts=["The answer is 3"])

    fake.script = script
    completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user())
    assert completion.ttc["details"]["samples"] == 4
    assert completion.ttc["backend_calls"] == 2


def test_min_success_above_survivors_fails(proxy, fake):
    fake.script = failing_seeds({101, 103, 105})
    response = chat(proxy, {"model": "sc:n=8,min_success=6-fake-model", "messages": user(), "seed": 100})
    error = assert_openai_error(response, 502, code="strategy_failed")
    # the run stops once 6 cannot be reached: the samples that had succeeded by then (at most 5) are counted
    succeeded = re.search(r"only (\d) of 8 samples succeeded", error["message"])
    assert succeeded is not None and int(succeeded.group(1)) <= 5
    assert "at least 6 needed" in error["message"]
    assert "crashed" in error["message"]  # the first backend error is named


def test_min_success_met_exactly(client, fake):
    fake.script = failing_seeds({101, 103, 105})
    completion = client.chat.completions.create(model="sc:n=8,min_success=5-fake-model", messages=user(), seed=100)
    assert completion.ttc["details"]["samples"] == 5


def test_all_failing_reports_backend_error(proxy, fake):
    fake.script = failing_seeds(set(range(100, 108)), status=503)
    response = chat(proxy, {"model": "sc:n=8-fake-model", "messages": user(), "seed": 100})
    error = assert_openai_error(response, 503)
    assert "crashed" in error["message"]
