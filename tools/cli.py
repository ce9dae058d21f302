"""The `ttc-proxy` command: serve (the proxy), and the tools: eval, report, bench, bench-strategy, load, calibrate,
probe, pts, strategies, trace, tune."""

from __future__ import annotations

import argparse
import logging
import sys

from ttc_proxy.proxy.config import ConfigError, resolve_config

from .argtypes import positive_int


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ttc_proxy.proxy.access_log import configure_logging
    from ttc_proxy.proxy.app import create_app

    try:
        config = resolve_config(args.config, args.backend)
    except ConfigError as exc:
        print(f"ttc-proxy: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers or config.server.workers
    if workers > 1:
        from ttc_proxy.proxy.replicas import WorkerSetup, run_workers

        run_workers(config, WorkerSetup(args.config, args.backend, workers, args.log_level, args.log_format),
                    host=host, port=port)
        return 0
    # log_config=None: uvicorn's own lines go through the handler configure_logging set (JSON too, if asked)
    uvicorn.run(create_app(config), host=host, port=port, log_level=args.log_level, access_log=False, log_config=None,
                timeout_graceful_shutdown=config.server.shutdown_timeout_seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ttc-proxy", description="OpenAI-compatible test-time-compute proxy")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run the proxy")
    serve_parser.add_argument("--config", help="config file (default: ./config.yaml if present)")
    serve_parser.add_argument("--backend", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1")
    serve_parser.add_argument("--host")
    serve_parser.add_argument("--port", type=int)
    serve_parser.add_argument("--log-level", default="info")
    serve_parser.add_argument("--log-format", choices=("text", "json"), default="text",
                              help="log lines as text or as JSON objects (the access log's fields as keys)")
    serve_parser.add_argument("--workers", type=positive_int,
                              help="proxy worker processes (default: server.workers, 1); each takes 1/N of every "
                                   "backend's bounds; an embedded engine is started once, shared")
    serve_parser.set_defaults(handler=serve)

    from . import bench, calibrate, engines, load, probe, pts, strategies, strategy_bench, trace, tune
    from . import eval as evaluation
    from .eval import regenerate

    for command in (bench, calibrate, engines, evaluation, regenerate, load, probe, pts, strategies, strategy_bench,
                    trace, tune):
        command.add_parser(commands)

    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO)
                        if hasattr(args, "log_level") else logging.INFO)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
