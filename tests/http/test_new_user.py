"""What a new user tripped over (issue 17): a silent backend at start-up, 400s while a backend is down, misspelt
strategy names."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from ttc_proxy.proxy.app import ProxyState
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, fake_config, user, wait_until


def state_of(server: ProxyServer) -> ProxyState:
    return server.server.config.app.state.proxy  # type: ignore[no-any-return]


@contextmanager
def silent_backend() -> Iterator[str]:
    """A backend that takes connections (the kernel completes them from the listen backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


# ---- defect 0: a silent backend does not hold start-up; the others are served meanwhile ----

def test_a_silent_backend_does_not_block_start_up(fake):
    with silent_backend() as url:
        entries = [{"name": "stalled", "kind": "llama_cpp", "base_url": url, "models": ["stalled-model"],
                    "timeouts": {"read": 30}, "health_check": {"interval": 1}},
                   backend_entry(fake, models=["fake-model"])]
        started = time.monotonic()
        with ProxyServer(fake_config(fake, backends=entries)) as server:
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
            assert time.monotonic() - started < 5
            response = chat(server, {"model": "fake-model", "messages": user()})
            assert response.status_code == 200, response.text
            for model in ("stalled-model", "sc:n=2-stalled-model"):
                response = chat(server, {"model": model, "messages": user()})
                error = assert_openai_error(response, 503, code="backend_down")
                assert "stalled" in error["message"] and "capability discovery" in error["message"]
                assert response.headers["retry-after"] == "1"
            health = httpx.get(server.url + "/health").json()["backends"]
            assert health["stalled"]["down"] is True and health["fake"]["down"] is False
            assert health["stalled"]["down_reason"].startswith("it has not answered capability discovery yet")
            assert "down_reason" not in health["fake"]


class LateEngine(ThreadingHTTPServer):
    """Answers GET /v1/models and /props (3 slots) only once `answering` is set; until then it holds each request."""

    daemon_threads = True

    def __init__(self) -> None:
        self.answering = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if not server.answering.wait(30):
                    return
                body = {"total_slots": 3} if self.path == "/props" else {
                    "object": "list", "data": [{"id": "late-model", "object": "model", "owned_by": "llamacpp"}]}
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


def test_a_backend_that_answers_discovery_late_comes_up(fake):
    """Down while it does not answer; up, with its slots learned, once it does."""
    engine = LateEngine()
    threading.Thread(target=engine.serve_forever, daemon=True).start()
    entry = {"name": "late", "kind": "llama_cpp", "base_url": engine.url, "models": ["late-model"],
             "timeouts": {"discovery": 0.3}, "health_check": {"interval": 0.2, "failures": 100}}
    try:
        with ProxyServer(fake_config(fake, backends=[entry])) as server:
            backend = state_of(server).backends["late"]
            assert backend.down and backend.scheduler.capacity == 64
            assert_openai_error(chat(server, {"model": "late-model", "messages": user()}), 503,
                                code="backend_down")
            engine.answering.set()
            wait_until(lambda: not backend.down, timeout=5)
            assert backend.scheduler.capacity == 3
    finally:
        engine.answering.set()
        engine.shutdown()
        engine.server_close()


# ---- defect 1: what cannot succeed is a 400 whatever the backend's state ----

BAD_REQUESTS = [
    ({"model": "sc:n=abc-fake-model"}, "invalid_strategy_params"),
    ({"model": "sc:k=3-fake-model"}, "invalid_strategy_params"),
    ({"model": "bon:select=best-fake-model"}, "invalid_strategy_params"),
    ({"model": "entropy:mapping=foo-fake-model"}, "invalid_strategy_params"),
    ({"model": "sc:n=1000-fake-model"}, "strategy_param_above_maximum"),
    ({"model": "sc-fake-model", "n": 2}, "unsupported_by_strategy"),
    ({"model": "sc-fake-model", "ttc": {"budget": {"max_calls": 0}}}, None),
    ({"model": "fake-model", "ttc": {"strategy": "sc", "params": {"n": "x"}}}, "invalid_strategy_params"),
    ({"model": "fake-model", "n": 1000}, None),
]


@pytest.mark.parametrize(("fields", "code"), BAD_REQUESTS, ids=[str(f) for f, _ in BAD_REQUESTS])
def test_a_bad_request_is_a_400_while_its_backend_is_down(fields, code):
    fake = FakeBackend().start_in_thread()
    entry = {**backend_entry(fake, models=["fake-model"]), "health_check": {"interval": 0.1, "failures": 1}}
    with ProxyServer(fake_config(fake, backends=[entry])) as server:
        fake.stop_thread()
        wait_until(lambda: state_of(server).backends["fake"].down, timeout=3)
        assert_openai_error(chat(server, {"model": "sc-fake-model", "messages": user()}), 503, code="backend_down")
        assert_openai_error(chat(server, {"messages": user(), **fields}), 400, code=code)


# ---- defect 5: a misspelt strategy is said to be one ----

@pytest.mark.parametrize(("model", "slug", "status"), [
    ("deep-think-fake-model", "deepthink", 404),
    ("mcst-fake-model", "mcts", 404),
    ("deepthinking-fake-model", "deepthink", 404),
    ("mcst:iterations=2-fake-model", "mcts", 400),
])
def test_a_misspelt_strategy_gets_a_did_you_mean(proxy, fake, model, slug, status):
    error = assert_openai_error(chat(proxy, {"model": model, "messages": user()}), status)
    head = model.split(":")[0].removesuffix("-fake-model")
    if status == 404:
        assert error["message"].endswith(f". `{head}` is not a strategy; did you mean `{slug}`?"), error
    else:
        assert f"but '{head}' is not a strategy; did you mean `{slug}`? valid strategies: " in error["message"]


def test_an_unknown_model_far_from_any_strategy_gets_no_hint(proxy, fake):
    error = assert_openai_error(chat(proxy, {"model": "gpt-4o-mini", "messages": user()}), 404,
                                code="model_not_found")
    assert "did you mean" not in error["message"]


# ---- defect 2: a stalled run says so while it streams ----

def _streamed_progress(server: ProxyServer, body: dict) -> list[tuple[float, str]]:
    """(seconds since the request, line) for each progress line of a streamed strategy request."""
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200
        for raw in response.iter_lines():
            if raw.startswith("data: {"):
                for choice in json.loads(raw[6:]).get("choices", ()):  # an error event has none
                    text = choice["delta"].get("reasoning_content")
                    if text:
                        lines.extend((time.monotonic() - started, line) for line in text.splitlines())
    return lines


def test_a_stalled_call_is_said_while_streaming_and_so_is_the_budget_running_out(fake):
    fake.script = lambda body: FakeReply(delay=20) if body.get("seed") == 2 else FakeReply(texts=["42"])
    settings = {"strategies": {"slow_call_seconds": 0.5, "budget": {"max_seconds": 2.5}}}
    with ProxyServer(fake_config(fake, **settings)) as server:
        lines = _streamed_progress(server, {"model": "sc:n=2-fake-model", "messages": user(), "seed": 1})
    print(*lines, sep="\n")
    waiting = [(at, line) for at, line in lines if line.startswith("waiting:")]
    assert waiting, lines
    at, line = waiting[0]
    assert 0.5 <= at < 1.5, lines
    assert line == ("waiting: 1 call (sample; sent, no reply yet) for 0.5 s or more; backend fake up, 1 of 4 calls "
                    "in flight, 0 queued"), line
    assert [line for _, line in waiting[1:3]] == [line.replace("0.5 s", "1 s"), line.replace("0.5 s", "2 s")]
    assert lines[-1][1] == "budget exhausted (wall-time budget of 2.5 s is spent): answering with the best so far"
    assert lines[-1][0] < 4


def test_a_run_whose_calls_answer_in_time_says_nothing_of_waiting(proxy, fake):
    fake.script = lambda body: FakeReply(texts=["42"], delay=0.05)
    lines = _streamed_progress(proxy, {"model": "sc:n=2-fake-model", "messages": user(), "seed": 1})
    assert lines and not [line for _, line in lines if line.startswith(("waiting", "budget"))], lines


def test_calls_waiting_together_are_one_line_per_backend(fake):
    """Eight calls of one bon stalled at once: one line saying how many, queued or sent, not eight lines."""
    fake.script = lambda body: FakeReply(delay=20)
    settings = {"strategies": {"slow_call_seconds": 0.5, "budget": {"max_seconds": 1.2}},
                "backends": [backend_entry(fake, max_in_flight=3)]}
    with ProxyServer(fake_config(fake, **settings)) as server:
        lines = _streamed_progress(server, {"model": "bon:n=5-fake-model", "messages": user(), "seed": 1})
    waiting = [line for _, line in lines if line.startswith("waiting:")]
    assert waiting[0] == ("waiting: 5 calls (sample; 2 queued for a slot, 3 sent) for 0.5 s or more; backend fake "
                          "up, 3 of 3 calls in flight, 2 queued"), lines
    assert waiting[1:] == [waiting[0].replace("0.5 s", "1 s")], lines
