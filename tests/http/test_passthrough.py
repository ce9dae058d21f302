"""Pass-through is invisible: the backend sees the client's body (model aside) and the client sees the backend's."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, async_client, chat, sync_client, user

IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}},
    ]},
    {"role": "assistant", "content": "A single pixel."},
    {"role": "user", "content": "And what colour is it?"},
]


@pytest.fixture(scope="module")
def aliased(fake_backend: FakeBackend):
    config = fake_config(fake_backend, aliases={"house-model": {"model": "fake-model"}})
    with ProxyServer(config) as server:
        yield server


def test_every_field_reaches_backend_unchanged(client, fake):
    extra = {"top_k": 40, "min_p": 0.05, "cache_prompt": True,
             "chat_template_kwargs": {"enable_thinking": False}, "ttc": {}}
    client.chat.completions.create(
        model="fake-model",
        messages=CONVERSATION,
        n=2,
        logprobs=True,
        top_logprobs=2,
        tools=TOOLS,
        tool_choice="auto",
        response_format={"type": "json_object"},
        temperature=0.7,
        max_tokens=20,
        seed=3,
        extra_body=extra,
    )
    (request,) = fake.chat_requests()
    expected = {
        "model": "fake-model", "messages": CONVERSATION, "n": 2, "logprobs": True, "top_logprobs": 2,
        "tools": TOOLS, "tool_choice": "auto", "response_format": {"type": "json_object"}, "temperature": 0.7,
        "max_tokens": 20, "seed": 3, "top_k": 40, "min_p": 0.05, "cache_prompt": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    # Exactly the client's body: nothing added, nothing dropped, roles and multi-part content kept; `ttc` removed.
    assert request.body == expected
    assert "ttc" not in request.body


def test_stream_options_and_stream_flag_reach_backend(client, fake):
    stream = client.chat.completions.create(model="fake-model", messages=user(), stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    (request,) = fake.chat_requests()
    assert request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_turns_are_never_flattened(client, fake):
    turns = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy"},
        {"role": "user", "content": "So?"},
    ]
    client.chat.completions.create(model="fake-model", messages=turns, tools=TOOLS)
    assert fake.chat_requests()[0].body["messages"] == turns


def test_response_body_comes_back_byte_for_byte(proxy, fake):
    raw = (b'{"id":"cmpl-odd","object":"chat.completion","created":1,"model":"backend-internal-name",'
           b'"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
           b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2},'
           b'"timings":{"predicted_ms":1.5},"vendor":{"nested":[1,2,3]}}')
    fake.script = lambda body: FakeReply(raw_body=raw)
    response = chat(proxy, {"model": "fake-model", "messages": user()})
    assert response.status_code == 200
    assert response.content == raw  # not re-serialised, and the model is not rewritten for a plain name


def test_sdk_sees_backend_fields(client, fake):
    fake.script = lambda body: FakeReply(texts=["one", "two"])
    completion = client.chat.completions.create(model="fake-model", messages=user(), n=2, logprobs=True)
    assert completion.id == "chatcmpl-fake"  # the backend's own id
    assert completion.model == "fake-model"
    assert [c.message.content for c in completion.choices] == ["one", "two"]
    assert completion.choices[0].logprobs.content[0].token == "one"
    assert "ttc" not in (completion.model_extra or {})  # a pass-through answer carries no strategy report


def test_alias_rewrites_model_only(aliased, fake):
    raw = {"id": "c1", "object": "chat.completion", "created": 7, "model": "fake-model", "system_fingerprint": "fp",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, "timings": {"x": 1}}
    fake.script = lambda body: FakeReply(raw_body=json.dumps(raw).encode())
    response = chat(aliased, {"model": "house-model", "messages": user(), "top_k": 3})
    assert response.status_code == 200
    assert fake.chat_requests()[0].body == {"model": "fake-model", "messages": user(), "top_k": 3}
    assert response.json() == {**raw, "model": "house-model"}


def test_alias_rewrites_model_in_stream(aliased, fake):
    client = sync_client(aliased)
    chunks = list(client.chat.completions.create(model="house-model", messages=user(), stream=True))
    assert fake.chat_requests()[0].body["model"] == "fake-model"
    assert chunks and all(c.model == "house-model" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The answer is 42."


def test_stream_is_relayed_chunk_by_chunk(client, fake):
    fake.script = lambda body: FakeReply(texts=["one two three four"], chunk_delay=0.3)
    started = time.monotonic()
    first_content_at = None
    pieces = []
    for chunk in client.chat.completions.create(model="fake-model", messages=user(), stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            if first_content_at is None:
                first_content_at = time.monotonic() - started
            pieces.append(chunk.choices[0].delta.content)
    total = time.monotonic() - started
    assert "".join(pieces) == "one two three four"
    assert len(pieces) == 4  # each backend chunk arrives as its own chunk
    assert total >= 1.1  # the backend took 4 x 0.3 s
    assert first_content_at is not None and first_content_at < 0.5  # not buffered until the backend finished
    assert fake.chat_requests()[0].finished


def test_stream_raw_bytes_are_backend_events(proxy, fake):
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", timeout=10,
                      json={"model": "fake-model", "messages": user(), "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["id"] == "chatcmpl-fake" and first["model"] == "fake-model"


async def test_async_sdk_pass_through(proxy, fake):
    fake.script = lambda body: FakeReply(texts=[f"echo {body['messages'][0]['content']}"])
    client = async_client(proxy)
    completion = await client.chat.completions.create(model="fake-model", messages=user("ping"))
    assert completion.choices[0].message.content == "echo ping"
    pieces = []
    async for chunk in await client.chat.completions.create(model="fake-model", messages=user("pong"), stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == "echo pong"
    await client.close()


def test_completions_pass_through(client, fake):
    fake.script = lambda body: FakeReply(texts=["four five"])
    completion = client.completions.create(model="fake-model", prompt="one two three", max_tokens=5,
                                           extra_body={"top_k": 5, "cache_prompt": False})
    assert completion.choices[0].text == "four five"
    assert completion.object == "text_completion"
    (request,) = fake.requests
    assert request.path == "/v1/completions"
    assert request.body == {"model": "fake-model", "prompt": "one two three", "max_tokens": 5, "top_k": 5,
                            "cache_prompt": False}


def test_completions_pass_through_stream(client, fake):
    fake.script = lambda body: FakeReply(texts=["four five six"])
    chunks = list(client.completions.create(model="fake-model", prompt="one", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "four five six"
    assert fake.requests[0].path == "/v1/completions" and fake.requests[0].body["stream"] is True


def test_strategy_on_completions_is_refused(proxy, fake):
    response = chat(proxy, {"model": "sc-fake-model", "prompt": "hi"}, path="/v1/completions")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_by_strategy"
    assert fake.requests == []
