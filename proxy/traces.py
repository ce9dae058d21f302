"""A record of every backend call a strategy run made, as a tree, kept in a bounded in-memory store."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Any


_RESERVED = frozenset({"id", "parent", "label", "kind"})


class Trace:
    def __init__(self, root_label: str) -> None:
        self.id = f"trace-{uuid.uuid4().hex[:16]}"
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


class TraceStore:
    """Keeps the most recent `capacity` traces; older ones are dropped first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._traces: OrderedDict[str, Trace] = OrderedDict()

    def add(self, trace: Trace) -> None:
        self._traces[trace.id] = trace
        while len(self._traces) > self.capacity:
            self._traces.popitem(last=False)

    def get(self, trace_id: str) -> Trace | None:
        return self._traces.get(trace_id)
