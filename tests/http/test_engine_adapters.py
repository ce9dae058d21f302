"""What the proxy absorbs where an engine departs from the OpenAI API, on the scripted fake playing
`transformers serve` (kind transformers: another name for the model, `n` ignored, the stop string left in the reply,
streams without [DONE]). The real engine runs in test_other_engines.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ttc_proxy.proxy.backends.stops import StreamedStopCutter, cut_at_stop
from ttc_proxy.proxy.config import ProxyConfig
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer, sync_client, user


@pytest.fixture(scope="module")
def transformers_like(fake_backend: FakeBackend) -> Iterator[ProxyServer]:
    config = ProxyConfig.model_validate({"backends": [{
        "name": "tf", "kind": "transformers", "base_url": fake_backend.base_url,
        "model_names": {"smollm2": "fake-model"},
        "chat_template": {"message": "<|im_start|>{role}\n{content}<|im_end|>\n",
                          "generation_prompt": "<|im_start|>assistant\n"}}]})
    with ProxyServer(config) as server:
        yield server


def kept_stop(body: dict[str, Any]) -> FakeReply:
    """Like transformers serve: one choice whatever n says, and the stop string stays in the reply."""
    return FakeReply(texts=[f"3 times 4 is 12 (seed {body.get('seed')})"], ignore_n=True, send_done=False)


def stream_events(server: ProxyServer, body: dict[str, Any]) -> list[str]:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_stop_string_is_cut_from_the_reply(transformers_like: ProxyServer, fake: FakeBackend) -> None:
    fake.script = kept_stop
    with sync_client(transformers_like) as sdk:
        response = sdk.chat.completions.create(model="smollm2", messages=user(), stop=[" is", "xyz"])
    assert response.choices[0].message.content == "3 times 4"
    assert response.choices[0].finish_reason == "stop"
    assert response.model == "smollm2"
    assert fake.chat_requests()[0].body["model"] == "fake-model"  # the engine's own name for it


def test_stop_string_is_cut_from_a_stream_split_across_chunks(transformers_like: ProxyServer,
                                                               fake: FakeBackend) -> None:
    fake.script = kept_stop
    events = stream_events(transformers_like, {"model": "smollm2", "messages": user(), "stream": True,
                                               "stop": "4 is"})  # " 4" and " is" arrive as two chunks
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == "3 times "
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert events[-1] == "[DONE]"  # the engine sent none: the proxy ends the stream properly


def test_n_is_drawn_by_calls_at_once_when_the_engine_ignores_it(transformers_like: ProxyServer,
                                                                 fake: FakeBackend) -> None:
    fake.script = lambda body: FakeReply(texts=kept_stop(body).texts, ignore_n=True, delay=0.2)
    with sync_client(transformers_like) as sdk:
        response = sdk.chat.completions.create(model="smollm2", messages=user(), n=3, seed=10)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.message.content for c in response.choices] == [f"3 times 4 is 12 (seed {s})" for s in (10, 11, 12)]
    assert all("n" not in r.body for r in fake.chat_requests())  # the engine is never asked for n it ignores
    one = fake.chat_requests()[0]
    assert response.usage.completion_tokens == 3 * len(response.choices[0].message.content.split())
    assert response.usage.prompt_tokens > 0 and one.body["model"] == "fake-model"
    assert fake.max_in_flight_seen == 3  # at the same time, not one after another


def test_n_streams_merge_into_one(transformers_like: ProxyServer, fake: FakeBackend) -> None:
    fake.script = kept_stop
    events = stream_events(transformers_like, {"model": "smollm2", "messages": user(), "stream": True, "n": 2,
                                               "seed": 1, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and {c["model"] for c in chunks} == {"smollm2"}
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == {0: "3 times 4 is 12 (seed 1)", 1: "3 times 4 is 12 (seed 2)"}
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 2 * len(texts[0].split())


def test_a_merged_stream_broken_off_ends_with_an_error_event(transformers_like: ProxyServer,
                                                             fake: FakeBackend) -> None:
    fake.script = lambda body: FakeReply(texts=["a b c d e f"], ignore_n=True, send_done=False,
                                         fail_after_chunks=2 if body.get("seed") == 2 else None)
    events = stream_events(transformers_like, {"model": "smollm2", "messages": user(), "stream": True, "n": 2,
                                               "seed": 1})
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2])


def test_a_strategy_sees_replies_cut_at_their_stop(transformers_like: ProxyServer, fake: FakeBackend) -> None:
    fake.script = kept_stop
    with sync_client(transformers_like) as sdk:
        response = sdk.chat.completions.create(model="sc:n=2-smollm2", messages=user(), stop=[" is"])
    assert response.choices[0].message.content == "3 times 4"
    assert len(fake.chat_requests()) == 2 and all("n" not in r.body for r in fake.chat_requests())
    # the run says how it worked around the engine
    assert response.model_extra["ttc"]["details"]["adaptations"] == [
        "samples drawn by concurrent calls of at most 1: backend tf takes n <= 1",
        "stop strings cut by the proxy: backend tf leaves them in"]


def test_think_continues_through_completions_with_the_configured_template(transformers_like: ProxyServer,
                                                                          fake: FakeBackend) -> None:
    fake.script = kept_stop
    with sync_client(transformers_like) as sdk:
        response = sdk.chat.completions.create(model="think-smollm2", messages=user(), max_tokens=32)
    raw = [r.body["prompt"] for r in fake.requests if r.path.endswith("/v1/completions")]
    assert raw and all(p.startswith("<|im_start|>user\n") for p in raw)  # ChatML from the configured template
    assert any("configured chat template" in a for a in response.model_extra["ttc"]["details"]["adaptations"])


def test_a_strategy_needing_logprobs_is_refused_naming_them(transformers_like: ProxyServer,
                                                            fake: FakeBackend) -> None:
    response = httpx.post(f"{transformers_like.url}/v1/chat/completions", timeout=30, json={
        "model": "bon:n=2,select=confidence,confidence=logprob-smollm2", "messages": user()})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "backend_capability_missing" and "logprobs" in error["message"]
    assert fake.chat_requests() == []


@pytest.mark.parametrize(("pieces", "stops", "expected"), [
    (["ab", "c<", "/s", "> more"], ["</s>"], "abc"),
    (["no stop ", "here"], ["</s>"], "no stop here"),
    (["x", "y"], ["y", "xy"], ""),  # the earliest match wins ("xy" starts before "y"), whatever the list order
    (["stop at once"], ["stop"], ""),
])
def test_streamed_stop_cutter(pieces: list[str], stops: list[str], expected: str) -> None:
    cutter = StreamedStopCutter(stops)
    out = "".join(cutter.feed(0, p) for p in pieces) + cutter.flush(0)
    assert out == expected
    whole = cut_at_stop("".join(pieces), stops)  # the same as cutting the whole text
    assert out == (whole if whole is not None else "".join(pieces))


def test_streamed_n_above_the_slots_does_not_wait_on_itself(proxy: ProxyServer, fake: FakeBackend) -> None:
    """n=8 on the fake's 4 slots: two streams of n=4, each holding all 4 slots in turn. The first is read while the
    second waits for its slots (it used to wait for the second to open first: never)."""
    fake.script = lambda body: FakeReply(texts=["a b c"], chunk_delay=0.01)
    events = stream_events(proxy, {"model": "fake-model", "messages": user(), "stream": True, "n": 8})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {choice["index"] for c in chunks for choice in c["choices"]} == {0, 4}  # the fake streams choice 0
    assert sorted(r.body["n"] for r in fake.chat_requests()) == [4, 4]


@pytest.mark.parametrize("index", ["x", None, [1]])
def test_a_choice_index_that_is_not_an_integer_is_taken_by_position(transformers_like: ProxyServer,
                                                                    fake: FakeBackend, index: Any) -> None:
    """n split into calls renumbers choices: an engine's odd `index` must not become an internal error."""
    reply = {"id": "r", "object": "chat.completion", "created": 1, "model": "fake-model",
             "choices": [{"index": index, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}
    chunk = {"id": "r", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
             "choices": [{"index": index, "delta": {"content": "hi"}, "finish_reason": None}]}
    fake.script = lambda body: FakeReply(raw_stream=f"data: {json.dumps(chunk)}\n\n".encode()) if body.get("stream") \
        else FakeReply(raw_body=json.dumps(reply).encode())
    with sync_client(transformers_like) as sdk:
        response = sdk.chat.completions.create(model="smollm2", messages=user(), n=2, stop=["zz"])
    assert [c.index for c in response.choices] == [0, 1]
    events = stream_events(transformers_like, {"model": "smollm2", "messages": user(), "stream": True, "n": 2,
                                               "stop": ["zz"]})
    assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])


@pytest.mark.parametrize("n", [1, 2])
def test_text_held_back_for_stop_cutting_is_not_lost_when_a_stream_never_finishes(transformers_like: ProxyServer,
                                                                                  fake: FakeBackend, n: int) -> None:
    """An engine that ends its stream with no finish chunk: the last characters, held back in case they began a
    stop string, still reach the client."""
    chunk = {"id": "r", "object": "chat.completion.chunk", "created": 1, "model": "fake-model",
             "choices": [{"index": 0, "delta": {"content": "abc"}, "finish_reason": None}]}
    fake.script = lambda body: FakeReply(raw_stream=f"data: {json.dumps(chunk)}\n\n".encode())
    events = stream_events(transformers_like, {"model": "smollm2", "messages": user(), "stream": True, "n": n,
                                               "stop": ["zzzz"]})
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    for e in events[:-1]:
        for choice in json.loads(e)["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert texts == {i: "abc" for i in range(n)}
