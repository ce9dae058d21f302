"""Pass-through: a request without a strategy goes to the engine as the client wrote it and the engine's answer
comes back as it was sent, byte for byte where nothing needs changing. What does change, and only where the engine
needs it:

* the model's name, where the engine wants another (`backends[].model_names`: transformers serve wants a path);
* `n` above what one call can draw (transformers serve ignores `n`, llama-server caps it at its slots): several
  calls at once, one reply with the choices numbered in order and the usage summed;
* a stop string the engine leaves in the reply (Capabilities.stop_kept): cut, as the OpenAI API does;
* a stream the engine ends without `data: [DONE]`: ended with one (proxy/sse.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ttc_proxy.strategies.framework import gather_all

from .access_log import EngineCalls
from .backends import Backend
from .backends.stops import StreamedStopCutter, cut_stops_in_chunk, cut_stops_in_reply, stop_strings
from .errors import BackendConnectFailed, ProxyError
from .wire.protocol import choice_index
from .routing import Route
from .wire.sse import DONE, event_data, parse_chunk, relay_events, sse_events
from .streaming import EventStreamResponse, until_disconnect

log = logging.getLogger("ttc_proxy.passthrough")


async def pass_through(request: Request, candidates: list[Backend], path: str, body: dict[str, Any], route: Route,
                       request_id: str, calls: EngineCalls) -> Response:
    """The request to the first backend serving its model; one that refuses the connection (the request never
    reached it) hands it to the next. `calls` counts the backend calls tried, for the access log."""
    for i, backend in enumerate(candidates):
        calls.calls += planned_calls(body.get("n"), backend.capabilities.max_n)
        try:
            return await _pass_through_to(request, backend, path, dict(body), route, request_id)
        except BackendConnectFailed:
            if i + 1 == len(candidates):
                raise
            log.warning("backend %s refused the connection; trying %s", backend.name, candidates[i + 1].name)
    raise AssertionError("no candidates")


def split_n(n: int, max_n: int) -> list[int]:
    """`n` choices as calls of at most `max_n` each."""
    return [max_n] * (n // max_n) + ([n % max_n] if n % max_n else [])


def planned_calls(n: Any, max_n: int) -> int:
    """The calls a pass-through request of `n` choices makes."""
    return len(split_n(n, max_n)) if isinstance(n, int) and n > max_n else 1


def part_bodies(body: dict[str, Any], parts: list[int]) -> list[dict[str, Any]]:
    """One body per call; a seeded request's calls get seeds of their own (the same seed would repeat samples)."""
    bodies = []
    for i, part in enumerate(parts):
        one = {k: v for k, v in body.items() if k != "n"}
        if part > 1:
            one["n"] = part
        if isinstance(body.get("seed"), int) and i:
            one["seed"] = body["seed"] + i
        bodies.append(one)
    return bodies


async def _pass_through_to(request: Request, backend: Backend, path: str, body: dict[str, Any], route: Route,
                           request_id: str) -> Response:
    client_model = body["model"]
    body["model"] = backend.engine_model(route.model)
    renamed = client_model if client_model != body["model"] else None
    stops = stop_strings(body) if backend.capabilities.stop_kept else []
    n = body.get("n")
    max_n = backend.capabilities.max_n
    if isinstance(n, int) and n > max_n:
        return await _fan_out(request, backend, path, body, split_n(n, max_n), client_model, stops, request_id)
    content = json.dumps(body).encode()
    cost = n if isinstance(n, int) and n > 0 else 1
    if body.get("stream"):
        call = backend.stream(path, body, owner=request_id, cost=cost, request_id=request_id, content=content)
        response = await until_disconnect(request.receive, call.__aenter__())
        rewrite = _StreamRewrite(renamed, stops) if renamed is not None or stops else None
        return EventStreamResponse(  # type: ignore[return-value]
            relay_events(response.aiter_raw(), backend.name, rewrite, backend.without_key,
                         rewrite.flush if rewrite is not None else None),
            {"x-request-id": request_id},
            on_close=lambda: call.__aexit__(None, None, None),
        )
    response, payload = await until_disconnect(
        request.receive, backend.call(path, body, owner=request_id, cost=cost, request_id=request_id, content=content)
    )
    if response.status_code == 200:
        reply = backend.completion_reply(payload)  # a 200 the client could not parse is the backend's error
        if stops or renamed is not None:  # else the engine's bytes go back as they came
            if stops:
                cut_stops_in_reply(reply, stops)
            if renamed is not None and "model" in reply:
                reply["model"] = renamed
            payload = json.dumps(reply, separators=(",", ":")).encode()
    return Response(payload, status_code=response.status_code,
                    media_type=response.headers.get("content-type", "application/json"),
                    headers={"x-request-id": request_id})


class _StreamRewrite:
    """Each streamed chunk with the client's model name and stop strings cut, and at the end what the cut held
    back of a choice that never finished."""

    def __init__(self, renamed: str | None, stops: list[str]) -> None:
        self.renamed = renamed
        self.cutter = StreamedStopCutter(stops) if stops else None
        self.last: dict[str, Any] = {}

    def __call__(self, chunk: dict[str, Any]) -> bytes:
        if self.cutter is not None:
            cut_stops_in_chunk(chunk, self.cutter)
            self.last = chunk
        if self.renamed is not None and "model" in chunk:
            chunk["model"] = self.renamed
        return json.dumps(chunk, separators=(",", ":")).encode()

    def flush(self) -> bytes | None:
        held = self.cutter.held_back_chunk(self.last) if self.cutter is not None else None
        return json.dumps(held, separators=(",", ":")).encode() if held is not None else None


# ---- n above what one call draws ----

