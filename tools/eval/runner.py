"""Running model strings over tasks through a proxy (one already running, or one started in-process): live, one
request per task and model string through the official SDK, or pooled (tools/eval/pooled.py)."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

from ttc_proxy.strategies.framework import Strategy

from .tasks import EvalError, Task


@dataclass(frozen=True)
class RunSettings:
    max_tokens: int = 48
    temperature: float | None = None
    seed: int | None = None  # task i (0-based, in file order) is sent with seed + i, for every model string
    timeout: float = 300.0
    concurrency: int = 4
    extra_body: dict[str, Any] = field(default_factory=dict)
    budgets: dict[str, dict[str, Any]] = field(default_factory=dict)  # a `ttc.budget` per model string
    stream: bool = False  # stream each request and time its first content token


@dataclass
class Record:
    """One task answered (or not) by one model string."""

    id: str
    model: str
    correct: bool
    reply: str | None
    extracted: str | None
    usage: dict[str, Any] | None
    backend_calls: int | None
    latency_ms: float
    error: str | None = None
    seed: int | None = None
    ttc: dict[str, Any] | None = None
    ttft_ms: float | None = None  # streamed requests: time to the first content token

    @property
    def answered(self) -> bool:
        return self.error is None

    def tokens(self, kind: str) -> int | None:
        """A usage count: prompt_tokens, completion_tokens, total_tokens, or cached_tokens (of the prompt tokens,
        those the engine served from its prefix cache; 0 when it does not say)."""
        usage = self.usage or {}
        if kind == "cached_tokens":
            details = usage.get("prompt_tokens_details")
            value = details.get("cached_tokens") if isinstance(details, dict) else None
            return value if isinstance(value, int) else (0 if usage else None)
        value = usage.get(kind)
        return value if isinstance(value, int) else None


def describe_error(exc: BaseException, timeout: float) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return f"timeout after {timeout:g} s"
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else None
        text = f"HTTP {exc.status_code}: {message or exc.message}"
    elif isinstance(exc, openai.APIConnectionError):
        text = f"connection error: {exc.__cause__ or exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def request_kwargs(model: str, task: Task, settings: RunSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model": model, "messages": task.messages, "max_tokens": settings.max_tokens}
    if settings.temperature is not None:
        kwargs["temperature"] = settings.temperature
    if settings.seed is not None:
        kwargs["seed"] = settings.seed + task.index
    extra = dict(settings.extra_body)
    if model in settings.budgets:
        extra["ttc"] = {**extra.get("ttc", {}), "budget": settings.budgets[model]}
    if extra:
        kwargs["extra_body"] = extra
    return kwargs


def record_from_response(model: str, task: Task, body: Mapping[str, Any], latency_ms: float,
                         seed: int | None) -> Record:
    choices = body.get("choices") or []
    if not choices:
        return Record(task.id, model, False, None, None, body.get("usage"), None, latency_ms,
                      error="the response has no choices", seed=seed)
    reply = (choices[0].get("message") or {}).get("content") or ""
    verdict = task.grade(reply)
    ttc = body.get("ttc") if isinstance(body.get("ttc"), dict) else None
    calls = ttc.get("backend_calls") if ttc is not None else 1  # a pass-through request is one backend call
    return Record(task.id, model, verdict.correct, reply, verdict.extracted, body.get("usage"),
                  calls if isinstance(calls, int) else None, latency_ms, seed=seed, ttc=ttc)


async def ask(client: Any, model: str, task: Task, settings: RunSettings) -> Record:
    """One request; any failure becomes the record's `error`, never an exception."""
    kwargs = request_kwargs(model, task, settings)
    seed = kwargs.get("seed")
    started = time.perf_counter()
    try:
        if settings.stream:
            body, first = await _streamed(client, kwargs)
            latency_ms = (time.perf_counter() - started) * 1000.0
            record = record_from_response(model, task, body, latency_ms, seed)
            record.ttft_ms = None if first is None else (first - started) * 1000.0
            return record
        response = await client.chat.completions.create(**kwargs)
        body = response.model_dump()
        latency_ms = (time.perf_counter() - started) * 1000.0
        return record_from_response(model, task, body, latency_ms, seed)
    except Exception as exc:  # noqa: BLE001 - one failed request is that task's error, not the run's
        latency_ms = (time.perf_counter() - started) * 1000.0
        return Record(task.id, model, False, None, None, None, None, latency_ms,
                      error=describe_error(exc, settings.timeout), seed=seed)


