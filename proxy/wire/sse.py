"""Server-sent events as the spec frames them: lines end in \\r\\n, \\n or \\r, and a blank line ends an event.

Engines mostly send \\n\\n; one that sends \\r\\n\\r\\n (or \\r\\r) is read event by event all the same, not buffered
to the end of its stream.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import BackendInvalidResponse, BackendUnreachable

_LINE_END = re.compile(rb"\r\n|\r|\n")
DONE = b"[DONE]"


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The lines of a byte stream, without their endings; an unterminated last line comes last."""
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        start = 0
        for match in _LINE_END.finditer(buffer):
            if match.group() == b"\r" and match.end() == len(buffer):
                break  # maybe the first half of a \r\n split between chunks: wait for the next one
            yield buffer[start:match.start()]
            start = match.end()
        buffer = buffer[start:]
    if buffer:
        yield buffer.rstrip(b"\r")


async def sse_events(chunks: AsyncIterator[bytes], source: str) -> AsyncIterator[list[bytes]]:
    """Each event's lines, as soon as the blank line ending it arrives.

    A stream that ends inside an event lost it (the spec drops an unfinished event): BackendUnreachable naming
    `source`, unless all that is unfinished is the `data: [DONE]` terminator."""
    lines: list[bytes] = []
    async for line in sse_lines(chunks):
        if line:
            lines.append(line)
        elif lines:
            yield lines
            lines = []
    if lines:
        if event_data(lines) == DONE:
            yield lines
            return
        raise BackendUnreachable(f"backend {source} ended its stream in the middle of an event "
                                 f"({sum(len(line) for line in lines)} bytes of it)")


def event_data(lines: list[bytes]) -> bytes | None:
    """An event's data (its `data:` lines joined by newlines), None if it has none (a comment, a keep-alive)."""
    data = [line[6:] if line.startswith(b"data: ") else line[5:] for line in lines if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


async def relay_events(chunks: AsyncIterator[bytes], source: str,
                       rewrite: Callable[[dict[str, Any]], bytes] | None = None,
                       scrub_error: Callable[[bytes], bytes] | None = None,
                       flush: Callable[[], bytes | None] | None = None) -> AsyncIterator[bytes]:
    """A backend's stream passed on event by event, framed with \\n\\n; `rewrite` makes each parsed chunk's new
    data (None: the engine's bytes go on as they came), and `flush` may add one last chunk's data at the end.

    Every data event must be a JSON object with `choices` (or an `error`): anything else is BackendInvalidResponse.
    It always ends with `data: [DONE]` (an engine that ends without one, as transformers serve does, gets one); a
    stream cut inside an event raises BackendUnreachable. Both reach the client as an error event."""
    done = False
    async for lines in sse_events(chunks, source):  # read to the end, so the connection can be reused
        data = event_data(lines)
        if done:
            continue
        if data == DONE:
            done = True
            last = flush() if flush is not None else None
            if last is not None:
                yield b"data: " + last + b"\n\n"
            yield b"data: [DONE]\n\n"
        elif data is None:  # a comment (a keep-alive)
            yield b"\n".join(lines) + b"\n\n"
        else:
            try:
                chunk = parse_chunk(data, source)
            except BackendInvalidResponse as exc:  # it quotes the event
                if scrub_error is not None:
                    exc.message = scrub_error(exc.message.encode()).decode("utf-8", "replace")
                raise
            out = rewrite(chunk) if rewrite is not None else data
            if scrub_error is not None and "error" in chunk:  # an engine's error may quote what it was sent
                out = scrub_error(out)
            # data sent over several `data:` lines is joined by newlines: each line goes out as one again
            yield b"data: " + out.replace(b"\n", b"\ndata: ") + b"\n\n"
    if not done:
        last = flush() if flush is not None else None
        if last is not None:
            yield b"data: " + last + b"\n\n"
        yield b"data: [DONE]\n\n"


def parse_chunk(data: bytes, source: str) -> dict[str, Any]:
    """A streamed event's data as a chat or completion chunk: a JSON object with `choices`, `usage` (a last chunk)
    or `error`; anything else is BackendInvalidResponse naming `source`."""
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        chunk = None
    if not isinstance(chunk, dict) or not (isinstance(chunk.get("choices"), list) or "usage" in chunk
                                           or "error" in chunk):
        raise BackendInvalidResponse(f"backend {source} sent a stream event that is not a chat or completion chunk: "
                                     f"{data[:200]!r}")
    return chunk
