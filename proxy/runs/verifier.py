"""The client for HTTP verifiers named in config (`verifiers:`): POST {question, messages, candidate, answer}
-> {"pass": true|false}."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from ttc_proxy.strategies.framework import StrategyError, last_user_text

from ..config import VerifierEndpoint
from ..errors import InvalidRequest


class VerifierClient:
    def __init__(self, endpoints: Mapping[str, VerifierEndpoint], client: aiohttp.ClientSession) -> None:
        self._endpoints = endpoints
        self._client = client

    def endpoint(self, name: str) -> VerifierEndpoint:
        endpoint = self._endpoints.get(name)
        if endpoint is None:
            known = ", ".join(sorted(self._endpoints)) or "none configured"
            raise InvalidRequest(f"unknown verifier {name!r}; configured verifiers: {known}",
                                 param="ttc.params", code="unknown_verifier")
        return endpoint

    async def verify(self, name: str, messages: Sequence[dict[str, Any]], candidate: str, answer: str) -> bool:
        endpoint = self.endpoint(name)
        payload = {"question": last_user_text(messages), "messages": list(messages), "candidate": candidate,
                   "answer": answer}
        headers = {}
        key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        try:
            async with self._client.post(endpoint.url, json=payload, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=endpoint.timeout)) as response:
                body = await response.json(content_type=None) if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise StrategyError(f"verifier {name!r} failed: {exc!r}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("pass"), bool):
            raise StrategyError(f"verifier {name!r} must answer 200 with {{\"pass\": true|false}}")
        return body["pass"]
