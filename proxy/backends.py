"""One OpenAI-compatible backend: its address, abilities, scheduler, and every HTTP call made to it."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx

from .capabilities import PRESETS, Capabilities, cap_from_n_error, kind_from_models_listing
from .config import BackendConfig
from .errors import BackendTimeout, BackendUnreachable, error_from_backend
from .scheduler import FairScheduler

log = logging.getLogger("ttc_proxy.backends")
httpx_log = logging.getLogger("httpx")

DEFAULT_MAX_IN_FLIGHT = 64


def _direct_transport(client: httpx.AsyncClient, base_url: str) -> httpx.AsyncBaseTransport | None:
    """The client's transport for `base_url` (its proxy mount, if any), when sending on it directly is the same
    as client.send: no auth, event hooks, query params or URL credentials to apply. Otherwise None."""
    transport_for_url = getattr(client, "_transport_for_url", None)
    if not isinstance(client, httpx.AsyncClient) or not callable(transport_for_url):
        return None
    url = httpx.URL(base_url)
    if client.auth is not None or client.params or url.userinfo or any(client.event_hooks.values()):
        return None
    transport = transport_for_url(url)
    return transport if isinstance(transport, httpx.AsyncBaseTransport) else None


class Backend:
    def __init__(
        self, config: BackendConfig, base_url: str, client: httpx.AsyncClient, api_key: str | None = None
    ) -> None:
        self.name = config.name
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.capabilities: Capabilities = PRESETS[config.kind].with_overrides(config.capabilities)
        self.timeout = httpx.Timeout(
            connect=config.timeouts.connect,
            read=config.timeouts.read,
            write=config.timeouts.read,
            pool=config.timeouts.connect,
        )
        self.scheduler = FairScheduler(config.max_in_flight or DEFAULT_MAX_IN_FLIGHT, config.max_queue)
        self.discovered_models: list[str] = []
        self._headers = {"content-type": "application/json"}
        api_key = api_key or config.api_key()
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        # The hot path builds its requests and sends them on the client's transport for this URL itself: the
        # same bytes on the wire as client.build_request + client.send, without their per-call merging of URLs,
        # headers and cookie jars, auth and redirect steps (together about a third of the proxy's CPU per
        # pass-through call). It steps aside to the client whenever the client's cookie jar is not empty or
        # the client is closed, and is off when the client has anything per-call to add (see _direct_transport).
        self._urls: dict[str, httpx.URL] = {}
        self._extensions = {"timeout": self.timeout.as_dict()}
        merged = httpx.Headers(client.headers)
        merged.update(self._headers)
        self._call_headers = merged.raw
        self._transport = _direct_transport(client, self.base_url)

    # ---- learning what the backend can do (free endpoints only) ----

    @property
    def root_url(self) -> str:
        """The server root, for engine endpoints that live outside /v1 (llama-server's /props, /tokenize)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    async def discover(self) -> None:
        """GET /models (free everywhere) names the models and often the engine; llama-server's /props its slots."""
        listing = await self._get_json(f"{self.base_url}/models")
        if isinstance(listing, dict) and isinstance(listing.get("data"), list):
            self.discovered_models = [str(m["id"]) for m in listing["data"] if isinstance(m, dict) and "id" in m]
        kind = self.capabilities.kind
        if kind == "generic":
            detected = kind_from_models_listing(listing)
            if detected is not None:
                kind = detected
                self.capabilities = PRESETS[detected].with_overrides(self.config.capabilities)
                log.info("backend %s looks like %s", self.name, detected)
        if kind == "llama_cpp":
            props = await self._get_json(f"{self.root_url}/props")
            slots = props.get("total_slots") if isinstance(props, dict) else None
            if isinstance(slots, int) and slots > 0:
                if self.config.capabilities.max_n is None:
                    self.capabilities = dataclasses.replace(self.capabilities, max_n=slots)
                if self.config.max_in_flight is None:
                    self.scheduler.capacity = slots

    async def _get_json(self, url: str) -> Any:
        try:
            response = await self.client.get(url, headers=self._headers, timeout=self.timeout)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def lower_n_cap(self, message: str, requested: int) -> bool:
        cap = cap_from_n_error(message, requested)
        if cap is None or cap >= self.capabilities.max_n:
            return False
        log.warning("backend %s refused n=%d; remembering max n=%d", self.name, requested, cap)
        self.capabilities = dataclasses.replace(self.capabilities, max_n=cap)
        return True

    # ---- calls ----

    def _request(self, path: str, content: bytes, request_id: str | None) -> httpx.Request:
        if self._transport is None or self.client.cookies:
            headers = self._headers if request_id is None else {**self._headers, "x-request-id": request_id}
            return self.client.build_request(
                "POST", f"{self.base_url}{path}", content=content, headers=headers, timeout=self.timeout
            )
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(f"{self.base_url}{path}")
        headers = self._call_headers if request_id is None else [
            *self._call_headers, (b"x-request-id", request_id.encode("ascii"))]  # as httpx encodes header values
        return httpx.Request("POST", url, content=content, headers=headers, extensions=self._extensions)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            if self._transport is None or self.client.is_closed or self.client.cookies:
                return await self.client.send(request, stream=True)
            return await self._send_on_transport(self._transport, request)
        except httpx.TimeoutException as exc:
            raise BackendTimeout(f"backend {self.name} timed out: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise BackendUnreachable(f"backend {self.name} is unreachable: {exc!r}") from exc

    async def _send_on_transport(self, transport: httpx.AsyncBaseTransport, request: httpx.Request) -> httpx.Response:
        """What client.send(request, stream=True) does for this client, less the steps it has no use for."""
        try:
            response = await transport.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request
            raise
        response.request = request
        if "set-cookie" in response.headers:
            self.client.cookies.extract_cookies(response)
        if httpx_log.isEnabledFor(logging.INFO):
            httpx_log.info('HTTP Request: %s %s "%s %d %s"', request.method, request.url, response.http_version,
                           response.status_code, response.reason_phrase)
        return response

    async def _raise_for_status(self, response: httpx.Response, body: dict[str, Any] | None) -> None:
        if response.status_code < 400:
            return
        try:
            raw = await response.aread()
        except httpx.HTTPError:
            raw = b""
        finally:
            await response.aclose()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        error = error_from_backend(response.status_code, payload, raw.decode("utf-8", "replace")[:2000])
        requested_n = body.get("n") if body else None
        if response.status_code == 400 and isinstance(requested_n, int) and requested_n > 1:
            self.lower_n_cap(error.message, requested_n)
        raise error

    @asynccontextmanager
    async def stream(
        self,
        path: str,
        body: dict[str, Any],
        *,
        owner: str,
        cost: int = 1,
        request_id: str | None = None,
        content: bytes | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A call whose response body is read by the caller; leaving the block early aborts the backend call.

        `on_start` runs when the call gets its scheduler slot, just before it is sent; raising there cancels it.
        """
        request = self._request(path, content if content is not None else json.dumps(body).encode(), request_id)
        async with self.scheduler.slot(owner, cost):
            if on_start is not None:
                on_start()
            response = await self._send(request)
            try:
                await self._raise_for_status(response, body)
                yield response
            except httpx.TimeoutException as exc:
                raise BackendTimeout(f"backend {self.name} timed out: {type(exc).__name__}") from exc
            except httpx.HTTPError as exc:
                raise BackendUnreachable(f"backend {self.name} failed mid-response: {exc!r}") from exc
            finally:
                await response.aclose()

    async def call(
        self,
        path: str,
        body: dict[str, Any],
        *,
        owner: str,
        cost: int = 1,
        request_id: str | None = None,
        content: bytes | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> tuple[httpx.Response, bytes]:
        """A whole non-streaming call: the response (status and headers) and its body bytes."""
        async with self.stream(path, body, owner=owner, cost=cost, request_id=request_id, content=content,
                               on_start=on_start) as response:
            return response, await response.aread()

    async def call_json(self, path: str, body: dict[str, Any], *, owner: str, cost: int = 1,
                        request_id: str | None = None, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
        _, raw = await self.call(path, body, owner=owner, cost=cost, request_id=request_id, on_start=on_start)
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            raise BackendUnreachable(f"backend {self.name} sent a body that is not JSON: {raw[:200]!r}") from exc
        if not isinstance(payload, dict):
            raise BackendUnreachable(f"backend {self.name} sent JSON that is not an object")
        return payload

    async def count_tokens(self, text: str) -> int | None:
        """llama-server's /tokenize, for counting tokens the engine's usage leaves out."""
        if self.capabilities.kind != "llama_cpp":
            return None
        try:
            response = await self.client.post(
                f"{self.root_url}/tokenize", json={"content": text}, headers=self._headers, timeout=self.timeout
            )
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None
