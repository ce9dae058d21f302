"""Several proxy processes as one: `ttc-proxy serve --workers N`, and what each process takes of the shared backends.

uvicorn starts workers by importing an app factory in fresh processes, so the parent hands each one what it
resolved (the config's source, the engines it started) through the environment: `worker_app` reads it. An
embedded llama-server is started once, by the parent, before the workers; each worker is pointed at its URL.
Strategies and pass-through keep no state between requests; traces do (`server.trace_store: redis://…` shares
them), and so does what a backend taught a process (capabilities, down marks): each worker learns its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI

from .access_log import configure_logging
from .app import create_app
from .backends.engine import LocalEngine
from .config import ProxyConfig, resolve_config

log = logging.getLogger("ttc_proxy.replicas")

WORKER_ENV = "TTC_PROXY_WORKER"


@dataclass
class WorkerSetup:
    """What a worker needs to rebuild the parent's config: where it came from, the engines the parent started
    (backend name -> URL) and the worker count. Never the config itself, so no key travels in the environment."""

    config_path: str | None
    backend_url: str | None
    workers: int
    log_level: str = "info"
    log_format: str = "text"
    engine_urls: dict[str, str] = field(default_factory=dict)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "WorkerSetup":
        raw = os.environ.get(WORKER_ENV)
        if not raw:
            raise RuntimeError(f"{WORKER_ENV} is not set: worker_app is started by `ttc-proxy serve --workers N`")
        return cls(**json.loads(raw))

    def config(self) -> ProxyConfig:
        return worker_config(resolve_config(self.config_path, self.backend_url), self.workers, self.engine_urls)


def worker_config(config: ProxyConfig, workers: int, engine_urls: dict[str, str]) -> ProxyConfig:
    """The config as each worker runs it: `workers` set, and every embedded engine replaced by the URL of the one
    the parent started (same kind, so its slots are learned from /props as before)."""
    backends = [
        b.model_copy(update={"base_url": engine_urls[b.name], "embedded": None}) if b.embedded is not None else b
        for b in config.backends
    ]
    server = config.server.model_copy(update={"workers": workers})
    return config.model_copy(update={"backends": backends, "server": server})


def worker_app() -> FastAPI:
    """The uvicorn factory each worker process calls (`proxy.replicas:worker_app`)."""
    setup = WorkerSetup.from_env()
    # A worker is a fresh interpreter: the parent's logging set-up did not come with it.
    configure_logging(setup.log_level, setup.log_format)
    config = setup.config()
    if config.server.trace_store == "memory":
        log.warning("traces are kept per worker (server.trace_store: memory): a trace is found only by the worker "
                    "that ran it; set server.trace_store to a Redis URL to share them")
    return create_app(config)


def run_workers(config: ProxyConfig, setup: WorkerSetup, *, host: str, port: int) -> None:
    """Serve with `setup.workers` uvicorn worker processes: the embedded engines started once, here, before them
    (the workers share each one), and stopped after the last worker has exited."""
    import uvicorn

    engines = {b.name: LocalEngine(b.embedded) for b in config.backends if b.embedded is not None}
    try:
        for engine in engines.values():
            asyncio.run(engine.start())
        setup.engine_urls = {name: engine.base_url for name, engine in engines.items()}
        os.environ[WORKER_ENV] = setup.to_env()
        uvicorn.run("ttc_proxy.proxy.replicas:worker_app", factory=True, workers=setup.workers, host=host, port=port,
                    log_level=setup.log_level, access_log=False,
                    timeout_graceful_shutdown=config.server.shutdown_timeout_seconds)
    finally:
        for engine in engines.values():
            asyncio.run(engine.stop())
