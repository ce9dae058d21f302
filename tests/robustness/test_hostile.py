"""Hand-written hostile requests: each ends as an OpenAI-style error with the right status (or an answer), never a
500, a hang or a dead proxy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, user


def not_a_crash(response: httpx.Response) -> None:
    """Answered, or refused with an OpenAI-shaped 4xx."""
    assert response.status_code != 500, response.text
    if response.status_code != 200:
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        assert_openai_error(response, response.status_code)


@pytest.fixture(autouse=True)
def proxy_still_serves(proxy: ProxyServer, fake: FakeBackend) -> Iterator[None]:
    yield
    assert chat(proxy, {"model": "fake-model", "messages": user()}).status_code == 200


# ---- size and shape of the body ----

def test_50_mb_body_is_413(proxy: ProxyServer) -> None:
    body = b'{"model": "fake-model", "messages": [{"role": "user", "content": "' + b"x" * (50 << 20) + b'"}]}'
    assert_openai_error(chat(proxy, body), 413, code="request_too_large")


def test_50_mb_body_without_a_length_is_413(proxy: ProxyServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(50):
            yield b" " * (1 << 20)

    response = httpx.post(proxy.url + "/v1/chat/completions", content=chunks(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert_openai_error(response, 413, code="request_too_large")


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100_000 + b"]" * 100_000
    + b"}",
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
], ids=["bare-brackets", "deep-extra-field", "deep-objects"])
def test_deeply_nested_json_is_400(proxy: ProxyServer, body: bytes) -> None:
    assert_openai_error(chat(proxy, body), 400, code="invalid_json")


@pytest.mark.parametrize("depth", [100, 500, 900, 2000])
def test_nesting_near_the_recursion_limit_in_a_forwarded_field(proxy: ProxyServer, depth: int) -> None:
    """Nesting the parser takes goes on to the engine (pass-through) or the strategy; deeper is a 400, never a 500."""
    nested = "[" * depth + "]" * depth
    for model in ("fake-model", "sc:n=2-fake-model"):
        raw = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}], "x": {nested}}}'
        not_a_crash(chat(proxy, raw.encode()))
        content = f'[{{"type": "text", "text": "hi", "deep": {nested}}}]'
        raw = f'{{"model": "{model}", "messages": [{{"role": "user", "content": {content}}}]}}'
        not_a_crash(chat(proxy, raw.encode()))


@pytest.mark.parametrize("body, code", [
    (b"", "invalid_json"),
    (b"\xff\xfe\x00not utf-8", "invalid_json"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xc3\x28"}]}', "invalid_json"),
    (b"null", "invalid_body"),
    (b'"a string"', "invalid_body"),
    (b"[1, 2]", "invalid_body"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "invalid_json"),
    (b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": Infinity}}',
     "invalid_json"),
])
def test_bodies_that_are_not_a_json_object_are_400(proxy: ProxyServer, body: bytes, code: str) -> None:
    assert_openai_error(chat(proxy, body), 400, code=code)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json; charset=latin-1", ""])
def test_content_types(proxy: ProxyServer, content_type: str) -> None:
    body = json.dumps({"model": "fake-model", "messages": user()}).encode()
    response = httpx.post(proxy.url + "/v1/chat/completions", content=body, headers={"content-type": content_type},
                          timeout=30)
    not_a_crash(response)
    form = httpx.post(proxy.url + "/v1/chat/completions", data={"model": "fake-model"}, timeout=30)
    assert_openai_error(form, 400, code="invalid_json")


# ---- numbers ----

@pytest.mark.parametrize("field, value", [("n", 10**9), ("n", 0), ("n", -1), ("n", 1.5), ("n", "many"),
                                          ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", "lots"),
                                          ("top_logprobs", 10**6), ("temperature", 1e308)])
def test_out_of_range_numbers_are_400_naming_the_field(proxy: ProxyServer, field: str, value: Any) -> None:
    assert_openai_error(chat(proxy, {"model": "fake-model", "messages": user(), field: value}), 400, param=field)


@pytest.mark.parametrize("model", ["fake-model", "sc:n=2-fake-model"])
def test_huge_max_tokens_is_answered_within_the_budget(proxy: ProxyServer, model: str) -> None:
    for field in ("max_tokens", "max_completion_tokens", "seed"):
        response = chat(proxy, {"model": model, "messages": user(), field: 10**30})
        assert response.status_code == 200, response.text


def test_streamed_n_needing_more_slots_than_the_backend_has_is_answered_not_a_hang(proxy: ProxyServer) -> None:
    """The fake has 4 slots: n=83 is 21 calls, each read by its own task as soon as it has its slots (a stream
    that held every call open until all had started once waited for itself forever)."""
    response = chat(proxy, {"model": "fake-model", "messages": user(), "n": 83, "stream": True}, timeout=30)
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    indexes = {c["index"] for e in events[:-1] for c in json.loads(e)["choices"]}
    assert indexes == set(range(0, 84, 4))  # the fake streams choice 0 of each call; calls of 4, the last of 3
    answered = chat(proxy, {"model": "fake-model", "messages": user(), "n": 83}, timeout=10)
    assert answered.status_code == 200 and len(answered.json()["choices"]) == 83


# ---- model names: the prefix grammar's separators, and unicode ----

PREFIXES = ["-", ":", ",", "=", ">", "", " ", "--", "-fake-model", "sc-", "sc:-fake-model", "sc:n=-fake-model",
            "sc:=2-fake-model", "sc:n=2,-fake-model", "sc:n=2,,n=3-fake-model", "sc>-fake-model", ">sc-fake-model",
            "sc>>cot-fake-model", "sc:n=2=3-fake-model", "sc:n:2-fake-model", "sc,n=2-fake-model",
            "sc:n=2>-fake-model", "sc:n=2>cot>-fake-model", "sc>cot>sc>cot>sc-fake-model", "sc:n=64>sc:n=64-fake-model",
            "sc:n=10000000000000000000000-fake-model", "sc:n=2-", "sc:n=2--fake-model", "cot:-fake-model",
            "nope:n=2-fake-model", "nope>sc-fake-model", "SC-fake-model", "sc -fake-model",
            "sc:n=2,select=-fake-model", "bon:select=vote>-fake-model", "sc:n=nan-fake-model", "sc:n=1e309-fake-model",
            "sc:n=-2-fake-model", "sc:n=0x10-fake-model"]


@pytest.mark.parametrize("model", PREFIXES)
def test_prefix_strings_with_every_separator(proxy: ProxyServer, model: str) -> None:
    response = chat(proxy, {"model": model, "messages": user()})
    assert response.status_code in (400, 404), (model, response.status_code, response.text)
    assert_openai_error(response, response.status_code)


UNICODE = ["ünïcødé", "模型", "sc-模型", "sc:n=２-fake-model", "fake\u0000model", "\u202efake-model", "fake-model\u200b",
           "sc\u200b-fake-model", "😀-fake-model", "sc:n=2,😀=1-fake-model", "\udcff", "fake-model\n", "a" * 10_000]


@pytest.mark.parametrize("model", UNICODE, ids=range(len(UNICODE)))
def test_unicode_model_names(proxy: ProxyServer, model: str) -> None:
    raw = json.dumps({"model": model, "messages": user()}).encode()  # lone surrogates stay \\u escapes
    response = chat(proxy, raw)
    assert response.status_code in (200, 400, 404), (model, response.status_code, response.text)
    if response.status_code != 200:
        assert_openai_error(response, response.status_code)
    for path in ("/tokenize", "/v1/detokenize"):
        raw = json.dumps({"model": model, "prompt": "hi", "tokens": [1]}).encode()
        not_a_crash(chat(proxy, raw, path=path))


# ---- `ttc` objects of the wrong type ----

TTC = ["sc", ["sc"], 3, 1.5, True, None, {"strategy": 3}, {"strategy": ["sc"]}, {"strategy": "sc", "params": []},
       {"strategy": "sc", "params": "n=2"}, {"strategy": "sc", "over": "cot"}, {"strategy": "sc", "over": ["cot"]},
       {"strategy": "sc", "over": {"strategy": "cot", "over": []}}, {"strategy": "sc", "over": {"params": {}}},
       {"strategy": "sc", "over": {"strategy": "cot", "extra": 1}}, {"budget": "x"}, {"budget": []},
       {"strategy": "sc", "budget": {"max_calls": "many"}}, {"strategy": "sc", "budget": {"max_calls": 0}},
       {"strategy": "sc", "budget": {"max_seconds": -1}}, {"strategy": "sc", "budget": {"max_total_tokens": "1e400"}},
       {"strategy": "sc", "budget": {"nope": 1}}, {"strategy": "sc", "params": {"n": "lots"}},
       {"strategy": "sc", "params": {"n": 1e308}}, {"strategy": "sc", "params": {"n": 10**30}},
       {"strategy": "sc", "params": {"n": [2]}}, {"strategy": "sc", "params": {"n": {"n": 2}}},
       {"strategy": "sc", "params": {"generator": "cot"}},
       {"strategy": "sc", "params": {"generator": {"strategy": "sc", "params": {"generator": {"strategy": "sc"}}}}},
       {"strategy": "sc", "params": {"generator_params": [1]}}, {"params": {"n": 2}}, {"over": {"strategy": "cot"}},
       {"strategy": "bon", "params": {"http_verifier": "http://127.0.0.1:9/"}},
       {"strategy": "bon", "params": {"judge_model": "http://127.0.0.1:9/v1"}},
       {"strategy": "sc", "over": {"strategy": "sc", "over": {"strategy": "sc", "over": {"strategy": "sc"}}}},
       {"strategy": "sc", "params": {"n": 64}, "over": {"strategy": "sc", "params": {"n": 64}}},
       {"x": 1}, {}]


@pytest.mark.parametrize("ttc", TTC, ids=range(len(TTC)))
def test_ttc_objects_of_the_wrong_type(proxy: ProxyServer, ttc: Any) -> None:
    for model in ("fake-model", "sc-fake-model"):
        raw = json.dumps({"model": model, "messages": user(), "ttc": ttc}).replace('"1e400"', "1e400")
        response = chat(proxy, raw.encode(), timeout=30)  # 1e400: a number JSON allows, Python's float inf
        not_a_crash(response)
        if not isinstance(ttc, dict) and ttc is not None:
            assert_openai_error(response, 400, param="ttc")


def test_concurrent_streamed_n_split_into_calls_do_not_wait_for_each_other(fake_backend: FakeBackend) -> None:
    """Four streams at once whose n is split into two calls each, on a backend with room for one such stream's
    calls at a time: none may hold half its calls waiting for slots another holds (each must end with [DONE])."""
    fake_backend.reset(lambda request: FakeReply(texts=["one two three"], delay=0.2))
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, max_in_flight=8)])
    body = {"model": "fake-model", "messages": user(), "n": 8, "stream": True}
    try:
        with ProxyServer(config) as server, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: chat(server, body, timeout=15), range(4)))
    finally:
        fake_backend.reset()
    for response in answers:
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