async def _streamed(client: Any, kwargs: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """A streamed request read to its end: a response body as a non-streamed one would have it (content, usage,
    the `ttc` object of the last chunk), and when its first content arrived (perf_counter)."""
    stream = await client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces: list[str] = []
    first: float | None = None
    usage: dict[str, Any] | None = None
    ttc: dict[str, Any] | None = None
    async for chunk in stream:
        data = chunk.model_dump()
        usage = data.get("usage") or usage
        ttc = data.get("ttc") if isinstance(data.get("ttc"), dict) else ttc
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                pieces.append(choice.delta.content)
    return {"choices": [{"message": {"content": "".join(pieces)}}], "usage": usage, "ttc": ttc}, first


class Progress:
    """One line on stderr, redrawn with \\r: the command's name, a bar, done/total, errors, elapsed seconds, the
    current model (for eval, pts and calibrate)."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True,
                 min_interval: float | None = None, name: str = "eval") -> None:
        self.total = total
        self.name = name
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        if min_interval is None:  # a terminal redraws cheaply; a log file keeps every redraw
            min_interval = 0.1 if getattr(self.stream, "isatty", lambda: False)() else 5.0
        self.min_interval = min_interval
        self.done = 0
        self.errors = 0
        self.label = ""
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._width = 0

    def line(self) -> str:
        filled = int(24 * self.done / self.total) if self.total else 24
        return (f"{self.name} [{'#' * filled}{'.' * (24 - filled)}] {self.done}/{self.total}  errors {self.errors}  "
                f"{time.monotonic() - self.started:.1f} s  {self.label}")

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last_draw < self.min_interval):
            return
        self._last_draw = now
        text = self.line()
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def start(self, label: str) -> None:
        self.label = label
        self.draw(force=True)

    def advance(self, ok: bool = True) -> None:
        """One item done (`ok`: without an error)."""
        self.done += 1
        self.errors += 0 if ok else 1
        self.draw(force=self.done == self.total)

    def close(self) -> None:
        if self.enabled:
            self.draw(force=True)
            self.stream.write("\n")
            self.stream.flush()


async def run_model(client: Any, model: str, tasks: Sequence[Task], settings: RunSettings,
                    progress: Progress) -> list[Record]:
    """Every task for one model string, at most `concurrency` requests in flight; records in task order."""
    gate = asyncio.Semaphore(settings.concurrency)
    progress.start(model)

    async def one(index: int, task: Task) -> Record:
        async with gate:
            record = await ask(client, model, task, settings)
        progress.advance(record.answered)
        return record

    return list(await asyncio.gather(*(one(i, task) for i, task in enumerate(tasks))))


async def run_eval(base_url: str, api_key: str, models: Sequence[str], tasks: Sequence[Task],
                   settings: RunSettings, progress: Progress) -> dict[str, list[Record]]:
    """The model strings one after another (so each one's latency is measured under its own load only)."""
    import openai

    results: dict[str, list[Record]] = {}
    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0,
                                  timeout=settings.timeout) as client:
        for model in models:
            results[model] = await run_model(client, model, tasks, settings, progress)
    return results


async def run_pooled(base_url: str, api_key: str, models: Sequence[str], tasks: Sequence[Task],
                     settings: RunSettings, pool_size: int, progress: Progress,
                     registry: Mapping[str, type[Strategy]]) -> dict[str, list[Record]]:
    """Strategy model strings scored on pools of samples per task (see tools/eval/pooled.py).

    Also reports the task prompt's pool oracle at each strategy sample count: how often some sample of the first
    k is right.
    """
    import aiohttp

    from ttc_proxy.proxy.backends import new_client_session
    from ttc_proxy.proxy.config import StrategySettings
    from ttc_proxy.strategies.framework import Sampling

    from .pooled import PooledScorer, TaskPools, parse_strategy_string

    parsed = {m: parse_strategy_string(m, registry) for m in models}
    strategy_settings = StrategySettings(default_max_tokens=settings.max_tokens, max_samples=max(64, pool_size))
    sampling = Sampling(settings.temperature, None, settings.max_tokens, None, None, dict(settings.extra_body))
    sizes = sorted({int(n) for p in parsed.values() if p is not None
                    for n in [p[0].params.get("n", 8)] if str(n).isdigit()})
    oracles = {f"oracle@{k} (some sample of {k} right)": k for k in sizes if k <= pool_size}
    results: dict[str, list[Record | None]] = {m: [None] * len(tasks) for m in [*models, *oracles]}

    async def one_task(index: int, task: Task, scorer: PooledScorer) -> None:
        seed = (settings.seed or 0) + task.index
        pools: dict[str, TaskPools] = {}  # by model: a failed draw is every model string's error on this task
        for model, (spec, base) in ((m, p) for m, p in parsed.items() if p is not None):
            task_pools = pools.setdefault(base, TaskPools(seed, pool_size, task.messages))
            started = time.perf_counter()
            try:
                outcome = await scorer.score(spec, base, task_pools, settings.budgets.get(model))
            except Exception as exc:  # noqa: BLE001 - a failed pool is that task's error, not the run's
                record = Record(task.id, model, False, None, None, None, None,
                                (time.perf_counter() - started) * 1000, error=f"{type(exc).__name__}: {exc}",
                                seed=seed)
            else:
                verdict = task.grade(outcome.reply) if outcome.reply is not None else None
                record = Record(task.id, model, bool(verdict and verdict.correct), outcome.reply,
                                verdict.extracted if verdict else None, outcome.usage, outcome.calls,
                                outcome.latency_ms, error=outcome.error, seed=seed,
                                ttc={"details": outcome.details, "pooled": True, "live_calls": outcome.live_calls,
                                     "budget_exhausted": outcome.budget_exhausted})
            results[model][index] = record
            progress.advance(record.answered)
        for label, k in oracles.items():
            base, task_pools = next(iter(pools.items()))
            try:
                await task_pools.main.ensure(range(k), scorer, base)
            except Exception:  # noqa: BLE001 - the draw's failure is already every model string's error
                continue
            pool = task_pools.main
            sample = [pool.candidates[i] for i in range(k)]
            right = [c for c in sample if task.grade(c.text).correct]
            usage = {"prompt_tokens": round(pool.prompt_tokens_per_sample * k),
                     "completion_tokens": sum(c.completion_tokens for c in sample)}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            results[label][index] = Record(task.id, label, bool(right), (right or sample)[0].text, None, usage, k,
                                           0.0, seed=seed)

    async with new_client_session(timeout=aiohttp.ClientTimeout(total=settings.timeout)) as client:
        scorer = PooledScorer(base_url, api_key, client, strategy_settings, sampling, registry)
        gate = asyncio.Semaphore(settings.concurrency)

        async def bounded(index: int, task: Task) -> None:
            async with gate:
                await one_task(index, task, scorer)

        progress.start(f"pool of {pool_size}")
        await asyncio.gather(*(bounded(i, t) for i, t in enumerate(tasks)))
    return {m: [r for r in records if r is not None] for m, records in results.items()}


# ---------------------------------------------------------------------------------------------------------------
# The proxy to evaluate through


class InProcessProxy:
    """create_app(config) under uvicorn in a background thread, on a free 127.0.0.1 port."""

    def __init__(self, config: Any, log_level: str = "warning") -> None:
        import uvicorn

        from ttc_proxy.proxy.app import create_app

        self.config = config
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])
        level = log_level.lower() if log_level.lower() in uvicorn.config.LOG_LEVELS else "warning"
        self.server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=self.port,
                                                    log_level=level, access_log=False))
        self.thread = threading.Thread(target=self._serve, daemon=True, name="eval-proxy")

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except SystemExit:  # uvicorn's way out when the app's startup (e.g. its engine) fails; logged already
            pass

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def startup_seconds(self) -> float:
        engines = [b.embedded.startup_timeout for b in self.config.backends if b.embedded is not None]
        return max(engines, default=0.0) + 60.0

    def __enter__(self) -> "InProcessProxy":
        self.thread.start()
        deadline = time.monotonic() + self.startup_seconds()
        while not self.server.started:
            if not self.thread.is_alive():
                self.socket.close()
                raise EvalError("the in-process proxy did not start (see the log above)")
            if time.monotonic() > deadline:
                self.__exit__()
                raise EvalError("the in-process proxy did not start in time")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.socket.close()


