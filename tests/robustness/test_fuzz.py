"""Schemathesis against the proxy in front of the scripted fake backend: requests generated from the proxy's own
OpenAPI document (GET /openapi.json), valid and invalid, with model names and `ttc` objects drawn from the strategy
composition grammar. No response may be a 500; every error is OpenAI-shaped; every 200 matches the OpenAI spec
(or, for the engine utilities the spec does not have, the proxy's published schema).

Derandomized: the same requests every run. Reproduce or widen with `.venv/bin/python -m pytest tests/test_fuzz.py`
(FUZZ_SCALE=4 draws four times as many)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from ttc_proxy.proxy.registry import load_registry
from ttc_proxy.tools.fakebackend import FakeBackend

from tests.helpers import fake_config
from tests.helpers import ProxyServer, validate_schema

KEY = "fuzz-key"
SCALE = int(os.environ.get("FUZZ_SCALE", "1"))
# Examples per operation and mode: the chat endpoint, where the grammar lives, gets most.
EXAMPLES: dict[str, dict[GenerationMode, int]] = {
    "POST /v1/chat/completions": {GenerationMode.POSITIVE: 560, GenerationMode.NEGATIVE: 120},
    "POST /v1/completions": {GenerationMode.POSITIVE: 110, GenerationMode.NEGATIVE: 50},
    "POST /tokenize": {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20},
    "POST /v1/tokenize": {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10},
    "POST /detokenize": {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20},
    "POST /v1/detokenize": {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10},
    "GET /v1/traces/{trace_id}": {GenerationMode.POSITIVE: 40},  # any string is a valid id: no negative
    "GET /v1/models": {GenerationMode.POSITIVE: 10},
    "GET /health": {GenerationMode.POSITIVE: 10},
}
MIN_REQUESTS = 1000
# schemathesis reads only the first 20 events of a stream by default, then closes it: a long stream (a pass-through
# whose n splits into several calls) would then lack its [DONE]. Every stream is read to its end.
READ_WHOLE_STREAMS = SchemathesisConfig.from_dict({"max-stream-events": 1_000_000})

# ---- the composition grammar: model-name prefixes and `ttc` objects ----

SLUGS = sorted(load_registry()[0])
ANY_SLUG = st.sampled_from([*SLUGS, "nope", "BON", "", "sc ", "ünï"])
PARAM_KEYS = st.sampled_from(["n", "k", "iterations", "batch", "select", "warmup", "temperature", "min_success",
                              "generator", "generator_params", "max_depth", "top_k", "http_verifier", "judge_model",
                              "pivots", "", " ", "ü"])
PREFIX_VALUES = st.one_of(st.integers(-2, 70).map(str), st.sampled_from(["", "0", "10**9", "1e309", "nan", "true",
                                                                        "vote", "fake-model", "-", ":", ">", ",",
                                                                        "="]))
MODELS = st.sampled_from(["fake-model", "", "x", "ünïcødé-模型", "fake-model-", "-fake-model", "a" * 300])
SEPARATORS = st.sampled_from([">", ">>", "", ">-"])


@st.composite
def prefix_model_names(draw: st.DrawFn) -> str:
    """`<spec>[><spec>...]-<model>`, with every separator also where it does not belong, and empty parts."""
    specs = []
    for _ in range(draw(st.integers(1, 6))):
        slug = draw(ANY_SLUG)
        pairs = draw(st.lists(st.tuples(PARAM_KEYS, st.sampled_from(["=", "", "=="]), PREFIX_VALUES), max_size=3))
        colon = draw(st.sampled_from([":", "", "::"])) if pairs else draw(st.sampled_from(["", "", ":"]))
        specs.append(slug + colon + draw(st.sampled_from([",", ",,"])).join(k + eq + v for k, eq, v in pairs))
    return draw(SEPARATORS).join(specs) + draw(st.sampled_from(["-", "--", ":", "", "-:"])) + draw(MODELS)


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=False,
                                                                                  allow_infinity=False),
                      st.text(max_size=6))
PARAM_VALUES = st.one_of(JSON_LEAF, st.lists(JSON_LEAF, max_size=3), st.dictionaries(st.text(max_size=4), JSON_LEAF,
                                                                                       max_size=2))
PARAMS = st.dictionaries(PARAM_KEYS, PARAM_VALUES, max_size=4)
WRONG = st.one_of(JSON_LEAF, st.lists(JSON_LEAF, max_size=2))
SPECS = st.recursive(
    st.fixed_dictionaries({"strategy": ANY_SLUG}, optional={"params": PARAMS}),
    lambda inner: st.fixed_dictionaries(
        {"strategy": ANY_SLUG},
        optional={"params": st.one_of(PARAMS, st.fixed_dictionaries({"generator": inner},
                                                                     optional={"generator_params": PARAMS})),
                  "over": st.one_of(inner, WRONG)}),
    max_leaves=8)
TTC = st.one_of(
    WRONG,
    SPECS,
    st.fixed_dictionaries({}, optional={
        "strategy": st.one_of(ANY_SLUG, JSON_LEAF), "params": st.one_of(PARAMS, WRONG), "over": st.one_of(SPECS, WRONG),
        "budget": st.one_of(st.dictionaries(st.sampled_from(["max_total_tokens", "max_calls", "max_seconds", "x"]),
                                            JSON_LEAF, max_size=3), WRONG),
        "x": JSON_LEAF}),
)
# Compositions that can run (and some that cannot: not every strategy runs over another).
RUNS = ["sc:n=2", "bon:n=2", "bon:n=3,select=vote", "mcts:iterations=1,batch=2", "deepconf:n=2,warmup=1", "cot",
        "think:max_waits=1", "deepthink:k=2", "sc:n=3>cot", "bon:n=2>sc:n=2", "sc:n=2>bon:n=2>cot", *SLUGS]
RUNNABLE = st.one_of(st.sampled_from(RUNS), st.lists(st.sampled_from(RUNS), min_size=2, max_size=4).map(">".join)) \
    .map(lambda prefix: prefix + "-fake-model")
GRAMMAR = st.one_of(
    st.fixed_dictionaries({"model": st.one_of(RUNNABLE, st.just("fake-model"), prefix_model_names(), MODELS)},
                          optional={"ttc": TTC}),
    st.just({}),  # the body as generated from the schema
)
AUTH = st.sampled_from([{"authorization": f"Bearer {KEY}"}] * 8 + [{"api-key": KEY}, {}, {"authorization": "Bearer x"},
                                                                   {"authorization": "Bearer"}])


# ---- what a response must be ----

def check_error(body: Any) -> None:
    validate_schema(body, "ErrorResponse")
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body


def engine_body(body: Any) -> Any:
    """A passed-through body (the engine's own bytes) with the spec's required but nullable choice fields that
    engines leave out (llama-server: `logprobs`, the two `refusal`s) set to null; a strategy's answer (it has `ttc`) as is."""
    if not isinstance(body, dict) or "ttc" in body or not isinstance(body.get("choices"), list):
        return body
    for choice in body["choices"]:
        if isinstance(choice, dict):
            choice.setdefault("logprobs", None)
            if isinstance(choice["logprobs"], dict) and "content" in choice["logprobs"]:
                choice["logprobs"].setdefault("refusal", None)
            if isinstance(choice.get("message"), dict):
                choice["message"].setdefault("refusal", None)
    return body


def check_events(text: str, chunk_schema: str) -> None:
    events = [e for e in text.replace("\r\n", "\n").split("\n\n") if e.strip()]
    assert events and events[-1] == "data: [DONE]", text[-300:]
    for event in events[:-1]:
        if event.startswith(":"):
            continue
        assert event.startswith("data: "), event
        payload = json.loads(event[6:])
        if "error" in payload:
            check_error(payload)
        else:
            validate_schema(engine_body(payload), chunk_schema)


class Checker:
    """Validates responses against the OpenAI spec and the proxy's published document; counts and collects."""

    def __init__(self, document: dict[str, Any]) -> None:
        components = {"components": document["components"]}
        self.own = {name: Draft202012Validator({"$ref": f"#/components/schemas/{name}", **components})
                    for name in ("TokenizeResponse", "DetokenizeResponse")}
        self.statuses: Counter[int] = Counter()
        self.by_operation: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.strategy_answers = 0  # 200s a strategy run made (they carry `ttc`)
        self.failures: dict[str, str] = {}  # one example of each kind of failure

    def check(self, label: str, response: schemathesis.Response, sent: str) -> None:
        self.statuses[response.status_code] += 1
        self.by_operation[label] += 1
        try:
            self._check(label, response)
        except Exception as exc:  # noqa: BLE001 - collected, reported together at the end
            kind = f"{label} {response.status_code}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            self.failures.setdefault(kind, f"{str(exc)[:400]}\n  sent: {sent[:600]}\n  got: {response.text[:400]}")

    def _check(self, label: str, response: schemathesis.Response) -> None:
        status = response.status_code
        assert not response.stream_cut_short, "the stream outlasted the request timeout"
        assert status != 500, "a 500"
        if status != 200:
            assert status >= 400, f"status {status}"
            check_error(response.json())
            self.error_codes[f"{status} {response.json()['error']['code']}"] += 1
            return
        path = label.split(" ", 1)[1]
        streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
        if path == "/v1/chat/completions":
            self.strategy_answers += '"ttc": {' in response.text or '"ttc":{' in response.text
            if streamed:
                check_events(response.text, "CreateChatCompletionStreamResponse")
            else:
                validate_schema(engine_body(response.json()), "CreateChatCompletionResponse")
        elif path == "/v1/completions":
            if streamed:
                check_events(response.text, "CreateCompletionResponse")
            else:
                validate_schema(engine_body(response.json()), "CreateCompletionResponse")
        elif path == "/v1/models":
            validate_schema(response.json(), "ListModelsResponse")
        elif path.endswith("/tokenize"):
            self.own["DetokenizeResponse" if "detokenize" in path else "TokenizeResponse"].validate(response.json())
        elif path == "/health":
            assert response.json()["status"] == "ok"
        else:
            assert isinstance(response.json(), dict)


@pytest.fixture(scope="module")
def fuzz_proxy(fake_backend: FakeBackend) -> Iterator[ProxyServer]:
    """A proxy of its own (what the fuzz learns or stores stays out of the shared one), with a key."""
    fake_backend.reset()
    with ProxyServer(fake_config(fake_backend, server={"api_keys": [KEY]})) as server:
        yield server
    fake_backend.reset()


def test_fuzz_openapi_document_no_500_and_openai_shaped(fuzz_proxy: ProxyServer) -> None:
    document = httpx.get(fuzz_proxy.url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(document, config=READ_WHOLE_STREAMS)
    operations = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}
    assert set(EXAMPLES) <= set(operations), sorted(operations)
    checker = Checker(document)
    session = requests.Session()
    started = time.monotonic()

    for label, modes in EXAMPLES.items():
        for mode, examples in modes.items():
            cases = operations[label].as_strategy(generation_mode=mode)

            @settings(max_examples=examples * SCALE, derandomize=True, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=cases, grammar=GRAMMAR if label.endswith("chat/completions") else st.just({}), auth=AUTH)
            def send(case: schemathesis.Case, grammar: dict[str, Any], auth: dict[str, str]) -> None:
                if grammar and isinstance(case.body, dict):
                    case.body = {**case.body, **grammar}
                response = case.call(base_url=fuzz_proxy.url, session=session, headers=dict(auth), timeout=60)
                checker.check(label, response, f"{auth} {case.formatted_path} {case.body!r}")

            send()

    seconds = time.monotonic() - started
    total = sum(checker.statuses.values())
    print(f"\nfuzz: {total} requests in {seconds:.1f} s; statuses {dict(sorted(checker.statuses.items()))}; "
          f"{checker.strategy_answers} answered by a strategy run; by operation {dict(checker.by_operation)}; "
          f"errors {dict(checker.error_codes.most_common())}")
    assert not checker.failures, "\n\n".join(f"{kind}\n{example}" for kind, example in checker.failures.items())
    assert total >= MIN_REQUESTS, (total, dict(checker.by_operation))
    assert checker.statuses[500] == 0
    # the grammar reached the strategies (a run answered) and the validation (errors of several kinds)
    assert checker.statuses[200] >= 100 and checker.statuses[400] >= 100, checker.statuses
    assert checker.strategy_answers >= 50, checker.strategy_answers
    assert len(checker.error_codes) >= 10, checker.error_codes
    assert httpx.get(fuzz_proxy.url + "/health", timeout=10).json()["status"] == "ok"
