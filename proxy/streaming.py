"""ASGI plumbing that notices a client leaving: the work done for it is cancelled at once."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .errors import ClientDisconnected, ProxyError

log = logging.getLogger("ttc_proxy.streaming")
T = TypeVar("T")


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work` in this task; if the client disconnects first, cancel it and raise ClientDisconnected."""
    current = asyncio.current_task()
    assert current is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        await _wait_for_disconnect(receive)
        disconnected = True
        current.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if disconnected:
            current.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


def error_event(exc: BaseException) -> bytes:
    if isinstance(exc, ProxyError):
        body: dict[str, Any] = exc.to_body()
    else:
        log.exception("stream failed", exc_info=exc)
        body = {"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                          "param": None, "code": "internal_error"}}
    return b"data: " + json.dumps(body).encode() + b"\n\ndata: [DONE]\n\n"


class EventStreamResponse(Response):
    """Server-sent events from an async iterator of bytes.

    A disconnect is watched for the whole time (not only when a write fails), so a silent strategy run is
    cancelled as soon as its client leaves. An error after the stream started is sent as an error event.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        headers: dict[str, str],
        on_close: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.chunks = chunks
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")] + [
            (k.lower().encode(), v.encode()) for k, v in headers.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.create_task(self._pump(send))
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            pump.cancel()
            watcher.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                await self.on_close()

    async def _pump(self, send: Send) -> None:
        try:
            async for chunk in self.chunks:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error event, never a torn stream
            await send({"type": "http.response.body", "body": error_event(exc), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
