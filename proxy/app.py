"""The HTTP surface: OpenAI-compatible endpoints. It routes requests and knows no particular strategy."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ttc_proxy.strategies.framework import Strategy

from .access_log import AccessLogMiddleware, EngineCalls, access_record
from .backends import Backend, new_client_session
from .backends.backend import refuse_if_down
from .backends.engine import LocalEngine
from .backends.scheduler import share_bounds
from .config import ProxyConfig
from .console import ASSETS as CONSOLE_ASSETS, asset as console_asset
from .errors import (
    CLIENT_CLOSED,
    ClientDisconnected,
    InvalidRequest,
    NotFound,
    ProxyError,
    RequestTooLarge,
    Unauthorized,
)
from .wire.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    validate_request,
)
from .catalogue import strategy_list
from .openapi import openapi_document
from .passthrough import pass_through
from .metrics import PASS_THROUGH, ProxyMetrics
from .observing import ObservingMiddleware, request_labels
from .registry import load_registry
from .optillm import read_optillm_request
from .routing import Route, did_you_mean, resolve_route
from .telemetry import Telemetry, otlp_configured
from .runs.admission import check_strategy_request, sampling_of
from .runs.run import StrategyRequest, StrategyRun
from .runs.validation import (
    check_budget,
    check_capabilities,
    check_engine_fields,
    check_references,
    check_request_fits,
    check_spec,
)
from .runs.verifier import VerifierClient
from .streaming import EventStreamResponse, until_disconnect
from .trace_stores import open_trace_store
from .traces import TraceStore

log = logging.getLogger("ttc_proxy.app")

# How long start-up waits for the backends' capability discovery before serving (a backend that answers takes
# milliseconds; one still silent then is down until it answers, and /health is up meanwhile).
DISCOVERY_GRACE_SECONDS = 1.0
MAX_LISTED_TRACES = 200
# The console runs its own script and style only and talks to this proxy only.
CONSOLE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
                  "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


@dataclass
class ProxyState:
    """Everything the app owns for its lifetime; created in the lifespan, never at import."""

    config: ProxyConfig
    registry: Mapping[str, type[Strategy]]
    traces: TraceStore
    backends: dict[str, Backend] = field(default_factory=dict)
    api_keys: frozenset[str] = frozenset()
    verifiers: VerifierClient | None = None
    metrics: ProxyMetrics | None = None
    telemetry: Telemetry | None = None
    pivot_sets: dict[str, list[dict[str, Any]]] = field(init=False)  # config `pivots:`, by name, for every run
    openapi: dict[str, Any] = field(init=False)  # GET /openapi.json
    strategies: dict[str, Any] = field(init=False)  # GET /v1/strategies

    def __post_init__(self) -> None:
        self.pivot_sets = {name: pivots.records for name, pivots in self.config.pivots.items()}
        self.openapi = openapi_document(self.registry)
        self.strategies = strategy_list(self.registry)

    def backends_for(self, route: Route) -> list[Backend]:
        """The backends serving the route's model that are not down, best first: healthy before passed-over ones,
        then the least loaded (config order breaks ties). A name no backend serves is a 404 listing what is served;
        when all that serve it are down, a 503 naming them."""
        if route.backend_name is not None:
            chosen = [self.backends[route.backend_name]]
            refuse_if_down(chosen)
            return chosen
        serving = [b for b in self.backends.values() if b.serves(route.model)]
        if not serving:
            known = sorted({m for b in self.backends.values() for m in b.served_models})
            raise NotFound(f"no backend serves model {route.model!r}; served models: {', '.join(known)}."
                           f"{did_you_mean(route.model, self.registry)}",
                           param="model", code="model_not_found")
        ordered = sorted(serving, key=lambda b: (not b.healthy, b.load))
        refuse_if_down(ordered)
        return [b for b in ordered if not b.down]  # one failing its health checks is sent nothing

    def backend_for(self, route: Route) -> Backend:
        return self.backends_for(route)[0]

    def authorize(self, headers: Mapping[str, str]) -> str | None:
        """The id of the proxy key the request carries (key_id: a digest, never the key); None without keys."""
        if not self.api_keys:
            return None
        key = supplied_key(headers)
        # compared in constant time with every key, so timing tells nothing about how much of a key matched
        if not any([hmac.compare_digest(key, known.encode()) for known in self.api_keys]):
            raise Unauthorized("invalid or missing API key for this proxy")
        return key_id(key)

    async def read_body(self, request: Request) -> bytes:
        """The request body, refused (413) above `server.max_body_bytes` before or while it is read."""
        limit = self.config.server.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"the request body is {int(declared):,} bytes; the limit is {limit:,} "
                                  f"(server.max_body_bytes)")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"the request body is over the limit of {limit:,} bytes "
                                      f"(server.max_body_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)


def _discovered(backend: Backend, config: ProxyConfig) -> None:
    share_bounds(backend.name, backend.scheduler, config.server.sharing())
    log.info("backend %s at %s: %s", backend.name, backend.base_url, backend.capabilities)


def supplied_key(headers: Mapping[str, str]) -> bytes:
    """The proxy key a request carries: `Authorization: Bearer KEY`, else `api-key: KEY` (Azure's header)."""
    supplied = headers.get("authorization", "")
    return (supplied[7:] if supplied.lower().startswith("bearer ") else headers.get("api-key", "")).encode()


def _key_id_of(headers: Mapping[str, str]) -> str | None:
    key = supplied_key(headers)
    return key_id(key) if key else None


def key_id(key: bytes) -> str:
    """A proxy key's name in traces and logs: enough of its SHA-256 to tell keys apart, nothing to recover it."""
    return "key-" + hashlib.sha256(key).hexdigest()[:16]


def error_response(exc: ProxyError, request_id: str | None = None) -> JSONResponse:
    headers = dict(exc.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        # NaN and Infinity are Python's, not JSON's: an engine sent them could fail in ways of its own
        body = json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:
        raise InvalidRequest("the request body is nested too deeply", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    return body


def create_app(config: ProxyConfig, registry: Mapping[str, type[Strategy]] | None = None) -> FastAPI:
    """The proxy as an ASGI app. `registry`: the strategies it serves (default: built-ins and installed plugins)."""
    metrics = ProxyMetrics() if config.telemetry.metrics else None
    telemetry = Telemetry(config.telemetry) if otlp_configured(config.telemetry) else None
    app = FastAPI(title="ttc-proxy", lifespan=_lifespan(config, registry, metrics, telemetry), docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.add_middleware(AccessLogMiddleware, identify=_key_id_of)
    if metrics is not None or telemetry is not None:
        app.add_middleware(ObservingMiddleware, metrics=metrics, telemetry=telemetry)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    # Plain Starlette routes: the handlers read raw requests, so FastAPI's per-request machinery is not needed.
    _add_discovery_routes(app)
    _add_observing_routes(app)
    _add_generation_routes(app)
    return app


# ---- the app's lifetime: backends and engines up before the first request, everything stopped after the last ----

def _lifespan(config: ProxyConfig, registry: Mapping[str, type[Strategy]] | None, metrics: ProxyMetrics | None,
              telemetry: Telemetry | None) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        strategies = registry if registry is not None else load_registry()[0]
        engines: list[LocalEngine] = []
        background: list[asyncio.Task[None]] = []  # health checks, and discoveries still waiting for an answer
        async with new_client_session(limit=1024) as client, open_trace_store(config.server) as traces:
            state = ProxyState(config, strategies, traces, api_keys=config.server.accepted_keys(),
                               metrics=metrics, telemetry=telemetry)
            state.verifiers = VerifierClient(config.verifiers, client)
            try:
                await _start_backends(state, client, engines, background)
                app.state.proxy = state
                yield
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                for engine in engines:
                    await engine.stop()
                if telemetry is not None:
                    await asyncio.to_thread(telemetry.shutdown)  # sends the spans still buffered

    return lifespan


async def _start_backends(state: ProxyState, client: aiohttp.ClientSession, engines: list[LocalEngine],
                          background: list[asyncio.Task[None]]) -> None:
    """Every configured backend (an embedded engine started first), with its health checks and discovery running
    in `background`; returns once the backends that answer are discovered, or after the grace period."""
    config = state.config
    discoveries: list[asyncio.Task[None]] = []
    for backend_config in config.backends:
        base_url = backend_config.base_url
        if backend_config.embedded is not None:
            engine = LocalEngine(backend_config.embedded)
            engines.append(engine)
            await engine.start()
            base_url = engine.base_url
        assert base_url is not None
        backend = Backend(backend_config, base_url, client)
        backend.metrics = state.metrics
        if state.telemetry is not None:
            backend.trace_headers = state.telemetry.outgoing_headers
        state.backends[backend.name] = backend
        discoveries.append(asyncio.create_task(backend.discover_in_background(
            lambda backend=backend: _discovered(backend, config))))
        background.append(asyncio.create_task(backend.check_health_forever()))
    background.extend(discoveries)
    # Backends that answer come up before the first request; a silent one holds nothing up: it stays down (503
    # naming it) while its discovery goes on in the background.
    if discoveries:
        await asyncio.wait(discoveries, timeout=min(DISCOVERY_GRACE_SECONDS, max(
            b.timeouts.discovery for b in config.backends)))


# ---- errors outside the handlers: unknown paths and methods, and what no handler caught ----

async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = ProxyError(str(exc.detail), status_code=exc.status_code)
    error.error_type = "invalid_request_error"
    error.code = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
    return error_response(error)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(ProxyError(f"internal error: {type(exc).__name__}", code="internal_error"))


# ---- discovery: liveness, the API document, what models and strategies are served ----

def _add_discovery_routes(app: FastAPI) -> None:
    app.add_route("/health", _health, methods=["GET"])
    app.add_route("/openapi.json", _openapi, methods=["GET"])
    app.add_route("/v1/models", _list_models, methods=["GET"])
    app.add_route("/v1/strategies", _list_strategies, methods=["GET"])


async def _health(request: Request) -> JSONResponse:
    state: ProxyState = request.app.state.proxy
    try:
        state.authorize(request.headers)
    except Unauthorized:  # liveness for anyone; which backends, where and how busy only for key holders
        return JSONResponse({"status": "ok"})
    return JSONResponse({
        "status": "ok",
        "backends": {
            name: {"url": b.base_url, "kind": b.capabilities.kind, "max_n": b.capabilities.max_n,
                   "in_flight": b.scheduler.in_use, "queued": b.scheduler.queued, "down": b.down,
                   **({"down_reason": b.down_reason} if b.down else {})}
            for name, b in state.backends.items()
        },
    })


async def _openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.proxy.openapi)


async def _list_models(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    try:
        state.authorize(request.headers)
    except ProxyError as exc:
        return error_response(exc)
    created = int(time.time())
    entries: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(model_id: str, owner: str, **extra: Any) -> None:
        if model_id not in seen:
            seen.add(model_id)
            entries.append({"id": model_id, "object": "model", "created": created, "owned_by": owner, **extra})

    for backend in state.backends.values():
        for model in backend.served_models:
            add(model, backend.name)
            for slug in sorted(state.registry):
                add(f"{slug}-{model}", "ttc-proxy", ttc={"strategy": slug, "model": model})
    for alias, target in state.config.aliases.items():
        add(alias, "ttc-proxy", ttc={"strategy": target.strategy, "model": target.model, "params": target.params})
    return JSONResponse({"object": "list", "data": entries})


async def _list_strategies(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    try:
        state.authorize(request.headers)
    except ProxyError as exc:
        return error_response(exc)
    return JSONResponse(state.strategies)


# ---- observing: traces, metrics and the console ----

def _add_observing_routes(app: FastAPI) -> None:
    app.add_route("/v1/traces", _list_traces, methods=["GET"])
    app.add_route("/v1/traces/{trace_id}", _get_trace, methods=["GET"])
    app.add_route("/metrics", _get_metrics, methods=["GET"])
    app.add_route("/ui", _console, methods=["GET"])
    app.add_route("/ui/{name}", _console, methods=["GET"])


async def _get_trace(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    trace_id = request.path_params["trace_id"]
    try:
        owner = state.authorize(request.headers)
        trace = await state.traces.get(trace_id, owner)  # another key's trace is absent, as an unknown id
        if trace is None:
            raise NotFound(f"no trace {trace_id!r} for this key ({state.traces.describe()})",
                           param="trace_id", code="trace_not_found")
    except ProxyError as exc:
        return error_response(exc)
    return Response(trace, media_type="application/json")


async def _list_traces(request: Request) -> Response:
    """GET /v1/traces?limit=N: this key's latest traces (the console's list), newest first."""
    state: ProxyState = request.app.state.proxy
    raw_limit = request.query_params.get("limit", "50")
    try:
        owner = state.authorize(request.headers)
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LISTED_TRACES:
            raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LISTED_TRACES}", param="limit",
                                 code="invalid_value")
        bodies = await state.traces.recent(owner, int(raw_limit))
    except ProxyError as exc:
        return error_response(exc)
    return Response(b'{"object":"list","data":[' + b",".join(bodies) + b"]}", media_type="application/json")


async def _get_metrics(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    try:
        state.authorize(request.headers)
        if state.metrics is None:
            raise NotFound("metrics are off (telemetry.metrics: false)", code="metrics_off")
    except ProxyError as exc:
        return error_response(exc)
    text, content_type = state.metrics.exposition()
    return Response(text, media_type=content_type)


async def _console(request: Request) -> Response:
    """GET /ui and its two files: static, holding nothing private (the page fetches with the key entered)."""
    enabled = request.app.state.proxy.config.telemetry.console
    name = request.path_params.get("name", "index.html")
    body = console_asset(name) if enabled else None
    if body is None:
        return error_response(NotFound(f"no console file {name!r}" if enabled
                                       else "the console is off (telemetry.console: false)", code="not_found"))
    return Response(body, media_type=CONSOLE_ASSETS[name],
                    headers={"content-security-policy": CONSOLE_POLICY, "x-content-type-options": "nosniff"})


# ---- generation: the completions endpoints (pass-through or a strategy run) and the engines' tokenizers ----

def _add_generation_routes(app: FastAPI) -> None:
    app.add_route("/v1/chat/completions", _chat_completions, methods=["POST"])
    app.add_route("/v1/completions", _completions, methods=["POST"])
    for prefix in ("", "/v1"):  # at the root as vLLM serves them, and beside the OpenAI API for SDK base URLs
        app.add_route(f"{prefix}/tokenize", _tokenize, methods=["POST"])
        app.add_route(f"{prefix}/detokenize", _detokenize, methods=["POST"])


async def _chat_completions(request: Request) -> Response:
    return await _serve(request, "/chat/completions", ChatCompletionRequest)


async def _completions(request: Request) -> Response:
    return await _serve(request, "/completions", CompletionRequest)


async def _tokenize(request: Request) -> Response:
    return await _tokenizer(request, detokenize=False)


async def _detokenize(request: Request) -> Response:
    return await _tokenizer(request, detokenize=True)


def _tokenizer_backend(state: ProxyState, model: str, needs: tuple[str, ...]) -> tuple[Backend, str]:
    """The backend serving a plain model name (a strategy name is a 400) and the model's name there, if the backend
    offers `needs`."""
    route = resolve_route(model, None, state.config, state.registry)
    if route.spec is not None:
        raise InvalidRequest(f"model {model!r} runs strategy {route.spec.slug!r}; tokenizing takes a plain model name",
                             param="model", code="invalid_model")
    backend = state.backend_for(route)
    missing = [c for c in needs if not backend.capabilities.supports(c)]
    if missing:
        raise InvalidRequest(
            f"backend {backend.name!r} ({backend.capabilities.kind}) does not offer {', '.join(missing)}; set its "
            f"capabilities in config.yaml if it does", param="model", code="backend_capability_missing")
    return backend, backend.engine_model(route.model)


async def _tokenizer(request: Request, *, detokenize: bool) -> Response:
    """POST /tokenize and /detokenize (vLLM's shapes), routed by model like the completions endpoints. Engine
    utility calls, not generation: they take no scheduler slot."""
    state: ProxyState = request.app.state.proxy
    try:
        state.authorize(request.headers)
        body = parse_json_object(await state.read_body(request))
        if detokenize:
            parsed = validate_request(DetokenizeRequest, body)
            backend, model = _tokenizer_backend(state, parsed.model, ("tokenize",))
            text = await backend.detokenize(model, parsed.tokens)
            return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
        parsed = validate_request(TokenizeRequest, body)
        messages = parsed.messages
        backend, model = _tokenizer_backend(state, parsed.model, ("tokenize",) if messages is None
                                            else ("tokenize", "render"))
        text = parsed.prompt
        if messages is not None:
            text = await backend.render(model, [m.model_dump(exclude_none=True) for m in messages],
                                        parsed.add_generation_prompt)
        assert text is not None
        ids = await backend.tokenize(model, text)
        return JSONResponse(TokenizeResponse(tokens=ids, count=len(ids)).model_dump())
    except ProxyError as exc:
        return error_response(exc)


async def _serve(request: Request, path: str, schema: type[Any]) -> Response:
    state: ProxyState = request.app.state.proxy
    client_id = request.headers.get("x-request-id")
    # Kept only if it can go on to the backend as a header as is (printable ASCII, bounded); else our own.
    usable = client_id and len(client_id) <= 256 and client_id.isascii() and client_id.isprintable()
    request_id = client_id if usable else uuid.uuid4().hex
    try:
        key = state.authorize(request.headers)
        body = read_optillm_request(parse_json_object(await state.read_body(request)))
        parsed = validate_request(schema, body)
        access = access_record(request.scope)
        access.model = parsed.model
        labels = request_labels(request.scope)
        labels.client_model = parsed.model
        route = resolve_route(parsed.model, body.pop("ttc", None), state.config, state.registry)
        if route.spec is None:
            labels.strategy = PASS_THROUGH
            calls = EngineCalls()
            access.sources.append(calls)
            candidates = state.backends_for(route)
            labels.model = route.model  # a served model (backends_for found it): never a name the client made up
            return await pass_through(request, candidates, path, body, route, request_id, calls)
        # Everything that does not depend on the backend is checked before its health is: a request that can
        # never succeed is a 400 whatever the engine's state (a 503 would be retried by the SDKs).
        if path != "/chat/completions":
            raise InvalidRequest("strategies run on /v1/chat/completions; /v1/completions is pass-through only",
                                 param="model", code="unsupported_by_strategy")
        checked = check_spec(route.spec, state.registry, state.config.strategies, model=route.model)
        labels.strategy = ">".join(level.slug for level, _ in checked)  # registered slugs only
        labels.composition = route.spec.describe()
        strategy, params = checked[0]
        check_strategy_request(strategy, parsed, body, [level for level, _ in checked], state.registry)
        budget = check_budget(route.budget, state.config.strategies.budget)
        sampling = sampling_of(parsed, body, state.config.strategies)
        check_request_fits(checked, sampling)
        backend = state.backend_for(route)
        labels.model = route.model
        for level, level_params in checked:
            check_capabilities(level, backend, level_params)
            check_references(level, level_params, state.config.verifiers,
                             lambda model: state.backend_for(Route(None, model)), state.config.pivots)
        job = StrategyRequest(
            spec=route.spec,
            strategy=strategy,
            params=params,
            budget=budget,
            request=parsed,
            raw_body=body,
            client_model=parsed.model,
            backend=backend,
            backend_model=backend.engine_model(route.model),
            request_id=request_id,
            key_id=key,
        )
        check_engine_fields(backend, set(sampling.extra))
        run = StrategyRun(job, state.config.strategies, state.registry, state.traces,
                          backend_for=lambda model: state.backend_for(Route(None, model)),
                          verifiers=state.verifiers,
                          pivot_sets=state.pivot_sets,
                          trace_observer=state.telemetry.run_spans(route.spec.describe(), body.get("messages") or [])
                          if state.telemetry is not None else None)
        access.sources.append(run)
        labels.runs.append(run)
        if parsed.stream:
            return EventStreamResponse(run.stream(state.config.server.keepalive_seconds),
                                       {"x-request-id": request_id})  # type: ignore[return-value]
        result = await until_disconnect(request.receive, run.execute())
        return JSONResponse(run.response_body(result), headers={"x-request-id": request_id})
    except ProxyError as exc:
        return error_response(exc, request_id)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)
