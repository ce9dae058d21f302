"""`ttc-proxy trace ID`: a strategy run's trace (GET /v1/traces/{id}) as an indented tree: each node's kind and
status, its calls, tokens and time, the parameters of each run, its scores and the decision it made."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from .proxyclient import ProxyRequestFailed, add_proxy_arguments, get_json

TEXT_LIMIT = 100  # characters of an output or a value shown on one line
_CALL_FIELDS = ("endpoint", "n", "seed", "temperature", "max_tokens")
_TREE_FIELDS = frozenset({"id", "parent", "label", "kind", "status", "ms", "calls", "prompt_tokens",
                          "completion_tokens", "cached_prompt_tokens", "params", "details", "outputs", "notes",
                          "error", "answer", *_CALL_FIELDS})


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "trace", help="print a strategy run's trace as a tree",
        description="Fetches a run's trace from the proxy (GET /v1/traces/ID; the id is the response's "
                    "ttc.trace_id) and prints it as an indented tree: runs, spans and backend calls with their "
                    "status, time, calls and tokens, each run's parameters, scores and decision, each call's "
                    "output.")
    parser.add_argument("trace_id", metavar="ID", help="the trace id (ttc.trace_id of a strategy response)")
    add_proxy_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the trace as the proxy sent it")
    parser.set_defaults(handler=trace_command)
    return parser


def short(value: Any, limit: int = TEXT_LIMIT) -> str:
    text = value if isinstance(value, str) and value.strip() else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def headline(node: Mapping[str, Any]) -> str:
    """`label [kind] status, ms, calls, tokens, the call's own fields`."""
    parts = [f"{node['label']} [{node['kind']}]"]
    if "status" in node:
        parts.append(str(node["status"]))
    facts = []
    if "ms" in node:
        facts.append(f"{node['ms']:g} ms")
    if "calls" in node:
        facts.append(f"{node['calls']} call{'s' if node['calls'] != 1 else ''}")
    if "prompt_tokens" in node or "completion_tokens" in node:
        cached = f" ({node['cached_prompt_tokens']} cached)" if node.get("cached_prompt_tokens") else ""
        facts.append(f"tokens {node.get('prompt_tokens', 0)}{cached} + {node.get('completion_tokens', 0)}")
    facts += [f"{key}={_number(node[key])}" for key in _CALL_FIELDS if node.get(key) is not None]
    facts += [f"{key}={short(value, 40)}" for key, value in node.items() if key not in _TREE_FIELDS]
    return " ".join(parts) + (": " + ", ".join(facts) if facts else "")


def detail_lines(node: Mapping[str, Any]) -> list[str]:
    """What a node decided and why: parameters, the decision's scalar facts, scores, a search tree, outputs."""
    lines = []
    params = node.get("params")
    if isinstance(params, Mapping):
        set_params = {k: v for k, v in params.items() if v is not None}
        lines.append("params: " + short(", ".join(f"{k}={short(v, 30)}" for k, v in set_params.items()), 200))
    details = node.get("details") if isinstance(node.get("details"), Mapping) else {}
    scalars = {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool)) and k != "tree"}
    if scalars:
        lines.append("decision: " + ", ".join(f"{k}={short(_number(v), 40)}" for k, v in scalars.items()))
    scores = details.get("scores")
    if isinstance(scores, Mapping) and scores:
        lines.append("scores: " + short(", ".join(f"{answer} {_number(score)}" for answer, score in scores.items()),
                                        200))
    winner = details.get("winner")
    if isinstance(winner, Mapping):
        lines.append("winner: " + ", ".join(f"{k}={short(_number(v), 40)}" for k, v in winner.items()))
    for entry in details.get("tree") or ():
        if isinstance(entry, Mapping):
            where = "root" if entry.get("parent") is None else f"node {entry['parent']}"
            lines.append(f"node {entry.get('id')} ({entry.get('action')} from {where}, depth {entry.get('depth')}) "
                         f"→ {short(entry.get('answer'), 40)}, score {_number(entry.get('score'))}")
    if node.get("answer") is not None:
        lines.append(f"answer: {short(node['answer'])}")
    if node.get("error"):
        lines.append(f"error: {short(node['error'], 200)}")
    for output in node.get("outputs") or ():
        lines.append(f"→ {short(output)}")
    notes = node.get("notes")
    if isinstance(notes, Mapping):
        lines += [f"note {key}: {short(value)}" for key, value in notes.items() if key != "tree"]
    return lines


def render(trace: Mapping[str, Any]) -> str:
    nodes = [n for n in trace.get("nodes") or () if isinstance(n, Mapping)]
    children: dict[Any, list[Mapping[str, Any]]] = {}
    for node in nodes:
        children.setdefault(node.get("parent"), []).append(node)
    created = trace.get("created")
    when = (datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            if isinstance(created, (int, float)) else "?")
    lines = [f"{trace.get('id')} ({len(nodes)} nodes, started {when})"]
    root = nodes[0] if nodes else None
    if root is not None and root.get("truncated"):
        lines.append(f"(truncated by the proxy: {root.get('nodes_dropped')} nodes dropped)")

    def walk(node: Mapping[str, Any], prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        lines.append(prefix + branch + headline(node))
        inner = prefix + ("" if top else ("   " if last else "│  "))
        kids = children.get(node.get("id"), [])
        bar = "│  " if kids else "   "
        lines.extend(inner + bar + line for line in detail_lines(node))
        for i, kid in enumerate(kids):
            walk(kid, inner, i == len(kids) - 1, False)

    if root is not None:
        walk(root, "", True, True)
    return "\n".join(lines)


def trace_command(args: argparse.Namespace) -> int:
    """Exit status: 0 printed, 1 the proxy did not answer or has no such trace for this key."""
    try:
        trace = get_json(args.proxy, f"/v1/traces/{args.trace_id}", args.key)
    except ProxyRequestFailed as exc:
        print(f"ttc-proxy trace: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(trace, indent=2) if args.json else render(trace))
    return 0
