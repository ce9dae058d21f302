"""Prometheus metrics (`GET /metrics`): what the proxy served, what it asked of its backends, what strategies did.

Every label is bounded: a model is one some backend serves, `-` for a request refused before one was known; a
strategy is the chain of registered slugs that ran (`bon>cot`), `none` for pass-through, `-` before one was known; an
endpoint is one of the proxy's routes, else `other`. What a client sends never becomes a series of its own.

With `ttc-proxy serve --workers N` each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR (set by the
parent before the workers start: prometheus-client's multiprocess mode), and whichever worker answers a scrape
sums them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .errors import CLIENT_CLOSED

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
TOKEN_KINDS = ("prompt", "cached", "completion", "reasoning")
ENDPOINTS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/openapi.json",
    "/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize", "/ui",
})
# Request durations: a pass-through answers in milliseconds, a strategy run in seconds to minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
UNKNOWN = "-"
OTHER = "other"
PASS_THROUGH = "none"


class RunReport(Protocol):
    """What a strategy run tells the metrics once it has ended (proxy/runs/run.py's StrategyRun)."""

    def observations(self) -> Mapping[str, Any]:
        """{"tokens": {kind: n}, "budget_exhausted": bool, "events": {name: count}}"""


@dataclass
class RequestLabels:
    """The bounded labels of one request, filled in by the HTTP layer as it learns them."""

    model: str = UNKNOWN
    strategy: str = UNKNOWN
    runs: list[RunReport] = field(default_factory=list)
    # For the request's span (not labels: unbounded): the model string the client sent, the composition that ran.
    client_model: str | None = None
    composition: str | None = None


@dataclass(frozen=True)
class FinishedRequest:
    """One request as the metrics see it once its response has ended."""

    path: str
    status: int
    seconds: float
    first_token_seconds: float | None  # streams only: until the first chunk carrying text
    usage: Mapping[str, Any] | None  # the usage the response told the client, if it did


class ProxyMetrics:
    """The proxy's metrics, in a registry of its own (one per app: tests run several apps in one process)."""

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ttc_requests", "HTTP requests answered, by endpoint, model, strategy and status",
                                ["endpoint", "model", "strategy", "status"], registry=r)
        self.duration = Histogram("ttc_request_duration_seconds", "Time from request to the end of its response",
                                  ["endpoint", "model", "strategy"], buckets=DURATION_BUCKETS, registry=r)
        self.first_token = Histogram("ttc_time_to_first_token_seconds",
                                     "Streams: time from request to the first chunk carrying text",
                                     ["model", "strategy"], buckets=DURATION_BUCKETS, registry=r)
        self.backend_calls = Counter("ttc_backend_calls", "Calls sent to backends, by backend, kind and status",
                                     ["backend", "kind", "status"], registry=r)
        self.backend_duration = Histogram("ttc_backend_call_duration_seconds",
                                          "Time a backend call took, from its slot to its last byte",
                                          ["backend", "kind"], buckets=DURATION_BUCKETS, registry=r)
        self.tokens = Counter("ttc_tokens", "Tokens by kind (prompt, cached, completion, reasoning)",
                              ["kind", "model", "strategy"], registry=r)
        self.in_flight = Gauge("ttc_backend_in_flight", "Calls in flight per backend", ["backend"], registry=r,
                               multiprocess_mode="livesum")
        self.queued = Gauge("ttc_backend_queued", "Calls waiting for a backend slot", ["backend"], registry=r,
                            multiprocess_mode="livesum")
        self.budget_exhausted = Counter("ttc_budget_exhausted", "Strategy runs that ran out of budget",
                                        ["strategy"], registry=r)
        self.disconnects = Counter("ttc_client_disconnects", "Requests whose client left before the response ended",
                                   ["endpoint", "strategy"], registry=r)
        self.strategy_events = Counter("ttc_strategy_events",
                                       "What strategies report through their context (mcts nodes, entropy "
                                       "interventions, deepconf traces cut, ...)", ["strategy", "event"], registry=r)
        # Labelled children by label values: looked up once per series (labels are bounded), not per request.
        self._request_series: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        self._backend_series: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._load_series: dict[str, tuple[Any, Any]] = {}
        self._token_series: dict[tuple[str, str, str], Any] = {}

    # ---- labels ----

    @staticmethod
    def endpoint_label(path: str) -> str:
        return path if path in ENDPOINTS else OTHER

    # ---- what the HTTP layer and the backends report ----

    def request_finished(self, labels: RequestLabels, request: FinishedRequest) -> None:
        endpoint = self.endpoint_label(request.path)
        model, strategy = labels.model, labels.strategy
        key = (endpoint, model, strategy, request.status)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = (self.requests.labels(endpoint, model, strategy, str(request.status)),
                                                  self.duration.labels(endpoint, model, strategy))
        series[0].inc()
        series[1].observe(request.seconds)
        if request.first_token_seconds is not None:
            self.first_token.labels(model, strategy).observe(request.first_token_seconds)
        if request.status == CLIENT_CLOSED:
            self.disconnects.labels(endpoint, strategy).inc()
        tokens = usage_tokens(request.usage) if request.usage is not None else {}
        for run in labels.runs:
            observed = run.observations()
            tokens = observed.get("tokens") or tokens
            if observed.get("budget_exhausted"):
                self.budget_exhausted.labels(strategy).inc()
            for event, count in (observed.get("events") or {}).items():
                self.strategy_events.labels(strategy, event).inc(count)
        for kind, count in tokens.items():
            if count:
                token_key = (kind, model, strategy)
                counter = self._token_series.get(token_key)
                if counter is None:
                    counter = self._token_series[token_key] = self.tokens.labels(kind, model, strategy)
                counter.inc(count)

    def backend_call(self, backend: str, kind: str, status: str, seconds: float) -> None:
        key = (backend, kind, status)
        series = self._backend_series.get(key)
        if series is None:
            series = self._backend_series[key] = (self.backend_calls.labels(backend, kind, status),
                                                  self.backend_duration.labels(backend, kind))
        series[0].inc()
        series[1].observe(seconds)

    def backend_load(self, backend: str, in_flight: int, queued: int) -> None:
        series = self._load_series.get(backend)
        if series is None:
            series = self._load_series[backend] = (self.in_flight.labels(backend), self.queued.labels(backend))
        series[0].set(in_flight)
        series[1].set(queued)

    # ---- exposition ----

    def exposition(self) -> tuple[bytes, str]:
        """The text a scrape gets, and its content type: every worker's values in multiprocess mode."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def usage_tokens(usage: Mapping[str, Any]) -> dict[str, int]:
    """An OpenAI usage object's tokens by kind."""

    def count(value: Any) -> int:
        return value if isinstance(value, int) and value > 0 else 0

    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    return {
        "prompt": count(usage.get("prompt_tokens")),
        "cached": count(prompt.get("cached_tokens")) if isinstance(prompt, dict) else 0,
        "completion": count(usage.get("completion_tokens")),
        "reasoning": count(completion.get("reasoning_tokens")) if isinstance(completion, dict) else 0,
    }
