"""A record of every backend call a strategy run made, as a tree, and the stores that keep them.

A store keeps snapshots: JSON bytes, each bounded (`server.trace_max_bytes`), taken when a run starts and when it
ends. Each is saved with its owner, the id of the proxy key that made it; a trace is read only with that key (for
anyone else it is absent). Two stores: in memory (the default; bounded in count, bytes and age) and Redis
(`server.trace_store: redis://…`, proxy/trace_store_redis.py), which several proxy processes share;
proxy/trace_stores.py opens the configured one.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ProxyError

log = logging.getLogger("ttc_proxy.traces")

_RESERVED = frozenset({"id", "parent", "label", "kind"})


class Trace:
    def __init__(self, root_label: str, owner: str | None = None) -> None:
        self.id = f"trace-{uuid.uuid4().hex[:16]}"
        self.owner = owner  # the id of the proxy key that made it (never the key); None without keys
        self.started = time.time()
        self.nodes: list[dict[str, Any]] = [{"id": 0, "parent": None, "label": root_label, "kind": "run"}]

    def add(self, parent: int, label: str, kind: str, /, **attrs: Any) -> int:
        reserved = _RESERVED & set(attrs)
        if reserved:
            raise ValueError(f"trace attributes {sorted(reserved)} are reserved for the tree itself")
        node_id = len(self.nodes)
        self.nodes.append({"id": node_id, "parent": parent, "label": label, "kind": kind, **attrs})
        return node_id

    def update(self, node_id: int, **attrs: Any) -> None:
        self.nodes[node_id].update(attrs)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "ttc.trace", "created": int(self.started), "nodes": self.nodes}

    def encode(self, max_bytes: int) -> bytes:
        """The trace as JSON of at most `max_bytes` bytes: the nodes that fit, in order, and the root marked with
        how many were dropped (a strategy fanning out n samples of 2,000 characters can grow one without limit)."""
        nodes = [_json(node) for node in self.nodes]
        head = _json({"id": self.id, "object": "ttc.trace", "created": int(self.started)})
        envelope = len(head) + len(b',"nodes":[]')
        size = envelope + sum(len(n) for n in nodes) + len(nodes) - 1
        if size > max_bytes:
            kept, dropped = _fit(nodes, self.nodes[0], max_bytes - envelope)
            nodes = kept
            log.debug("trace %s is %d bytes; kept %d nodes, dropped %d", self.id, size, len(kept), dropped)
        return head[:-1] + b',"nodes":[' + b",".join(nodes) + b"]}"


def _fit(nodes: list[bytes], root: dict[str, Any], room: int) -> tuple[list[bytes], int]:
    """The encoded nodes that fit in `room` bytes, in order, the root first and marked truncated with the count
    dropped. A root too big by itself keeps only its tree fields and status."""
    first = _json({**root, "truncated": True, "nodes_dropped": len(nodes) - 1})  # the marker at its widest
    if len(first) > room:
        bare = {k: root[k] for k in ("id", "parent", "label", "kind", "status") if k in root}
        return [_json({**bare, "truncated": True, "nodes_dropped": len(nodes) - 1})], len(nodes) - 1
    used = len(first)
    count = 1
    while count < len(nodes) and used + 1 + len(nodes[count]) <= room:
        used += 1 + len(nodes[count])
        count += 1
    dropped = len(nodes) - count
    return [_json({**root, "truncated": True, "nodes_dropped": dropped}), *nodes[1:count]], dropped


def _json(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str).encode()
    except ValueError:  # JSON has no NaN or infinity; a trace may hold them (an engine's -inf logprob)
        return json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=False, default=str).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class TraceStoreUnavailable(ProxyError):
    """The shared trace store cannot be reached."""

    status_code = 503
    error_type = "server_error"
    code = "trace_store_unavailable"


class TraceStore(Protocol):
    """Where finished and running traces are kept, by id and owner."""

    async def save(self, trace: Trace) -> None:
        """Keep a snapshot of the trace as it is now; readable once this returns (a store that is slow to answer is
        waited for a bounded time, and written to when it answers). Never raises: a trace that cannot be stored is
        logged, and the run it records goes on."""

    async def get(self, trace_id: str, owner: str | None) -> bytes | None:
        """The trace's JSON, or None when there is none by that id for that owner (also: expired, evicted).
        Raises TraceStoreUnavailable when the store cannot be reached."""

    def describe(self) -> str:
        """What the store keeps, for the 404 message."""


@dataclass
class _Entry:
    owner: str | None
    body: bytes
    expires: float  # monotonic


class MemoryTraceStore:
    """This process's traces: the most recent `capacity`, together at most `max_total_bytes`, each for
    `ttl_seconds` after its last snapshot; the oldest go first."""

    def __init__(self, capacity: int, *, max_total_bytes: int = 64 * 1024 * 1024,
                 max_trace_bytes: int = 1024 * 1024, ttl_seconds: float = 3600.0) -> None:
        self.capacity = capacity
        self.max_total_bytes = max_total_bytes
        self.max_trace_bytes = min(max_trace_bytes, max_total_bytes)
        self.ttl_seconds = ttl_seconds
        self.total_bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def save(self, trace: Trace) -> None:
        self._drop(trace.id)
        body = trace.encode(self.max_trace_bytes)
        self._entries[trace.id] = _Entry(trace.owner, body, time.monotonic() + self.ttl_seconds)
        self.total_bytes += len(body)
        self._evict()

    async def get(self, trace_id: str, owner: str | None) -> bytes | None:
        self._evict()
        entry = self._entries.get(trace_id)
        return entry.body if entry is not None and entry.owner == owner else None

    def describe(self) -> str:
        return (f"this proxy process keeps the latest {self.capacity} traces, up to {self.max_total_bytes:,} bytes "
                f"in all, for {self.ttl_seconds:g} s")

    def _drop(self, trace_id: str) -> None:
        entry = self._entries.pop(trace_id, None)
        if entry is not None:
            self.total_bytes -= len(entry.body)

    def _evict(self) -> None:
        now = time.monotonic()
        # Saving moves an entry to the end, so the front is both the oldest and the first to expire.
        while self._entries and (len(self._entries) > self.capacity or self.total_bytes > self.max_total_bytes
                                 or next(iter(self._entries.values())).expires <= now):
            _, entry = self._entries.popitem(last=False)
            self.total_bytes -= len(entry.body)
