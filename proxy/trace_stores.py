"""The configured trace store, open for the app's lifetime: in memory (traces.py) or Redis (trace_store_redis.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .config import ServerSettings
from .trace_store_redis import RedisTraceStore
from .traces import MemoryTraceStore, TraceStore


@asynccontextmanager
async def open_trace_store(settings: ServerSettings) -> AsyncIterator[TraceStore]:
    """The configured store, open for the app's lifetime: `server.trace_store` is `memory` or a Redis URL."""
    if settings.trace_store == "memory":
        yield MemoryTraceStore(settings.trace_store_size, max_total_bytes=settings.trace_store_bytes,
                               max_trace_bytes=settings.trace_max_bytes, ttl_seconds=settings.trace_ttl_seconds)
        return
    store = RedisTraceStore(settings.trace_store, max_trace_bytes=settings.trace_max_bytes,
                            ttl_seconds=settings.trace_ttl_seconds)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()