def _merge_replies(replies: list[dict[str, Any]], model: str) -> dict[str, Any]:
    merged = dict(replies[0], model=model)
    choices: list[Any] = []
    for reply in replies:
        for choice in sorted((c for c in reply.get("choices") or () if isinstance(c, dict)),
                             key=choice_index):
            choices.append(dict(choice, index=len(choices)))
    merged["choices"] = choices
    usages = [r["usage"] for r in replies if isinstance(r.get("usage"), dict)]
    if usages:
        merged["usage"] = _sum_usage(usages)
    return merged


def _sum_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """Every call processed the prompt: the sums are what was spent."""
    total: dict[str, Any] = {}
    for usage in usages:
        for key, value in usage.items():
            if isinstance(value, int) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
            elif isinstance(value, dict):
                total[key] = _sum_usage([total.get(key) or {}, value])
    return total


async def _fan_out(request: Request, backend: Backend, path: str, body: dict[str, Any], parts: list[int],
                   client_model: str, stops: list[str], request_id: str) -> Response:
    bodies = part_bodies(body, parts)
    if body.get("stream"):
        merged = _MergedStreams(backend, path, bodies, client_model, stops, request_id)
        try:  # the first call's refusal is the client's answer, with its status; a later one is an error event
            await until_disconnect(request.receive, merged.first_open)
        except BaseException:
            await merged.close()
            raise
        return EventStreamResponse(merged.events(), {"x-request-id": request_id},  # type: ignore[return-value]
                                   on_close=merged.close)

    async def one(part: dict[str, Any]) -> tuple[int, bytes]:
        response, payload = await backend.call(path, part, owner=request_id, cost=part.get("n", 1),
                                               request_id=request_id)
        return response.status_code, payload

    answers = await until_disconnect(request.receive, gather_all(one(part) for part in bodies))
    replies = []
    for status, payload in answers:
        if status != 200:
            return Response(payload, status_code=status, media_type="application/json",
                            headers={"x-request-id": request_id})
        reply = backend.completion_reply(payload)
        if stops:
            cut_stops_in_reply(reply, stops)
        replies.append(reply)
    return Response(json.dumps(_merge_replies(replies, client_model), separators=(",", ":")).encode(),
                    media_type="application/json", headers={"x-request-id": request_id})


class _MergedStreams:
    """The calls' streams as one: chunks as they come, choices renumbered after the calls before, one id, usage
    summed into a last chunk, one [DONE]. Each call is opened and read to its end by a task of its own (so one
    holding scheduler slots never waits for the client or for another call); a call that breaks off ends the
    stream with an error event."""

    def __init__(self, backend: Backend, path: str, bodies: list[dict[str, Any]], client_model: str,
                 stops: list[str], request_id: str) -> None:
        self.backend, self.client_model = backend, client_model
        self.offsets = [sum(b.get("n", 1) for b in bodies[:i]) for i in range(len(bodies))]
        self.cutter = StreamedStopCutter(stops) if stops else None
        self.queue: asyncio.Queue[tuple[int, dict[str, Any] | Exception | None]] = asyncio.Queue()
        self.first_open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.readers = [asyncio.create_task(self._read(i, path, body, request_id)) for i, body in enumerate(bodies)]

    async def _read(self, part: int, path: str, body: dict[str, Any], request_id: str) -> None:
        try:
            async with self.backend.stream(path, body, owner=request_id, cost=body.get("n", 1),
                                           request_id=request_id) as response:
                if part == 0 and not self.first_open.done():  # (cancelled: the client left while it opened)
                    self.first_open.set_result(None)
                async for lines in sse_events(response.aiter_raw(), self.backend.name):
                    data = event_data(lines)
                    if data is None or data == DONE:
                        continue
                    self.queue.put_nowait((part, parse_chunk(data, self.backend.name)))
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits: the opening, or the merging loop
            if isinstance(exc, ProxyError):
                exc = self.backend.without_key_error(exc)  # an invalid event is quoted
            if part == 0 and not self.first_open.done():
                self.first_open.set_exception(exc)
            else:
                self.queue.put_nowait((part, exc))
        finally:
            self.queue.put_nowait((part, None))

    async def close(self) -> None:
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        if self.first_open.done() and not self.first_open.cancelled():
            self.first_open.exception()  # retrieved: it was raised to the client already

    async def events(self) -> AsyncIterator[bytes]:
        usages: list[dict[str, Any]] = []
        first: dict[str, Any] = {}
        open_parts = len(self.readers)
        try:
            while open_parts:
                part, item = await self.queue.get()
                if item is None:
                    open_parts -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                chunk = item
                if "error" in chunk:
                    yield b"data: " + self.backend.without_key(json.dumps(chunk).encode()) + b"\n\ndata: [DONE]\n\n"
                    return
                first = first or chunk
                if isinstance(chunk.get("usage"), dict):
                    usages.append(chunk.pop("usage"))
                if not chunk.get("choices"):
                    continue
                for choice in chunk["choices"]:
                    if isinstance(choice, dict):
                        choice["index"] = self.offsets[part] + choice_index(choice)
                if self.cutter is not None:
                    cut_stops_in_chunk(chunk, self.cutter)
                chunk.update(id=first.get("id", chunk.get("id")), model=self.client_model)
                yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
        finally:
            await self.close()
        held = self.cutter.held_back_chunk({**first, "model": self.client_model}) if self.cutter else None
        if held is not None:
            yield b"data: " + json.dumps(held, separators=(",", ":")).encode() + b"\n\n"
        if usages:
            last = {k: first[k] for k in ("id", "object", "created", "system_fingerprint") if k in first}
            last.update(model=self.client_model, choices=[], usage=_sum_usage(usages))
            yield b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
