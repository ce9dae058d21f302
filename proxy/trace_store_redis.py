"""The trace store several proxy processes share: Redis (`server.trace_store: redis://host:port/db`).

Each trace is one key, `ttc:trace:<id>`, holding its owner as JSON, a newline, and the trace's JSON; set with an expiry
(`server.trace_ttl_seconds`) and bounded in bytes like the in-memory store's. Snapshots go through one writer
task in the order they were taken, so a run's final snapshot is never overwritten by its first one, and a write
finishes even when the request that asked for it was cancelled.
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as redis
from redis.exceptions import RedisError

from .traces import Trace, TraceStoreUnavailable

log = logging.getLogger("ttc_proxy.traces")

KEY_PREFIX = "ttc:trace:"
RECENT_PREFIX = "ttc:recent:"  # a sorted set per owner: its trace ids by start time (the console's list)
RECENT_KEPT = 256
_PENDING_LIMIT = 10_000  # snapshots waiting for the writer; beyond it new ones are dropped (and logged)
_Write = tuple[str, bytes, "asyncio.Future[None]", Trace]


def display_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisTraceStore:
    def __init__(self, url: str, *, max_trace_bytes: int, ttl_seconds: float, timeout_seconds: float = 5.0,
                 save_wait_seconds: float = 0.25) -> None:
        self.url = url
        # How long a save waits for its write: long enough that a trace is readable through any replica once the
        # run's response is out, short enough that a slow Redis never holds a request up for longer.
        self.save_wait_seconds = save_wait_seconds
        self.max_trace_bytes = max_trace_bytes
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.timeout_seconds = timeout_seconds
        self._client: redis.Redis = redis.from_url(url, socket_timeout=timeout_seconds,
                                                   socket_connect_timeout=timeout_seconds)
        self._pending: asyncio.Queue[_Write] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reach the server now, so a wrong URL stops the proxy at start-up rather than losing every trace."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            await self._client.aclose()
            raise TraceStoreUnavailable(f"cannot reach the trace store at {display_url(self.url)}: {exc}") from exc
        self._writer = asyncio.create_task(self._write_all(), name="trace-store-writer")
        log.info("traces are kept in Redis at %s for %g s", display_url(self.url), self.ttl_ms / 1000)

    async def aclose(self, flush_seconds: float = 5.0) -> None:
        """Write what is pending (for at most `flush_seconds`), then disconnect."""
        if self._writer is not None:
            try:
                await asyncio.wait_for(self._pending.join(), flush_seconds)
            except TimeoutError:
                log.warning("%d trace snapshots were not written before shutdown", self._pending.qsize())
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._client.aclose()

    async def save(self, trace: Trace) -> None:
        if self._pending.qsize() >= _PENDING_LIMIT:
            log.warning("trace store is %d snapshots behind; trace %s not saved", _PENDING_LIMIT, trace.id)
            return
        record = json.dumps(trace.owner).encode() + b"\n" + trace.encode(self.max_trace_bytes)
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.put_nowait((KEY_PREFIX + trace.id, record, written, trace))
        written.add_done_callback(lambda done: self._log_failure(trace.id, done))
        try:
            await asyncio.wait_for(asyncio.shield(written), self.save_wait_seconds)
        except TimeoutError:
            log.debug("trace %s: Redis slower than %g s; written when it answers", trace.id, self.save_wait_seconds)
        except (RedisError, OSError):
            pass  # logged by _log_failure

    def _log_failure(self, trace_id: str, written: asyncio.Future[None]) -> None:
        if not written.cancelled() and written.exception() is not None:
            log.warning("trace %s not saved to %s: %s", trace_id, display_url(self.url), written.exception())

    async def get(self, trace_id: str, owner: str | None) -> bytes | None:
        try:
            raw = await self._client.get(KEY_PREFIX + trace_id)
        except (RedisError, OSError) as exc:
            raise TraceStoreUnavailable(f"the trace store at {display_url(self.url)} cannot be reached: "
                                        f"{type(exc).__name__}") from exc
        if raw is None:
            return None
        stored_owner, _, body = raw.partition(b"\n")
        return body if json.loads(stored_owner) == owner else None

    async def recent(self, owner: str | None, limit: int) -> list[bytes]:
        try:
            ids = await self._client.zrevrange(RECENT_PREFIX + json.dumps(owner), 0, limit - 1)
            raws = await self._client.mget([KEY_PREFIX + i.decode() for i in ids]) if ids else []
        except (RedisError, OSError) as exc:
            raise TraceStoreUnavailable(f"the trace store at {display_url(self.url)} cannot be reached: "
                                        f"{type(exc).__name__}") from exc
        found = []
        for raw in raws:
            if raw is not None:
                stored_owner, _, body = raw.partition(b"\n")
                if json.loads(stored_owner) == owner:
                    found.append(body)
        return found

    def describe(self) -> str:
        return f"traces are kept in the shared store for {self.ttl_ms / 1000:g} s"

    async def _write_all(self) -> None:
        """The one writer: whatever is pending, in order, one pipeline per batch."""
        while True:
            batch = [await self._pending.get()]
            while not self._pending.empty():
                batch.append(self._pending.get_nowait())
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, record, _, trace in batch:
                        pipe.set(key, record, px=self.ttl_ms)
                        recent = RECENT_PREFIX + json.dumps(trace.owner)
                        pipe.zadd(recent, {trace.id: trace.started})
                        pipe.zremrangebyrank(recent, 0, -RECENT_KEPT - 1)
                        pipe.pexpire(recent, self.ttl_ms)
                    await pipe.execute()
                outcome: BaseException | None = None
            except (RedisError, OSError) as exc:
                outcome = exc
            for _, _, written, _ in batch:
                if not written.done():  # done: its saver was cancelled; the write happened all the same
                    if outcome is None:
                        written.set_result(None)
                    else:
                        written.set_exception(outcome)
                self._pending.task_done()
