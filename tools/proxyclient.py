"""Reading a running proxy's JSON endpoints for the commands that show what it has (`strategies`, `trace`)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import httpx

DEFAULT_PROXY = "http://127.0.0.1:8000"
KEY_ENV = "TTC_PROXY_KEY"


class ProxyRequestFailed(Exception):
    """The proxy could not be reached, or answered with an error (its message quoted)."""


def add_proxy_arguments(parser: argparse.ArgumentParser, default: str | None = DEFAULT_PROXY,
                        unset: str = "") -> None:
    """--proxy URL (`default`; `unset` says what happens without one) and --key."""
    parser.add_argument("--proxy", default=default, help=f"the proxy's URL (default: {unset or default})")
    parser.add_argument("--key", default=os.environ.get(KEY_ENV),
                        help=f"a proxy API key, when server.api_keys are set (default: ${KEY_ENV})")


def get_json(proxy: str, path: str, key: str | None, timeout: float = 30.0) -> Any:
    """GET `path` from the proxy at `proxy` (its root URL; a trailing /v1 is dropped) as JSON."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise in a command's output
    root = proxy.rstrip("/").removesuffix("/v1")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(root + path, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ProxyRequestFailed(f"cannot reach the proxy at {root}: {exc}") from exc
    try:
        body = response.json()
    except ValueError as exc:
        raise ProxyRequestFailed(f"{root}{path} answered HTTP {response.status_code} with no JSON") from exc
    if response.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise ProxyRequestFailed(f"{root}{path}: HTTP {response.status_code}: {message or body}")
    return body
