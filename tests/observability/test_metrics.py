"""GET /metrics: exact counts after a known mix of requests, bounded labels, the key rule, the off switch."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from ..helpers import ProxyServer, assert_openai_error, chat, fake_config, sync_client, user, wait_until


def samples(server: ProxyServer, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(server.url + "/metrics", headers=headers or {}, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(found: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_counts_after_a_known_mix_of_requests(fake: FakeBackend) -> None:
    with ProxyServer(fake_config(fake)) as server, sync_client(server) as client:
        client.chat.completions.create(model="fake-model", messages=user())
        client.chat.completions.create(model="fake-model", messages=user())
        for _ in client.chat.completions.create(model="fake-model", messages=user(), stream=True,
                                                stream_options={"include_usage": True}):
            pass
        client.chat.completions.create(model="sc:n=3-fake-model", messages=user())
        assert chat(server, {"model": "no-such-model-x1", "messages": user()}).status_code == 404
        assert chat(server, {"model": "bogus:n=2-fake-model", "messages": user()}).status_code == 400
        found = samples(server)

    chat_path = "/v1/chat/completions"
    assert value(found, "ttc_requests_total", endpoint=chat_path, model="fake-model", strategy="none",
                 status="200") == 3
    assert value(found, "ttc_requests_total", endpoint=chat_path, model="fake-model", strategy="sc",
                 status="200") == 1
    # routed as pass-through, refused before a backend was found: no model label
    assert value(found, "ttc_requests_total", endpoint=chat_path, model="-", strategy="none", status="404") == 1
    assert value(found, "ttc_requests_total", endpoint=chat_path, model="-", strategy="-", status="400") == 1
    # the client's made-up names are no series of their own
    assert not any("no-such-model" in str(labels) or "bogus" in str(labels) for _, labels in found)
    # 3 pass-through calls and sc's 3 samples (seedless: one call of n=3)
    calls = sum(v for (name, labels), v in found.items()
                if name == "ttc_backend_calls_total" and ("kind", "chat") in labels and ("status", "200") in labels)
    assert calls == 4
    assert value(found, "ttc_request_duration_seconds_count", endpoint=chat_path, model="fake-model",
                 strategy="none") == 3
    assert value(found, "ttc_time_to_first_token_seconds_count", model="fake-model", strategy="none") == 1
    # the fake's usage: every pass-through reply's prompt tokens and completion tokens are counted
    assert value(found, "ttc_tokens_total", kind="completion", model="fake-model", strategy="none") > 0
    assert value(found, "ttc_tokens_total", kind="completion", model="fake-model", strategy="sc") > 0
    assert value(found, "ttc_backend_in_flight", backend="fake") == 0


def test_strategy_events_and_cached_tokens(fake: FakeBackend) -> None:
    fake.reset(lambda body: FakeReply(texts=["The answer is 42."], cached_tokens=5))
    with ProxyServer(fake_config(fake)) as server, sync_client(server) as client:
        completion = client.chat.completions.create(model="mcts:iterations=2-fake-model", messages=user())
        trace = httpx.get(f"{server.url}/v1/traces/{completion.model_extra['ttc']['trace_id']}").json()
        found = samples(server)
    tree = next(node["notes"]["tree"] for node in trace["nodes"] if "tree" in node.get("notes", {}))
    assert value(found, "ttc_strategy_events_total", strategy="mcts", event="mcts_nodes") == len(tree)
    usage = completion.usage
    assert value(found, "ttc_tokens_total", kind="cached", model="fake-model", strategy="mcts") == \
        usage.prompt_tokens_details.cached_tokens > 0
    assert value(found, "ttc_tokens_total", kind="prompt", model="fake-model", strategy="mcts") == usage.prompt_tokens


def test_budget_exhaustion_is_counted(fake: FakeBackend) -> None:
    with ProxyServer(fake_config(fake)) as server, sync_client(server) as client:
        completion = client.chat.completions.create(
            model="sc:n=4-fake-model", messages=user(), extra_body={"ttc": {"budget": {"max_calls": 1}}}, seed=1)
        assert completion.model_extra["ttc"]["budget_exhausted"] is True
        found = samples(server)
    assert value(found, "ttc_budget_exhausted_total", strategy="sc") == 1


def test_metrics_need_the_proxy_key_when_keys_are_configured(fake: FakeBackend) -> None:
    config = fake_config(fake, server={"api_keys": ["sk-metrics"]})
    with ProxyServer(config) as server:
        assert_openai_error(httpx.get(server.url + "/metrics"), 401)
        found = samples(server, {"authorization": "Bearer sk-metrics"})
    assert value(found, "ttc_requests_total", endpoint="/metrics", model="-", strategy="-", status="401") == 1


def test_metrics_can_be_switched_off(fake: FakeBackend) -> None:
    with ProxyServer(fake_config(fake, telemetry={"metrics": False})) as server:
        response = httpx.get(server.url + "/metrics")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "metrics_off"


def test_a_client_that_leaves_mid_stream_is_counted(fake: FakeBackend) -> None:
    fake.reset(lambda body: FakeReply(texts=["one two three four five six seven eight"], chunk_delay=0.3))
    with ProxyServer(fake_config(fake)) as server:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                          json={"model": "fake-model", "messages": user(), "stream": True}) as response:
            for line in response.iter_lines():
                if '"content": "one"' in line:
                    break  # leaves with the rest of the stream unread
        wait_until(lambda: value(samples(server), "ttc_client_disconnects_total", endpoint="/v1/chat/completions",
                                 strategy="none") == 1, timeout=10, interval=0.1)
        found = samples(server)
    assert value(found, "ttc_requests_total", endpoint="/v1/chat/completions", model="fake-model", strategy="none",
                 status="499") == 1
    assert value(found, "ttc_time_to_first_token_seconds_count", model="fake-model", strategy="none") == 1
