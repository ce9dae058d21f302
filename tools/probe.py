"""`ttc-proxy probe URL`: what an OpenAI-compatible engine supports, measured with real, tiny requests, as a table
and as the `backends:` entry to paste into config.yaml (proxy/backends/probe.py does the measuring)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import aiohttp

from ttc_proxy.proxy.backends.probe import ProbeReport, config_block, probe


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "probe", help="measure what an engine supports (n, logprobs, prefill, completions, tokenizer, ...)",
        description="Sends tiny requests (a few tokens each) to an OpenAI-compatible engine and prints what it "
                    "supports: the largest n, logprobs and how many alternatives, token ids, logit_bias, prefill "
                    "and whether it echoes, raw completions with text and token-id prompts, tokenizer and template "
                    "endpoints, seed determinism, usage with n, the stream terminator and the error shape; then the "
                    "config.yaml entry for it.")
    parser.add_argument("url", help="the engine's OpenAI base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--model", help="the model name to ask for (default: the first GET /models lists)")
    parser.add_argument("--api-key-env", help="an environment variable holding the engine's API key")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=probe_command)
    return parser


def render(report: ProbeReport) -> str:
    width = max(len(c.name) for c in report.checks)
    lines = [f"{report.base_url} (model {report.model})", ""]
    lines += [f"{c.name.ljust(width)}  {json.dumps(c.value):<12}  {c.note}" for c in report.checks]
    return "\n".join(lines)


def probe_command(args: argparse.Namespace) -> int:
    """Exit status: 0 measured, 1 the engine did not answer a plain chat request."""
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None

    async def run() -> ProbeReport:
        async with aiohttp.ClientSession() as client:
            return await probe(client, args.url, args.model, api_key=api_key, timeout=args.timeout)

    report = asyncio.run(run())
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(render(report))
        if report.value("chat"):
            print("\nconfig.yaml:\nbackends:\n" + config_block(report))
    if not report.value("chat"):
        print(f"ttc-proxy probe: {report.base_url} did not answer a chat request", file=sys.stderr)
        return 1
    return 0
