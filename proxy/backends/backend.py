"""One OpenAI-compatible backend: its address, abilities, scheduler, and every HTTP call made to it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import aiohttp
from yarl import URL

from ..config import BackendConfig
from ..errors import (
    BackendConnectFailed,
    BackendDown,
    BackendError,
    BackendInvalidResponse,
    BackendTimeout,
    BackendUnreachable,
    ProxyError,
    error_from_backend,
)
from .capabilities import PRESETS, Capabilities, cap_from_n_error, kind_from_models_listing
from .probe import probe
from .scheduler import FairScheduler

E = TypeVar("E", bound=ProxyError)

log = logging.getLogger("ttc_proxy.backends")

DEFAULT_MAX_IN_FLIGHT = 64
DOWN_SECONDS = 5.0  # how long a backend that refused a connection is passed over when another serves the model
# Raised before any response byte when the server had closed a pooled keep-alive connection.
_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# Below the 5 s idle timeout of uvicorn and llama-server, so the pool rarely reuses a connection they closed.
DEFAULT_KEEPALIVE_SECONDS = 4.0
# Response headers of an engine's error passed on to the client: the engine's own word on retrying.
_RETRY_HEADERS = ("retry-after", "x-should-retry")
# A prefill no reply of one token can contain: whether the engine echoes it shows in its answer (see
# Backend.prefill_echoes).
_ECHO_PROBE = "Echo probe 7Q3:"


def connections_in_use(client: aiohttp.ClientSession) -> int:
    """Connections of the shared client now carrying a call (idle pooled ones not counted): 0 when the proxy is
    idle, whatever went wrong before (the fault tests check it). aiohttp has no public count: its connector's
    set of acquired connections is read."""
    connector = client.connector
    return len(getattr(connector, "_acquired", ())) if connector is not None else 0


def parse_reply(raw: bytes, backend: str) -> dict[str, Any]:
    """A backend's JSON object reply; anything else is BackendInvalidResponse naming the backend."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BackendInvalidResponse(f"backend {backend} sent a body that is not JSON: {raw[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise BackendInvalidResponse(f"backend {backend} sent JSON that is not an object: {raw[:200]!r}")
    return payload


def check_completion(raw: bytes, backend: str) -> dict[str, Any]:
    """A backend's 200 reply to a completion call: a JSON object with `choices`, else BackendInvalidResponse."""
    reply = parse_reply(raw, backend)
    if not isinstance(reply.get("choices"), list):
        raise BackendInvalidResponse(f"backend {backend} answered without a list of choices: {raw[:200]!r}")
    return reply


def retry_delay(backoff: float, retry: int) -> float:
    """Seconds before retry number `retry` (0 first): `backoff` doubling each time, jittered by +-50 % so that
    calls refused together do not come back together."""
    return backoff * 2 ** retry * random.uniform(0.5, 1.5)


def refuse_if_down(backends: Sequence[Backend]) -> None:
    """BackendDown (503 naming them, Retry-After: their check interval) when every backend a request could go to
    failed its health checks or has not answered capability discovery yet. One only passed over after a refused
    connection is still tried."""
    if backends and all(b.down for b in backends):
        wait = max(1, math.ceil(min(b.retry_interval for b in backends)))
        reasons = "; ".join(f"{b.name}: {b.down_reason}" for b in backends)
        names = ", ".join(b.name for b in backends)
        raise BackendDown(f"backend {names} is down ({reasons}); retry in {wait} s",
                          headers={"Retry-After": str(wait)})


def new_client_session(limit: int = 1024, keepalive: float = DEFAULT_KEEPALIVE_SECONDS,
                       timeout: aiohttp.ClientTimeout | None = None) -> aiohttp.ClientSession:
    """The one HTTP client the proxy shares across its backends (create it inside the running event loop).

    No cookie jar: one backend's cookies must not ride along on other clients' requests."""
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=keepalive)
    return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=timeout or aiohttp.ClientTimeout(total=None))


