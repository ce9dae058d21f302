"""Errors: every failure is an OpenAI-shaped error with the right status, and the proxy keeps serving."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import (
    ProxyServer,
    assert_openai_error,
    backend_entry,
    chat,
    closed_port,
    sync_client,
    user,
    validate_schema,
)


def still_serving(server: ProxyServer, fake: FakeBackend | None = None) -> None:
    if fake is not None:
        fake.script = lambda body: FakeReply()
    response = chat(server, {"model": "fake-model", "messages": user()})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]


# ---- the request ----

@pytest.mark.parametrize(("body", "code"), [
    (b"{\"model\": \"fake-model\", \"messages\": [", "invalid_json"),
    (b"\xff\xfe not utf-8", "invalid_json"),
    (b"", "invalid_json"),
    (b"[1, 2, 3]", "invalid_body"),
    (b"\"a string\"", "invalid_body"),
    (b"null", "invalid_body"),
    (b"{\"model\": \"fake-model\", \"messages\": [], \"ttc\": " + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "invalid_json"),  # nested past the parser's recursion limit
])
def test_unparseable_or_non_object_body(proxy, fake, body, code):
    assert_openai_error(chat(proxy, body), 400, code=code)
    assert fake.requests == []
    still_serving(proxy, fake)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": user()}, "model"),
    ({"model": "fake-model"}, "messages"),
    ({"model": 42, "messages": user()}, "model"),
    ({"model": "", "messages": user()}, "model"),
    ({"model": "fake-model", "messages": []}, "messages"),
    ({"model": "fake-model", "messages": "hello"}, "messages"),
    ({"model": "fake-model", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "fake-model", "messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"model": "fake-model", "messages": [{"role": "user"}]}, "messages.0"),
    ({"model": "fake-model", "messages": user(), "temperature": "hot"}, "temperature"),
    ({"model": "fake-model", "messages": user(), "temperature": 3}, "temperature"),
    ({"model": "fake-model", "messages": user(), "max_tokens": 0}, "max_tokens"),
    ({"model": "fake-model", "messages": user(), "n": "two"}, "n"),
    ({"model": "fake-model", "messages": user(), "stream": "maybe"}, "stream"),
    ({"model": "sc-fake-model", "messages": [{"role": "user", "content": 5}]}, "messages.0.content.str"),
])
def test_invalid_fields_name_their_param(proxy, fake, body, param):
    error = assert_openai_error(chat(proxy, body), 400, code="invalid_value")
    assert error["param"] == param or error["param"].startswith(param), error
    assert error["type"] == "invalid_request_error"
    assert fake.requests == []


def test_invalid_completions_request(proxy, fake):
    assert_openai_error(chat(proxy, {"prompt": "hi"}, path="/v1/completions"), 400, param="model")
    assert fake.requests == []


def test_sdk_raises_bad_request(client, fake):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake-model", messages=[])
    assert info.value.status_code == 400 and info.value.body["param"] == "messages"


def test_unknown_path_and_method(proxy, fake):
    error = assert_openai_error(httpx.get(proxy.url + "/v1/engines/nope"), 404, code="not_found")
    assert error["type"] == "invalid_request_error"
    assert_openai_error(httpx.post(proxy.url + "/v2/chat/completions", json={}), 404)
    assert_openai_error(httpx.get(proxy.url + "/v1/chat/completions"), 405, code="method_not_allowed")
    still_serving(proxy, fake)


# ---- the backend's errors ----

@pytest.mark.parametrize("status", [400, 401, 404, 422, 429, 500, 503])
def test_backend_error_status_and_message_pass_through(proxy, fake, status):
    fake.script = lambda body: FakeReply(status=status, error={
        "error": {"message": f"backend says {status}", "type": "weird_type", "param": "messages", "code": "E1"}})
    # 422 is how FastAPI engines (transformers serve) refuse a request; the OpenAI API's status for it is 400
    error = assert_openai_error(chat(proxy, {"model": "fake-model", "messages": user()}), 400 if status == 422 else status)
    assert error["message"] == f"backend says {status}"
    assert error["param"] == "messages" and error["code"] == "E1" and error["type"] == "weird_type"
    still_serving(proxy, fake)


@pytest.mark.parametrize(("payload", "message"), [
    ({"error": {"code": 500, "message": "llama.cpp shaped", "type": "server_error"}}, "llama.cpp shaped"),
    ({"detail": "fastapi shaped"}, "fastapi shaped"),
    ({"detail": [{"loc": ["body", "top_k"], "msg": "extra fields not permitted", "type": "x"}]},
     "body.top_k: extra fields not permitted"),
    ({"error": "just a string"}, "just a string"),
    ({"message": "top-level message"}, "top-level message"),
    ({"object": "error", "message": "vllm shaped", "type": "BadRequestError", "code": 400}, "vllm shaped"),
])
def test_backend_error_shapes_are_normalised(proxy, fake, payload, message):
    fake.script = lambda body: FakeReply(status=500, error=payload)
    error = assert_openai_error(chat(proxy, {"model": "fake-model", "messages": user()}), 500)
    assert error["message"] == message


@pytest.mark.parametrize("status", [400, 502, 503])
def test_non_json_backend_error(proxy, fake, status):
    fake.script = lambda body: FakeReply(status=status, raw_body=b"<html>upstream exploded</html>\n")
    error = assert_openai_error(chat(proxy, {"model": "fake-model", "messages": user()}), status)
    assert error["message"] == "<html>upstream exploded</html>"
    assert error["type"] == ("invalid_request_error" if status < 500 else "backend_error")


def test_empty_backend_error_body(proxy, fake):
    fake.script = lambda body: FakeReply(status=500, raw_body=b"")
    error = assert_openai_error(chat(proxy, {"model": "fake-model", "messages": user()}), 500)
    assert "500" in error["message"]


def test_backend_error_on_streamed_pass_through(proxy, fake):
    fake.script = lambda body: FakeReply(status=429, error={"error": {"message": "slow down", "type": "rate"}})
    error = assert_openai_error(chat(proxy, {"model": "fake-model", "messages": user(), "stream": True}), 429)
    assert error["message"] == "slow down"


def test_backend_error_on_completions(proxy, fake):
    fake.script = lambda body: FakeReply(status=404, error={"error": {"message": "no such model"}})
    error = assert_openai_error(chat(proxy, {"model": "fake-model", "prompt": "x"}, path="/v1/completions"), 404)
    assert error["message"] == "no such model"


def test_backend_error_through_strategy(proxy, fake):
    fake.script = lambda body: FakeReply(status=400, error={"error": {"message": "context too long"}})
    error = assert_openai_error(chat(proxy, {"model": "sc:n=2-fake-model", "messages": user()}), 400)
    assert error["message"] == "context too long"
    still_serving(proxy, fake)


def test_sdk_sees_backend_errors(client, fake):
    fake.script = lambda body: FakeReply(status=503, raw_body=b"maintenance")
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="fake-model", messages=user())
    assert info.value.status_code == 503 and info.value.body["message"] == "maintenance"


def test_backend_non_json_success_breaks_strategy_cleanly(proxy, fake):
    fake.script = lambda body: FakeReply(raw_body=b"not json at all")
    error = assert_openai_error(chat(proxy, {"model": "sc:n=2-fake-model", "messages": user()}), 502)
    assert "not JSON" in error["message"]


def test_backend_reply_without_choices_breaks_strategy_cleanly(proxy, fake):
    fake.script = lambda body: FakeReply(raw_body=b'{"id": "x", "choices": []}')
    assert_openai_error(chat(proxy, {"model": "sc:n=2-fake-model", "messages": user()}), 502, code="strategy_failed")
    still_serving(proxy, fake)


def stream_error_event(server: ProxyServer, body: dict) -> dict:
    """Stream `body`; the relay must end with an OpenAI-shaped error event and [DONE]. Returns the error."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=5) as response:
        assert response.status_code == 200
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payload = json.loads(events[-2][6:])
    validate_schema(payload, "ErrorResponse")
    return payload["error"]


