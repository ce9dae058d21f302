"""Other real engines on this machine: vLLM (CPU build) and `transformers serve`, in their own venv (`make engines`),
serving a Hugging Face folder converted from the packaged SmolLM2 GGUF (tools/engines/convert_gguf.py).

`ttc-proxy engine vllm|transformers` starts one on a free loopback port and prints its base URL and the
`backends:` entry for it; `running_engine` does the same for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ttc_proxy.proxy.backends.engine import die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[2]
ENGINES_VENV = ROOT / ".venv-engines"
MODEL_FOLDER = ROOT / "build" / "smollm2-hf"
SERVED_NAME = "smollm2"
KINDS = ("vllm", "transformers")
SMOLLM2_CHATML = {"message": "<|im_start|>{role}\n{content}<|im_end|>\n",
                  "generation_prompt": "<|im_start|>assistant\n"}


class EngineError(Exception):
    """An engine could not be started (not installed, or it did not come up)."""


def engine_command(kind: str, port: int, folder: Path = MODEL_FOLDER) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that serve `folder` with `kind` on 127.0.0.1:port."""
    python = ENGINES_VENV / "bin" / "python"
    # One OpenMP thread: with two on this 2-core machine the engines fight the proxy for the cores and crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kind == "vllm":
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB of KV cache
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                "--served-model-name", SERVED_NAME, "--dtype", "bfloat16", "--max-model-len", "2048",
                "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)], env
    if kind == "transformers":
        # It scans the Hugging Face cache at start and fails when there is none; nothing is fetched (offline).
        cache = ROOT / "build" / "hf-cache"
        cache.mkdir(parents=True, exist_ok=True)
        env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
        return [str(ENGINES_VENV / "bin" / "transformers"), "serve", str(folder), "--host", "127.0.0.1",
                "--port", str(port), "--device", "cpu"], env
    raise EngineError(f"unknown engine {kind!r}; known: {', '.join(KINDS)}")


def backend_entry(kind: str, base_url: str, folder: Path = MODEL_FOLDER) -> str:
    """The config.yaml `backends:` entry for a started engine."""
    if kind == "vllm":
        return f"  - name: vllm\n    kind: vllm\n    base_url: {base_url}\n    models: [{SERVED_NAME}]"
    # transformers serve wants the folder path as the model name; clients keep using "smollm2". It has no
    # template endpoint: SmolLM2's ChatML, configured, lets the strategies that continue a reply use its raw
    # /v1/completions (SmolLM2's own template also adds a default system message when there is none).
    return (f"  - name: transformers\n    kind: transformers\n    base_url: {base_url}\n"
            f"    model_names: {{{SERVED_NAME}: {folder}}}\n"
            f"    chat_template: {json.dumps(SMOLLM2_CHATML)}")


@contextmanager
def running_engine(kind: str, *, port: int | None = None, startup_timeout: float = 900.0,
                   log: Path | None = None) -> Iterator[str]:
    """Start an engine, wait until GET /v1/models answers, yield its base URL; stop it on exit."""
    if not (ENGINES_VENV / "bin" / "python").exists():
        raise EngineError(f"{ENGINES_VENV} is missing: run `make engines` first")
    if not (MODEL_FOLDER / "config.json").exists():
        raise EngineError(f"{MODEL_FOLDER} is missing: run `make engines` first")
    port = port or free_port("127.0.0.1")
    argv, env = engine_command(kind, port)
    output = open(log, "wb") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(argv, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=die_with_parent)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise EngineError(f"{kind} exited with status {process.returncode} while starting"
                                  + (f" (log: {log})" if log else ""))
            try:
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise EngineError(f"{kind} did not answer within {startup_timeout:g} s")
            time.sleep(1)
        yield base_url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if output is not subprocess.DEVNULL:
            output.close()  # type: ignore[union-attr]


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser("engine", help="start vLLM or transformers serve (installed by `make engines`)",
                                 description="Starts vLLM (CPU) or `transformers serve` on SmolLM2 converted from "
                                             "the packaged GGUF, on a loopback port, until interrupted; prints its "
                                             "base URL and the config.yaml entry for it.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--port", type=int, help="default: a free port")
    parser.add_argument("--log", help="write the engine's output to this file")
    parser.set_defaults(handler=engine_command_line)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a service manager, `kill`) stops the engine too: raising here runs the context manager's exit."""
    raise KeyboardInterrupt


def engine_command_line(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        started = time.monotonic()
        with running_engine(args.kind, port=args.port, log=Path(args.log) if args.log else None) as base_url:
            print(f"{args.kind} serves {SERVED_NAME} at {base_url} (ready in {time.monotonic() - started:.0f} s)\n"
                  f"config.yaml:\nbackends:\n{backend_entry(args.kind, base_url)}", flush=True)
            while True:
                time.sleep(3600)
    except EngineError as exc:
        print(f"ttc-proxy engine: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