def proxy_base_url(url: str) -> str:
    """`http://host:port` or `http://host:port/v1` -> the SDK's base URL (ending in /v1)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the proxy a tool talks through (`proxy_endpoint` reads them): eval, pts, calibrate."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--proxy", metavar="URL", help="a running proxy, e.g. http://127.0.0.1:8000 "
                                                      "(default: start one in-process)")
    where.add_argument("--config", help="in-process proxy: config file (default: ./config.yaml if present, "
                                        "else the embedded local engine)")
    parser.add_argument("--backend", metavar="URL", help="in-process proxy: an OpenAI-compatible engine's base URL")
    parser.add_argument("--api-key", help="the proxy's API key (default: the in-process config's first key, "
                                          "else 'unused')")


@contextmanager
def proxy_endpoint(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(base URL, API key) of the proxy to evaluate through: --proxy, else one started in-process."""
    if args.proxy and args.backend:
        raise EvalError("--backend configures the in-process proxy; it cannot be used with --proxy")
    if args.proxy:
        yield proxy_base_url(args.proxy), args.api_key or "unused"
        return
    from ttc_proxy.proxy.config import ConfigError, resolve_config

    try:
        config = resolve_config(args.config, args.backend)
    except ConfigError as exc:
        raise EvalError(str(exc)) from exc
    key = args.api_key or next(iter(sorted(config.server.accepted_keys())), "unused")
    print("eval: starting the proxy in-process" + (" (and its embedded engine)" if any(
        b.embedded is not None for b in config.backends) else ""), file=sys.stderr, flush=True)
    with InProcessProxy(config, args.log_level) as server:
        yield server.base_url, key