def test_backend_dies_mid_stream(proxy, fake):
    fake.script = lambda body: FakeReply(texts=["one two three four"], fail_after_chunks=2)
    error = stream_error_event(proxy, {"model": "fake-model", "messages": user(), "stream": True})
    assert error["code"] == "backend_unreachable" and "broke off" in error["message"]
    still_serving(proxy, fake)


# ---- the backend unreachable or slow ----

def test_backend_unreachable_is_502(fake_backend):
    config = fake_config(fake_backend, backends=[{"name": "gone", "kind": "llama_cpp",
                                                  "base_url": f"http://127.0.0.1:{closed_port()}/v1"}])
    with ProxyServer(config) as server:
        for body in ({"model": "fake-model", "messages": user()},
                     {"model": "fake-model", "messages": user(), "stream": True},
                     {"model": "sc:n=2-fake-model", "messages": user()}):
            error = assert_openai_error(chat(server, body), 502, code="backend_unreachable")
            assert "unreachable" in error["message"]
        assert httpx.get(server.url + "/health").status_code == 200


def test_backend_timeout_is_504(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, timeouts={"read": 0.2})])
    fake.script = lambda body: FakeReply(delay=1.0)
    with ProxyServer(config) as server:
        started = time.monotonic()
        error = assert_openai_error(chat(server, {"model": "fake-model", "messages": user()}), 504,
                                    code="backend_timeout")
        assert time.monotonic() - started < 0.8
        assert "timed out" in error["message"]
        assert_openai_error(chat(server, {"model": "sc:n=2-fake-model", "messages": user()}), 504)
        assert_openai_error(chat(server, {"model": "fake-model", "messages": user(), "stream": True}), 504)
        still_serving(server, fake)


