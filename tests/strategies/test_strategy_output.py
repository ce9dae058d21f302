"""A strategy's answer, stream and errors are shaped exactly as the OpenAI spec says (plus the `ttc` object)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, chat, sse_payloads, sync_client, user, validate_schema


@pytest.fixture(scope="module")
def keepalive_proxy(fake_backend: FakeBackend):
    with ProxyServer(fake_config(fake_backend, server={"keepalive_seconds": 0.05})) as server:
        yield server


def stream_events(server: ProxyServer, body: dict) -> list[str]:
    """Every SSE event of a streamed request (comments included), in order."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    assert text.endswith("\n\n")
    return [e for e in text.split("\n\n") if e]


def test_sc_response_validates(client, fake):
    completion = client.chat.completions.create(model="sc:n=4-fake-model", messages=user())
    body = completion.model_dump(exclude_unset=True)
    validate_schema(body, "CreateChatCompletionResponse")
    assert completion.object == "chat.completion"
    assert completion.model == "sc:n=4-fake-model"
    assert completion.choices[0].message.content == "The answer is 42."
    assert completion.choices[0].finish_reason == "stop"


def test_sc_raw_response_validates(proxy, fake):
    response = chat(proxy, {"model": "sc:n=3-fake-model", "messages": user()})
    assert response.status_code == 200
    body = response.json()
    validate_schema(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["ttc"]["strategy"] == "sc"
    # The progress lines are also kept as the message's reasoning_content.
    assert "drawing 3 samples" in body["choices"][0]["message"]["reasoning_content"]


def test_sc_stream_order_and_schema(proxy, fake):
    events = stream_events(proxy, {"model": "sc:n=4-fake-model", "messages": user(), "stream": True,
                                   "stream_options": {"include_usage": True}})
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1] if e.startswith("data: ")]
    for chunk in chunks:
        validate_schema(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "sc:n=4-fake-model"
    assert len({c["id"] for c in chunks}) == 1
    kinds = []
    for chunk in chunks:
        if not chunk["choices"]:
            kinds.append("usage")
            continue
        delta = chunk["choices"][0]["delta"]
        if "reasoning_content" in delta:
            kinds.append("reasoning")
        elif delta.get("content"):
            kinds.append("content")
        elif chunk["choices"][0]["finish_reason"]:
            kinds.append("final")
        else:
            kinds.append("role")
    # role, then progress lines, then the answer, then the final chunk with `ttc`, then usage.
    assert kinds[0] == "role"
    n_reasoning = kinds.count("reasoning")
    assert n_reasoning >= 2
    assert kinds[1:] == ["reasoning"] * n_reasoning + ["content", "final", "usage"]
    reasoning = "".join(c["choices"][0]["delta"]["reasoning_content"] for c in chunks if c["choices"]
                        and "reasoning_content" in c["choices"][0]["delta"])
    assert reasoning.startswith("drawing 4 samples")
    assert "winner: 42" in reasoning
    content_chunk = chunks[kinds.index("content")]
    assert content_chunk["choices"][0]["delta"]["content"] == "The answer is 42."
    final = chunks[kinds.index("final")]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["ttc"]["strategy"] == "sc" and final["ttc"]["backend_calls"] == 1
    usage = chunks[-1]["usage"]
    validate_schema(usage, "CompletionUsage")
    assert usage["completion_tokens"] == 16 and usage["prompt_tokens"] == 5


def test_sc_stream_without_include_usage_has_no_usage_chunk(proxy, fake):
    events = stream_events(proxy, {"model": "sc:n=2-fake-model", "messages": user(), "stream": True})
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == "data: [DONE]"
    assert all(c["choices"] for c in chunks)
    assert "ttc" in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_sc_stream_with_sdk(client, fake):
    stream = client.chat.completions.create(model="sc:n=2-fake-model", messages=user(), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "The answer is 42."
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content", "")
                        for c in chunks if c.choices)
    assert "drawing 2 samples" in reasoning
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_keepalive_comments_during_silence(keepalive_proxy, fake):
    fake.script = lambda body: FakeReply(delay=0.4)
    events = stream_events(keepalive_proxy, {"model": "sc:n=2-fake-model", "messages": user(), "stream": True})
    assert events[-1] == "data: [DONE]"
    comments = [i for i, e in enumerate(events) if e.startswith(":")]
    assert len(comments) >= 3  # 0.4 s of silence at a 0.05 s keep-alive interval
    data = [i for i, e in enumerate(events) if e.startswith("data: {")]
    # The comments fall in the silent stretch: after the first progress line, before the samples come back.
    first_progress = next(i for i in data if "drawing 2 samples" in events[i])
    first_sample = next(i for i in data if "sample 1/2" in events[i])
    assert all(first_progress < i < first_sample for i in comments)


def test_sdk_stream_through_keepalives(keepalive_proxy, fake):
    fake.script = lambda body: FakeReply(delay=0.2)
    chunks = list(sync_client(keepalive_proxy).chat.completions.create(
        model="sc:n=2-fake-model", messages=user(), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The answer is 42."


def test_no_keepalive_when_not_silent(proxy, fake):
    events = stream_events(proxy, {"model": "sc:n=2-fake-model", "messages": user(), "stream": True})
    assert not [e for e in events if e.startswith(":")]  # default interval 5 s; the run takes milliseconds


def test_error_after_stream_started(proxy, fake):
    fake.script = lambda body: FakeReply(status=500, error={"error": {"message": "engine on fire",
                                                                        "type": "server_error"}})
    events = stream_events(proxy, {"model": "sc:n=2-fake-model", "messages": user(), "stream": True})
    assert events[-1] == "data: [DONE]"
    error_payload = json.loads(events[-2][6:])
    validate_schema(error_payload, "ErrorResponse")
    assert "engine on fire" in error_payload["error"]["message"]
    # Before the error, the stream had started normally.
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_error_after_stream_started_surfaces_in_sdk(client, fake):
    fake.script = lambda body: FakeReply(status=503, error={"error": {"message": "overloaded engine"}})
    stream = client.chat.completions.create(model="sc:n=2-fake-model", messages=user(), stream=True)
    with pytest.raises(openai.APIError, match="overloaded engine"):
        list(stream)


def test_error_bodies_validate(proxy, fake):
    for body in (b"{not json", json.dumps({"model": "sc-fake-model"}).encode(),
                 json.dumps({"model": "bnn:n=2-fake-model", "messages": user()}).encode()):
        response = chat(proxy, body)
        assert response.status_code == 400
        validate_schema(response.json(), "ErrorResponse")
    response = httpx.get(proxy.url + "/v1/nowhere")
    assert response.status_code == 404
    validate_schema(response.json(), "ErrorResponse")


def test_stream_ttc_object_matches_trace(proxy, fake):
    events = stream_events(proxy, {"model": "sc:n=2-fake-model", "messages": user(), "stream": True})
    payloads = sse_payloads("\n".join(events).split("\n"))
    ttc = payloads[-1]["ttc"]
    trace = httpx.get(proxy.url + f"/v1/traces/{ttc['trace_id']}").json()
    assert trace["id"] == ttc["trace_id"] and trace["nodes"][0]["status"] == "ok"


def test_nested_runs_progress_is_one_line_per_event_not_repeated(client, fake):
    """Issue 17: under bon>cot every cot run said the same sentence; now a sibling's repeat is dropped, each
    line names its run and is one line."""
    fake.script = lambda body: FakeReply(texts=[
        f"<thinking>six sevens\nare {body['seed']}</thinking>\n<reflection>ok</reflection>\n<output>{body['seed']}"
        f"</output>"])
    completion = client.chat.completions.create(model="bon:n=4,select=vote>cot-fake-model", messages=user(), seed=1)
    lines = completion.choices[0].message.model_extra["reasoning_content"].splitlines()
    assert lines[0] == "drawing 4 runs of cot; selecting by vote, ties to weighted"
    said = [line.strip() for line in lines[1:] if line.startswith("  ")]
    assert said[0] == "cot 1: thinking, then reflecting, then answering in one call"
    assert sum("thinking, then reflecting" in line for line in said) == 1
    reasoning = sorted(line for line in said if "six sevens" in line)
    assert len(reasoning) == 4 and all(line.startswith("cot ") and ": six sevens are " in line for line in reasoning)
