"""One structured line per request on the `ttc_proxy.access` logger (INFO), written when the response has ended
(a stream: when its last byte went out, or when its client left: status 499, nginx's "client closed request").

Fields: request_id, key_id (a digest of the proxy key the request carried, never the key), method, path, model,
strategy, status, duration_ms, backend_calls, prompt_tokens, completion_tokens. The HTTP layer fills in the model;
whatever ran for the request (a strategy run, a pass-through) adds its own fields through `Accounted`; tokens not
reported that way are the usage the response itself told the client, if it did.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import CLIENT_CLOSED
from .scope_slots import scope_slot

ACCESS_LOGGER = "ttc_proxy.access"
_SCOPE_KEY = "access_record"
_MAX_TEXT = 200  # a model name or a strategy's parameters are the client's: at most this much is logged
_MAX_SNIFFED_BODY = 1 << 20  # a JSON reply's usage is read only from replies this small


class Accounted(Protocol):
    """Anything that did work for a request and can say what, as access-log fields (e.g. strategy, backend_calls,
    prompt_tokens, completion_tokens)."""

    def access_fields(self) -> Mapping[str, Any]: ...


@dataclass
class AccessRecord:
    """What the handlers tell the access log about their request."""

    model: str | None = None
    sources: list[Accounted] = field(default_factory=list)


def access_record(scope: Scope) -> AccessRecord:
    """The request's record (made by the middleware; a detached one where there is none)."""
    return scope_slot(scope, _SCOPE_KEY, AccessRecord)


@dataclass
class EngineCalls:
    """Calls a request sent to an engine as they were (pass-through), counted as they are tried."""

    calls: int = 0

    def access_fields(self) -> Mapping[str, Any]:
        return {"backend_calls": self.calls}


class _UsageSniffer:
    """The `usage` object a response told its client (a JSON reply's, or a stream's last one), if any."""

    def __init__(self) -> None:
        self.stream = False
        self.body = b""
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        if not self.stream:
            if len(self.body) + len(chunk) <= _MAX_SNIFFED_BODY:
                self.body += chunk
            return
        if b'"usage"' not in chunk:
            return
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: {") and b'"usage"' in line:
                self._take(line[6:])

    def finish(self) -> None:
        if not self.stream and self.body.startswith(b"{"):
            self._take(self.body)

    def _take(self, data: bytes) -> None:
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            return
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if isinstance(usage, dict):
            self.usage = usage


class AccessLogMiddleware:
    """ASGI middleware writing the access-log line of every HTTP request. `identify` names the proxy key the request
    carries (a digest) from its headers."""

    def __init__(self, app: ASGIApp, identify: Callable[[Headers], str | None]) -> None:
        self.app = app
        self.identify = identify
        self.log = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        record = access_record(scope)
        sniffer = _UsageSniffer()
        status: int | None = None
        request_id: str | None = None
        ended = False

        async def watched_send(message: Message) -> None:
            nonlocal status, request_id, ended
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = Headers(raw=message.get("headers", []))
                request_id = headers.get("x-request-id")
                sniffer.stream = headers.get("content-type", "").startswith("text/event-stream")
            elif message["type"] == "http.response.body":
                sniffer.feed(message.get("body", b""))
                ended = ended or not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            # no response started: an unhandled error (answered 500 outside); started, never ended: the client left
            final = 500 if status is None else status if ended else CLIENT_CLOSED
            sniffer.finish()
            fields = {
                "request_id": request_id, "key_id": self.identify(Headers(scope=scope)),
                "method": scope.get("method"), "path": scope.get("path"),
                "model": record.model,
                "strategy": None, "status": final, "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "backend_calls": 0, "prompt_tokens": None, "completion_tokens": None,
            }
            if sniffer.usage is not None:
                fields["prompt_tokens"] = sniffer.usage.get("prompt_tokens")
                fields["completion_tokens"] = sniffer.usage.get("completion_tokens")
            for source in record.sources:
                fields.update(source.access_fields())
            fields = {k: v[:_MAX_TEXT] if isinstance(v, str) else v for k, v in fields.items()}
            self.log.info("%s", " ".join(f"{k}={_text(v)}" for k, v in fields.items()), extra={"access": fields})


def _text(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or any(c.isspace() or c in '"=' or not c.isprintable() for c in text):
        return json.dumps(text)
    return text


class JsonFormatter(logging.Formatter):
    """Every log record as one JSON object: time, level, logger, and an access line's fields (else its message)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            line.update(access)
        else:
            line["message"] = record.getMessage()
            if record.exc_info:
                line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """The root handler for `ttc-proxy serve`: text (the default) or JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