def test_backend_stall_mid_stream_times_out(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, timeouts={"read": 0.2})])
    fake.script = lambda body: FakeReply(texts=["one two three"], chunk_delay=1.0)
    with ProxyServer(config) as server:
        started = time.monotonic()
        error = stream_error_event(server, {"model": "fake-model", "messages": user(), "stream": True})
        assert error["code"] == "backend_timeout"
        assert time.monotonic() - started < 0.9  # the stall is cut by the read timeout, not waited out
        still_serving(server, fake)


# ---- learning the backend's cap on n ----

def test_n_error_lowers_the_remembered_cap(fake_backend, fake):
    # Configured to believe the backend takes n=8; it has 4 slots and says so with a 400.
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities={"max_n": 8})])
    with ProxyServer(config) as server:
        assert httpx.get(server.url + "/health").json()["backends"]["fake"]["max_n"] == 8
        client = sync_client(server)
        completion = client.chat.completions.create(model="sc:n=8-fake-model", messages=user())
        # The refused n=8 call is drawn again within the cap the 400 named; the client never sees the 400.
        assert completion.ttc["details"]["samples"] == 8
        assert [r.body["n"] for r in fake.chat_requests()] == [8, 4, 4]
        assert completion.ttc["backend_calls"] == 3
        assert httpx.get(server.url + "/health").json()["backends"]["fake"]["max_n"] == 4
        fake.reset()
        client.chat.completions.create(model="sc:n=8-fake-model", messages=user())
        assert [r.body["n"] for r in fake.chat_requests()] == [4, 4]


def test_pass_through_n_above_the_engines_cap_is_split(client, fake):
    """The fake, like llama-server, takes n up to its 4 slots: n=6 is two calls at once, one reply."""
    response = client.chat.completions.create(model="fake-model", messages=user(), n=6, seed=5)
    assert sorted(r.body.get("n", 1) for r in fake.chat_requests()) == [2, 4]
    assert sorted(r.body["seed"] for r in fake.chat_requests()) == [5, 6]  # each call samples afresh
    assert [c.index for c in response.choices] == list(range(6))
    calls = [r.body for r in fake.chat_requests()]
    assert response.usage.prompt_tokens > 0 and len(calls) == 2


def test_health(proxy):
    health = httpx.get(proxy.url + "/health").json()
    assert health["status"] == "ok"
    assert health["backends"]["fake"]["kind"] == "llama_cpp" and health["backends"]["fake"]["max_n"] == 4
    assert json.dumps(health)


def test_a_pooled_connection_closed_under_a_request_is_retried_once(proxy, fake):
    dropped = []

    def script(body):
        if not dropped:
            dropped.append(True)
            return FakeReply(drop=True)
        return FakeReply(texts=["fine"])

    fake.script = script
    response = chat(proxy, {"model": "fake-model", "messages": user()})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "fine"
    assert len(fake.chat_requests()) == 2


def test_a_backend_that_keeps_dropping_is_a_502_after_one_retry(proxy, fake):
    fake.script = lambda body: FakeReply(drop=True)
    response = chat(proxy, {"model": "fake-model", "messages": user()})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "backend_unreachable"
    assert len(fake.chat_requests()) == 2
