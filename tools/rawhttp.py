"""A minimal raw-asyncio HTTP/1.1 keep-alive client for load generation: an asyncio.Protocol that writes request
bytes and parses the status line, headers, content-length bodies and chunked server-sent events. A full client
such as httpx would spend more CPU per request than the proxy does, on a 2-core machine."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

from .servers import HOST

CHAT_PATH = "/v1/chat/completions"


def post_bytes(port: int, body: bytes, stream: bool, headers: dict[str, str] | None = None,
               path: str = CHAT_PATH) -> bytes:
    """One POST with a JSON body, as bytes on the wire."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (f"POST {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: application/json\r\n"
            f"accept: {'text/event-stream' if stream else 'application/json'}\r\n{extra}"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


class HTTPConnection(asyncio.Protocol):
    """One keep-alive connection, one request at a time. A request resolves to (status, seconds, ttft, ok)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, float, float | None, bool]] | None = None
        self.lost: BaseException | None = None
        self._reset()

    def _reset(self) -> None:
        self.t0 = 0.0
        self.status = 0
        self.mode = "head"  # head, length, chunked, trailer
        self.remaining = 0
        self.stream = False
        self.events = bytearray()  # SSE bytes, until the first content event is found
        self.tail = b""  # the last bytes of the stream, to see its `data: [DONE]`
        self.ttft: float | None = None
        self.body = bytearray()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except Exception as exc:  # noqa: BLE001 - a malformed response fails the request, not the loop
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)

    # requests

    def request(self, data: bytes, stream: bool) -> asyncio.Future[tuple[int, float, float | None, bool]]:
        assert self.transport is not None
        if self.lost is not None:
            raise ConnectionResetError("connection is closed")
        self._reset()
        self.stream = stream
        self.waiter = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # parsing

    def _finish(self, ok: bool) -> None:
        elapsed = time.perf_counter() - self.t0
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, elapsed, self.ttft, ok))

    def _parse(self) -> None:
        buf = self.buf
        while True:
            if self.mode == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                self.status = int(lines[0].split(b" ", 2)[1])
                length = None
                chunked = False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value.strip())
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                if chunked:
                    self.mode = "chunked"
                elif length is not None:
                    self.mode, self.remaining = "length", length
                else:
                    raise ValueError("a response with neither content-length nor chunked encoding")
            elif self.mode == "length":
                if len(buf) < self.remaining:
                    return
                self.body = buf[: self.remaining]
                del buf[: self.remaining]
                self.mode = "head"
                self._finish(self.status == 200 and self._body_ok(bytes(self.body)))
                return
            elif self.mode == "chunked":
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
                if size == 0:
                    del buf[: line_end + 2]
                    self.mode = "trailer"
                    continue
                if len(buf) < line_end + 2 + size + 2:
                    return
                chunk = bytes(buf[line_end + 2: line_end + 2 + size])
                del buf[: line_end + 2 + size + 2]
                self._on_chunk(chunk)
            elif self.mode == "trailer":
                if buf[:2] == b"\r\n":
                    del buf[:2]
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    del buf[: end + 4]
                self.mode = "head"
                done = b"data: [DONE]" in self.tail
                self._finish(self.status == 200 and (done if self.stream else True) and
                             (self.ttft is not None if self.stream else True))
                return

    def _on_chunk(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk)[-64:]
        if not self.stream or self.ttft is not None:
            return
        self.events += chunk
        while True:
            end = self.events.find(b"\n\n")
            if end < 0:
                return
            event = bytes(self.events[:end]).strip()
            del self.events[: end + 2]
            if carries_content(event):
                self.ttft = time.perf_counter() - self.t0
                self.events.clear()
                return

    @staticmethod
    def _body_ok(body: bytes) -> bool:
        try:
            payload = json.loads(body)
        except ValueError:
            return False
        return isinstance(payload, dict) and bool(payload.get("choices"))


def carries_content(event: bytes) -> bool:
    """A `data:` event whose first choice has non-empty content (chat delta) or text (completions)."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            payload = json.loads(data)
        except ValueError:
            continue
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text"):
                return True
    return False


async def connect(port: int) -> HTTPConnection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(HTTPConnection, HOST, port)
    return conn


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank-with-interpolation percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize_ms(seconds: list[float]) -> dict[str, float] | None:
    if not seconds:
        return None
    values = sorted(s * 1000.0 for s in seconds)
    return {
        "count": len(values),
        "min": values[0],
        "p50": _percentile(values, 50),
        "p90": _percentile(values, 90),
        "p99": _percentile(values, 99),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }


class Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.statuses: dict[str, int] = {}
        self.bad = 0

    def add(self, status: int, seconds: float, ttft: float | None, ok: bool) -> None:
        self.latencies.append(seconds)
        if ttft is not None:
            self.ttfts.append(ttft)
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        if not ok:
            self.bad += 1

    def result(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "ok": len(self.latencies) - self.bad,
            "statuses": self.statuses,
            "latency_ms": summarize_ms(self.latencies),
            "ttft_ms": summarize_ms(self.ttfts),
        }
