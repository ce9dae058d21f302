"""The middleware that watches every HTTP request for the metrics and the request's OpenTelemetry span.

It reads what the handlers set (`request_labels`: the bounded model and strategy labels, the strategy runs) and
what went out: the status, when the first chunk carrying text left (streams), and the usage the response told its
client. A response that started and never ended is a client that left (499).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import CLIENT_CLOSED
from .metrics import FinishedRequest, ProxyMetrics, RequestLabels, usage_tokens
from .scope_slots import scope_slot
from .telemetry import Telemetry

_SCOPE_KEY = "request_labels"
_MAX_SNIFFED_BODY = 1 << 20  # a JSON reply's usage is read only from replies this small
# "content" or "reasoning_content" with a non-empty string value (engines put a space after the colon, or not)
_TEXT_FIELD = re.compile(rb'content":\s*"[^"]')
_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}


def request_labels(scope: Scope) -> RequestLabels:
    """The request's labels (made by the middleware; a detached one where there is none)."""
    return scope_slot(scope, _SCOPE_KEY, RequestLabels)


def carries_text(chunk: bytes) -> bool:
    """A stream chunk with a non-empty content or reasoning_content delta (an empty role chunk is not a token)."""
    return _TEXT_FIELD.search(chunk) is not None


class ObservingMiddleware:
    """Counts and times every HTTP request (metrics) and wraps it in a span (telemetry); either may be off."""

    def __init__(self, app: ASGIApp, metrics: ProxyMetrics | None, telemetry: Telemetry | None) -> None:
        self.app = app
        self.metrics = metrics
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        labels = request_labels(scope)
        path = scope.get("path", "")
        span = None
        if self.telemetry is not None:
            span = self.telemetry.request_started(Headers(scope=scope), scope.get("method", ""), path)
        status: int | None = None
        stream = False
        ended = False
        first_token: float | None = None
        body = bytearray()
        usage_line = b""

        async def watched_send(message: Message) -> None:
            nonlocal status, stream, ended, first_token, usage_line
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"content-type":
                        stream = value.startswith(b"text/event-stream")
            elif kind == "http.response.body":
                chunk = message.get("body", b"")
                if stream:
                    if first_token is None and carries_text(chunk):
                        first_token = time.perf_counter() - started
                    if b'"usage"' in chunk:
                        usage_line = chunk
                elif len(body) + len(chunk) <= _MAX_SNIFFED_BODY:
                    body.extend(chunk)
                ended = ended or not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            final = 500 if status is None else status if ended else CLIENT_CLOSED
            finished = FinishedRequest(path=path, status=final, seconds=time.perf_counter() - started,
                                       first_token_seconds=first_token,
                                       usage=_usage(usage_line if stream else bytes(body), stream))
            if self.metrics is not None:
                self.metrics.request_finished(labels, finished)
            if span is not None:
                assert self.telemetry is not None
                tokens = usage_tokens(finished.usage) if finished.usage is not None else None
                for run in labels.runs:
                    tokens = run.observations().get("tokens") or tokens
                self.telemetry.request_finished(*span, status=final, model=labels.client_model,
                                                strategy=labels.composition, operation=_OPERATIONS.get(path),
                                                tokens=tokens)


_DECODER = json.JSONDecoder()


def _usage(data: bytes, stream: bool) -> Mapping[str, Any] | None:
    """The usage object of a JSON reply, or of the stream chunk that carried it: only the object after the last
    `"usage":` is decoded, not the whole reply."""
    at = data.rfind(b'"usage"')
    if at < 0 or not (stream or data.startswith(b"{")):
        return None
    colon = data.find(b":", at + 7)
    if colon < 0:
        return None
    try:
        text = data[colon + 1:colon + 1 + 4096].decode("utf-8", "replace")
        usage, _ = _DECODER.raw_decode(text.lstrip())
    except (ValueError, RecursionError):
        return None
    return usage if isinstance(usage, dict) else None