class BackendResponse:
    """A backend's response as the proxy reads it: status, headers and body (whole or as raw chunks).

    A backend that breaks off or stalls while the body is read raises BackendUnreachable or BackendTimeout.
    """

    __slots__ = ("_response", "_backend", "status_code", "headers")

    def __init__(self, response: aiohttp.ClientResponse, backend: str) -> None:
        self._response = response
        self._backend = backend
        self.status_code = response.status
        self.headers = response.headers

    def _error(self, exc: Exception) -> Exception:
        if isinstance(exc, TimeoutError):
            return BackendTimeout(f"backend {self._backend} stalled mid-response: {type(exc).__name__}")
        return BackendUnreachable(f"backend {self._backend} broke off the response: {exc!r}")

    @property
    def complete(self) -> bool:
        """The whole body has been read (the connection can be kept for the next call)."""
        return self._response.content.at_eof()

    async def aread(self) -> bytes:
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._error(exc) from exc

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (decompressed, if the backend compressed them)."""
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._error(exc) from exc

    def close(self) -> None:
        """Done with the response: the connection goes back to the pool if the body was read to its end, else
        it is closed, so the backend sees the call aborted."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class Backend:
    def __init__(
        self, config: BackendConfig, base_url: str, client: aiohttp.ClientSession, api_key: str | None = None
    ) -> None:
        self.name = config.name
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.capabilities: Capabilities = self._preset(config.kind)
        # connect also bounds the wait for a free connection in the pool (as httpx's pool timeout did).
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=config.timeouts.connect,
            sock_connect=config.timeouts.connect,
            sock_read=config.timeouts.read,
        )
        self.scheduler = FairScheduler(config.max_in_flight or DEFAULT_MAX_IN_FLIGHT, config.max_queue)
        self.discovered_models: list[str] = []
        self.down_until = 0.0  # monotonic time before which a backend that refused a connection is passed over
        self.failing_checks = False  # it failed its health checks (check_health_forever)
        self.undiscovered = False  # it took the connection but has not answered discovery (discover_in_background)
        self._headers = {"content-type": "application/json"}
        api_key = api_key or config.api_key()
        self._api_key = api_key
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._urls: dict[str, URL] = {}  # parsed once per path
        self._prefill_echo: bool | None = None  # learned on first use (prefill_echoes)
        self._echo_lock = asyncio.Lock()

    def _preset(self, kind: Any) -> Capabilities:
        capabilities = PRESETS[kind]
        if self.config.chat_template is not None:
            capabilities = dataclasses.replace(capabilities, render=True)
        return capabilities.with_overrides(self.config.capabilities)

    # ---- which models it serves, and how busy and healthy it is ----

    @property
    def served_models(self) -> list[str]:
        """The names clients may use: configured, else what its GET /models listed, plus mapped names. Empty: the
        backend listed nothing and takes any name."""
        return list(dict.fromkeys([*(self.config.models or self.discovered_models), *self.config.model_names]))

    def serves(self, model: str) -> bool:
        served = self.served_models
        return not served or model in served

    def engine_model(self, model: str) -> str:
        """The name this engine wants for a model clients call `model`."""
        return self.config.model_names.get(model, model)

    @property
    def load(self) -> float:
        """Calls in flight and queued, per slot."""
        return (self.scheduler.in_use + self.scheduler.queued) / max(1, self.scheduler.capacity)

    @property
    def down(self) -> bool:
        """Nothing is sent to it: it failed its health checks, or has not answered capability discovery yet."""
        return self.failing_checks or self.undiscovered

    @property
    def down_reason(self) -> str:
        if self.undiscovered:
            return (f"it has not answered capability discovery yet: each attempt waits "
                    f"{self.config.timeouts.discovery:g} s, one every {self.retry_interval:g} s")
        return "it failed its health checks" if self.failing_checks else "up"

    @property
    def retry_interval(self) -> float:
        """Seconds between health checks (and discovery attempts): when a down backend may be back."""
        return self.config.health_check.interval or self.config.timeouts.discovery

    def describe_state(self) -> str:
        """Its state in a few words, for progress lines: up or down (why), and how busy."""
        health = "up" if self.healthy else "passed over after a refused connection" if not self.down \
            else f"down ({self.down_reason})"
        scheduler = self.scheduler
        return (f"backend {self.name} {health}, {scheduler.in_use} of {scheduler.capacity} calls in flight, "
                f"{scheduler.queued} queued")

    @property
    def healthy(self) -> bool:
        return not self.down and time.monotonic() >= self.down_until

    def mark_down(self) -> None:
        """It refused a connection: pass it over for a while (a later request tries it again)."""
        self.down_until = time.monotonic() + DOWN_SECONDS
        log.warning("backend %s refused a connection; passed over for %g s", self.name, DOWN_SECONDS)

    async def check_health(self) -> bool:
        """One active check: GET /models answered, below 500, within the check's timeout."""
        timeout = aiohttp.ClientTimeout(total=self.config.health_check.timeout)
        try:
            async with self.client.get(self._url("/models"), headers=self._headers, timeout=timeout,
                                       allow_redirects=False) as response:
                await response.read()
                return response.status < 500
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def check_health_forever(self) -> None:
        """Active health checks (backends[].health_check), until cancelled: `failures` failed checks in a row mark
        the backend down (`down`: requests only it serves are 503s, nothing is sent), one passing check brings it
        back up (and ends a pass-over after a refused connection)."""
        settings = self.config.health_check
        if settings.interval <= 0:
            return
        failed = 0
        while True:
            await asyncio.sleep(settings.interval)
            if await self.check_health():
                if self.failing_checks:
                    log.warning("backend %s passed its health check: up again", self.name)
                failed, self.failing_checks, self.down_until = 0, False, 0.0
                continue
            failed += 1
            if failed >= settings.failures and not self.failing_checks:
                self.failing_checks = True
                log.warning("backend %s failed %d health checks in a row: down", self.name, failed)

    # ---- learning what the backend can do (free endpoints only) ----

    @property
    def root_url(self) -> str:
        """The server root, for engine endpoints that live outside /v1 (llama-server's /props, /tokenize)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    async def discover_in_background(self, on_discovered: Callable[[], None] | None = None) -> None:
        """Capability discovery that never holds the proxy up: each attempt bounded by `timeouts.discovery`; while
        the backend takes connections but does not answer, it is down (requests only it serves are 503s naming
        it) and asked again every `retry_interval` seconds. `on_discovered` runs once it has answered."""
        limit = self.config.timeouts.discovery
        self.undiscovered = True
        attempts = 0
        while True:
            try:
                async with asyncio.timeout(limit):
                    await self.discover()
                break
            except TimeoutError:
                attempts += 1
                if attempts == 1:
                    log.warning("backend %s did not answer capability discovery within %g s: down until it does",
                                self.name, limit)
                await asyncio.sleep(self.retry_interval)
        if self.config.probe:
            await self._probe()  # real generations: not bounded by the discovery timeout
        if attempts:
            log.warning("backend %s answered capability discovery: up", self.name)
        self.undiscovered = False
        if on_discovered is not None:
            on_discovered()

    async def discover(self) -> None:
        """GET /models (free everywhere) names the models and often the engine; llama-server's /props its slots.
        (`probe: true` measures more: discover_in_background runs it after this.)"""
        listing = await self._get_json(f"{self.base_url}/models")
        if isinstance(listing, dict) and isinstance(listing.get("data"), list):
            self.discovered_models = [str(m["id"]) for m in listing["data"] if isinstance(m, dict) and "id" in m]
        kind = self.capabilities.kind
        if kind == "generic":
            detected = kind_from_models_listing(listing)
            if detected is not None:
                kind = detected
                self.capabilities = self._preset(detected)
                log.info("backend %s looks like %s", self.name, detected)
        if kind == "llama_cpp":
            props = await self._get_json(f"{self.root_url}/props")
            slots = props.get("total_slots") if isinstance(props, dict) else None
            if isinstance(slots, int) and slots > 0:
                if self.config.capabilities.max_n is None:
                    self.capabilities = dataclasses.replace(self.capabilities, max_n=slots)
                if self.config.max_in_flight is None:
                    self.scheduler.capacity = slots

    async def _probe(self) -> None:
        """`probe: true`: measure the engine (proxy/backends/probe.py) and use what was measured over the preset;
        configured `capabilities` still win."""
        served = next(iter(self.served_models), None)
        model = self.engine_model(served) if served is not None else None
        report = await probe(self.client, self.base_url, model, api_key=self._api_key,
                             timeout=self.config.timeouts.read)
        if not report.value("chat"):
            log.warning("backend %s: the probe's chat request failed; keeping the %s preset", self.name,
                        self.capabilities.kind)
            return
        self.capabilities = report.capabilities(self.capabilities).with_overrides(self.config.capabilities)
        log.info("backend %s probed: %s", self.name,
                 ", ".join(f"{c.name}={c.value}" for c in report.checks if c.name != "models"))

    async def _get_json(self, url: str) -> Any:
        try:
            async with self.client.get(url, headers=self._headers, timeout=self.timeout,
                                       allow_redirects=False) as response:
                return await response.json(content_type=None) if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None

    def lower_n_cap(self, message: str, requested: int) -> bool:
        cap = cap_from_n_error(message, requested)
        if cap is None or cap >= self.capabilities.max_n:
            return False
        log.warning("backend %s refused n=%d; remembering max n=%d", self.name, requested, cap)
        self.capabilities = dataclasses.replace(self.capabilities, max_n=cap)
        return True

    # ---- calls ----

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(f"{self.base_url}{path}")
        return url

    async def _send(self, path: str, content: bytes, request_id: str | None) -> BackendResponse:
        headers = self._headers if request_id is None else {**self._headers, "x-request-id": request_id}
        retries = self.config.connect_retries
        refused = 0
        stale = False
        while True:
            try:
                # sock_read bounds the wait for the first byte only once the body is sent: a backend that stops
                # reading it would hold the call forever, so sending and the first byte share the read timeout.
                async with asyncio.timeout(self.config.timeouts.connect + self.config.timeouts.read):
                    # never to another host: a redirect is answered as it is (see the SSRF note in the README)
                    response = await self.client.post(self._url(path), data=content, headers=headers,
                                                      timeout=self.timeout, allow_redirects=False)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # No connection (refused, or none within timeouts.connect: a host that drops packets): nothing was
                # sent, so trying again is safe (bounded, backing off, jittered), and another backend may take it.
                if refused < retries.attempts and self.healthy:
                    await asyncio.sleep(retry_delay(retries.backoff, refused))
                    refused += 1
                    continue
                self.mark_down()
                raise BackendConnectFailed(f"backend {self.name} is unreachable: {exc!r}") from exc
            except TimeoutError as exc:
                raise BackendTimeout(f"backend {self.name} timed out: {type(exc).__name__}") from exc
            except _STALE_CONNECTION as exc:
                # A pooled keep-alive connection the server closed just as we reused it: the request never
                # reached the engine (no response began), so sending it once more on a fresh one is safe.
                if not stale:
                    stale = True
                    log.debug("backend %s: stale pooled connection (%r); retrying once", self.name, exc)
                    continue
                raise BackendUnreachable(f"backend {self.name} is unreachable: {exc!r}") from exc
            except aiohttp.ClientError as exc:
                raise BackendUnreachable(f"backend {self.name} is unreachable: {exc!r}") from exc
            return BackendResponse(response, self.name)

    def without_key(self, data: bytes) -> bytes:
        """Bytes from the backend with the key it was sent blanked out (an error event in a stream may quote it)."""
        return data.replace(self._api_key.encode(), b"[backend key]") if self._api_key else data

    def completion_reply(self, raw: bytes) -> dict[str, Any]:
        """A 200 reply to a completion call: a JSON object with `choices`, else BackendInvalidResponse (quoting
        the body, the key blanked out)."""
        try:
            return check_completion(raw, self.name)
        except BackendInvalidResponse as exc:
            raise self.without_key_error(exc) from exc.__cause__

    def without_key_error(self, error: E) -> E:
        """An error made from what the backend sent, with the key it was sent blanked out (an engine may quote it
        back: "bad key sk-…"; a body it could not parse is quoted)."""
        if self._api_key:
            error.message = error.message.replace(self._api_key, "[backend key]")
            error.param = error.param.replace(self._api_key, "[backend key]") if error.param else error.param
            error.code = error.code.replace(self._api_key, "[backend key]") if error.code else error.code
        return error

    async def _raise_for_status(self, response: BackendResponse, body: dict[str, Any] | None) -> None:
        if response.status_code < 400:
            return
        try:
            raw = await response.aread()
        except (BackendTimeout, BackendUnreachable):
            raw = b""
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        error = self.without_key_error(error_from_backend(response.status_code, payload,
                                                     raw.decode("utf-8", "replace")[:2000]))
        for header in _RETRY_HEADERS:  # the engine's own word on when (or whether) to try again
            if header in response.headers:
                error.headers[header] = response.headers[header]
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
    ) -> AsyncIterator[BackendResponse]:
        """A call whose response body is read by the caller; leaving the block early aborts the backend call.

        `on_start` runs when the call gets its scheduler slot, just before it is sent; raising there cancels it,
        and it may still change `body` (the budget cuts max_tokens to what is left then).
        Reading the body raises BackendUnreachable or BackendTimeout if the backend breaks off or stalls.
        """
        async with self.scheduler.slot(owner, cost):
            if on_start is not None:
                on_start()
            payload = content if content is not None else json.dumps(body).encode()
            response = await self._send(path, payload, request_id)
            try:
                await self._raise_for_status(response, body)
                yield response
            finally:
                response.close()  # closes the connection unless the body was read to its end

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
    ) -> tuple[BackendResponse, bytes]:
        """A whole non-streaming call: the response (status and headers) and its body bytes."""
        async with self.stream(path, body, owner=owner, cost=cost, request_id=request_id, content=content,
                               on_start=on_start) as response:
            return response, await response.aread()

    async def call_json(self, path: str, body: dict[str, Any], *, owner: str, cost: int = 1,
                        request_id: str | None = None, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
        _, raw = await self.call(path, body, owner=owner, cost=cost, request_id=request_id, on_start=on_start)
        try:
            return parse_reply(raw, self.name)
        except BackendInvalidResponse as exc:
            raise self.without_key_error(exc) from exc.__cause__

    # ---- engine endpoints beside the OpenAI API (tokenizer, chat template) ----

    async def _engine_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A small POST to an engine endpoint (no generation, so no scheduler slot); errors as ProxyErrors.
        Idempotent, so a stale pooled connection is retried once on a fresh one."""
        for attempt in range(2):
            try:
                async with self.client.post(f"{self.root_url}{path}", json=body, headers=self._headers,
                                            timeout=self.timeout, allow_redirects=False) as response:
                    raw = await response.read()
                    status = response.status
                break
            except TimeoutError as exc:
                raise BackendTimeout(f"backend {self.name} timed out on {path}") from exc
            except _STALE_CONNECTION as exc:
                if attempt == 0:
                    log.debug("backend %s: stale pooled connection on %s (%r); retrying once", self.name, path, exc)
                    continue
                raise BackendUnreachable(f"backend {self.name} is unreachable: {exc!r}") from exc
            except aiohttp.ClientError as exc:
                raise BackendUnreachable(f"backend {self.name} is unreachable: {exc!r}") from exc
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if status >= 400:
            raise self.without_key_error(error_from_backend(status, payload, raw.decode("utf-8", "replace")[:2000]))
        if not isinstance(payload, dict):
            raise BackendUnreachable(f"backend {self.name} answered {path} with something that is not a JSON object")
        return payload

    async def tokenize(self, model: str, text: str) -> list[int]:
        """The engine's token ids for `text`, special-token text parsed, no BOS added."""
        if self.capabilities.kind == "vllm":
            payload = await self._engine_json("/tokenize", {"model": model, "prompt": text,
                                                            "add_special_tokens": False})
        else:
            payload = await self._engine_json("/tokenize", {"content": text, "add_special": False,
                                                            "parse_special": True})
        tokens = payload.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BackendUnreachable(f"backend {self.name}: /tokenize did not answer with a list of token ids")
        return tokens

    async def detokenize(self, model: str, ids: Sequence[int]) -> str:
        body: dict[str, Any] = {"tokens": list(ids)}
        if self.capabilities.kind == "vllm":
            body["model"] = model
        payload = await self._engine_json("/detokenize", body)
        text = payload.get("content", payload.get("prompt"))
        if not isinstance(text, str):
            raise BackendUnreachable(f"backend {self.name}: /detokenize did not answer with text")
        return text

    async def render(self, model: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The conversation as the model's raw prompt: the configured template, else the engine's own."""
        if self.config.chat_template is not None:
            return self.config.chat_template.render(list(messages), add_generation_prompt)
        if self.capabilities.kind == "vllm":
            payload = await self._engine_json("/tokenize", {"model": model, "messages": list(messages),
                                                            "add_generation_prompt": add_generation_prompt})
            return await self.detokenize(model, payload.get("tokens") or [])
        if self.capabilities.kind == "llama_cpp":
            payload = await self._engine_json("/apply-template", {"messages": list(messages),
                                                                  "add_generation_prompt": add_generation_prompt})
            prompt = payload.get("prompt")
            if isinstance(prompt, str):
                return prompt
        raise BackendError(f"backend {self.name} ({self.capabilities.kind}) cannot render a chat template; "
                           f"configure backends[].chat_template", status_code=400)

    async def prefill_echoes(self, model: str, owner: str) -> tuple[bool, dict[str, Any] | None]:
        """Whether the engine repeats a trailing assistant message at the start of its reply (llama-server does,
        vLLM does not). Asked once, with a one-token probe, and remembered; returns the probe's usage when this
        call made it (so the run that paid for it can count it), else None."""
        if self._prefill_echo is not None:
            return self._prefill_echo, None
        usage: dict[str, Any] | None = None
        async with self._echo_lock:
            if self._prefill_echo is None:
                body: dict[str, Any] = {
                    "model": model, "max_tokens": 1, "temperature": 0,
                    "messages": [{"role": "user", "content": "Continue."},
                                 {"role": "assistant", "content": _ECHO_PROBE}],
                }
                if self.capabilities.kind == "vllm":
                    body.update(continue_final_message=True, add_generation_prompt=False)
                payload = await self.call_json("/chat/completions", body, owner=owner)
                choices = payload.get("choices") or [{}]
                content = (choices[0].get("message") or {}).get("content") or ""
                self._prefill_echo = content.startswith(_ECHO_PROBE)
                usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
                log.info("backend %s %s a prefill", self.name, "echoes" if self._prefill_echo else "does not echo")
        return self._prefill_echo, usage
