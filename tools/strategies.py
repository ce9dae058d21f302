"""`ttc-proxy strategies`: the strategies a proxy serves (GET /v1/strategies), or without --proxy those installed
here, with each one's purpose, the capabilities it needs and its parameters."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .proxyclient import ProxyRequestFailed, add_proxy_arguments, get_json

_BOUND_SIGNS = (("minimum", ">="), ("exclusive_minimum", ">"), ("maximum", "<="), ("exclusive_maximum", "<"),
                ("min_length", "length >="), ("max_length", "length <="))


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "strategies", help="list the strategies, their purpose, needs and parameters",
        description="Every strategy a proxy serves (GET /v1/strategies) with its one-line purpose, the backend "
                    "capabilities it needs with its default parameters, and each parameter's type, default, range "
                    "or choices and description. Without --proxy: the strategies installed here.")
    parser.add_argument("slugs", nargs="*", help="only these strategies")
    add_proxy_arguments(parser, default=None, unset="the strategies installed here, no proxy asked")
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")
    parser.set_defaults(handler=strategies_command)
    return parser


def describe_type(parameter: dict[str, Any]) -> str:
    kind = "|".join(str(c) for c in parameter["choices"]) if parameter.get("choices") else parameter["type"]
    bounds = [f"{sign} {parameter[key]:g}" for key, sign in _BOUND_SIGNS if key in parameter]
    text = ", ".join([kind, *bounds])
    if parameter.get("nullable"):
        text += " or null"
    if parameter.get("limit"):
        text += f" (max: strategies.max_{parameter['limit']})"
    return text


def render(listing: dict[str, Any]) -> str:
    blocks = []
    for strategy in listing["data"]:
        lines = [f"{strategy['id']}: {strategy['description']}"]
        needs = [f"{c['name']}" + (f" ({c['why']})" if c["why"] else "") for c in strategy["capabilities"]]
        lines.append("  needs: " + ("; ".join(needs) if needs else "nothing beyond chat completions"))
        if strategy["composable"]:
            lines.append(f"  runs over another strategy: {strategy['id']}>cot-MODEL")
        rows = [(p["name"], describe_type(p), json.dumps(p["default"]), p["description"])
                for p in strategy["parameters"]]
        if rows:
            widths = [max(len(row[i]) for row in rows) for i in range(3)]
            lines += [f"  {name.ljust(widths[0])}  {kind.ljust(widths[1])}  default {default.ljust(widths[2])}  "
                      f"{description}" for name, kind, default, description in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def strategies_command(args: argparse.Namespace) -> int:
    """Exit status: 0 listed, 1 the proxy did not answer, 2 an unknown slug."""
    if args.proxy:
        try:
            listing = get_json(args.proxy, "/v1/strategies", args.key)
        except ProxyRequestFailed as exc:
            print(f"ttc-proxy strategies: {exc}", file=sys.stderr)
            return 1
    else:
        from ttc_proxy.proxy.catalogue import strategy_list
        from ttc_proxy.proxy.registry import load_registry

        listing = strategy_list(load_registry()[0])
    if args.slugs:
        known = {s["id"] for s in listing["data"]}
        unknown = [slug for slug in args.slugs if slug not in known]
        if unknown:
            print(f"ttc-proxy strategies: not a strategy: {', '.join(unknown)}; strategies: "
                  f"{', '.join(sorted(known))}", file=sys.stderr)
            return 2
        listing = {**listing, "data": [s for s in listing["data"] if s["id"] in args.slugs]}
    print(json.dumps(listing, indent=2) if args.json else render(listing))
    return 0
