"""Servers in child processes for the project's measuring commands (bench, load): the scripted fake backend and
the proxy, each in its own process so that none shares an event loop (or the GIL) with another or with the
client; plus what a report says about the machine.

Every child ends itself when the process that started it is gone, and prints `PORT <n>` when it is about to serve.
"""

from __future__ import annotations

import asyncio
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ttc_proxy.proxy.config import ProxyConfig

HOST = "127.0.0.1"
BENCH_MODEL = "fake-model"  # the fake answers it at once
PACED_MODEL = "fake-paced"  # the fake answers it in `chunks` chunks `chunk_delay` apart (a model generating)
RECORDS_KEPT_SECONDS = 2.0  # the fake backend forgets a call this long after it ended (memory stays flat)


# ---------------------------------------------------------------------------------------------------------------
# The machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "nproc": usable,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in ("uvicorn", "uvloop", "httptools", "aiohttp", "starlette",
                                                        "fastapi", "pydantic")},
    }


def proxy_runtime(loop: str | None = None, http: str | None = None) -> tuple[str, str]:
    """The proxy's event loop and HTTP parser: the ones asked for, else the fastest installed."""
    return (loop or ("uvloop" if has_module("uvloop") else "asyncio"),
            http or ("httptools" if has_module("httptools") else "h11"))


def report_header(benchmark: str, started: float, load_before: list[float] | None) -> dict[str, Any]:
    """What every measuring command's report opens with: what ran, when, how long, on what machine and load."""
    return {
        "benchmark": benchmark,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": time.time() - started,
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": load_average()},
    }


def load_average() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, from /proc (Linux); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def has_module(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Child processes


def exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def run_loop(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def paced_script(chunks: int, chunk_delay: float) -> Callable[[dict[str, Any]], Any]:
    """The fake's script: PACED_MODEL answers `chunks` words, streamed `chunk_delay` apart (non-streaming: after as
    long); any other model at once."""
    from .fakebackend import FakeReply

    paced = FakeReply(texts=[" ".join(f"w{i}" for i in range(chunks))], chunk_delay=chunk_delay)
    paced_whole = FakeReply(texts=paced.texts, delay=chunks * chunk_delay)
    instant = FakeReply()
    return lambda body: (instant if body.get("model") != PACED_MODEL
                         else paced if body.get("stream") else paced_whole)


def backend_main(argv: Sequence[str]) -> None:
    """Child: the fake backend on 127.0.0.1 (argv: parent pid, slots, chunks, chunk delay in seconds); prints
    `PORT <n>` once it listens, then serves until terminated."""
    parent_pid, slots, chunks, chunk_delay = int(argv[0]), int(argv[1]), int(argv[2]), float(argv[3])
    exit_with_parent(parent_pid)
    from .fakebackend import FakeBackend

    async def main() -> None:
        fake = FakeBackend(slots=slots, model=BENCH_MODEL)
        fake.script = paced_script(chunks, chunk_delay)
        await fake.start()
        print(f"PORT {fake.port}", flush=True)
        while True:  # the fake records every call; keep its memory flat
            await asyncio.sleep(1.0)
            fake.forget_ended(RECORDS_KEPT_SECONDS)

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        run_loop(main())
    except KeyboardInterrupt:
        pass


def proxy_main(argv: Sequence[str]) -> None:
    """Child: the proxy (argv: parent pid, its config as JSON, loop, http parser), one uvicorn worker, logging as
    `ttc-proxy serve` does by default (its access log at INFO, one line per request, to the child's stderr file);
    prints `PORT <n>` before it starts."""
    parent_pid, config_json, loop, http = int(argv[0]), argv[1], argv[2], argv[3]
    exit_with_parent(parent_pid)
    import uvicorn

    from ttc_proxy.proxy.access_log import configure_logging
    from ttc_proxy.proxy.app import create_app

    configure_logging("info", "text")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(ProxyConfig.model_validate_json(config_json)), host=HOST, port=port,
                            loop=loop, http=http, access_log=False, log_config=None, workers=1, lifespan="on",
                            backlog=2048)
    print(f"PORT {port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


class ChildFailed(RuntimeError):
    """A child process did not start, answer or finish as it should."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _python_c(entry: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from ttc_proxy.tools.servers import {entry}; {entry}(sys.argv[1:])"]


class ChildServer:
    """A server child process that prints `PORT <n>` when it is about to serve."""

    def __init__(self, name: str, key: str, entry: str, args: Sequence[str]) -> None:
        self.name = name
        self.key = key
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(_python_c(entry) + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=child_env())
        self.port = 0

    def wait_port(self, timeout: float = 30.0) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"{self.name} did not start within {timeout:.0f} s{self.stderr_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                byte = os.read(self.proc.stdout.fileno(), 1)
                if not byte:
                    raise ChildFailed(f"{self.name} exited with {self.proc.wait()}{self.stderr_tail()}")
                line += byte
        if not line.startswith(b"PORT "):
            raise ChildFailed(f"{self.name} said {line!r}{self.stderr_tail()}")
        self.port = int(line.split()[1])
        return self.port

    def stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f":\n{text[-3000:]}" if text else ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ChildFailed(f"{self.name} exited with {self.proc.returncode}{self.stderr_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


def wait_healthy(port: int, path: str, child: ChildServer, timeout: float = 60.0) -> None:
    """Poll GET `path` until 200: the proxy listens only once its lifespan (backend discovery) is done."""
    deadline = time.monotonic() + timeout
    request = f"GET {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\nconnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            with socket.create_connection((HOST, port), timeout=2) as sock:
                sock.sendall(request)
                head = sock.recv(64)
            if head.startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise ChildFailed(f"{child.name} at port {port} was not healthy within {timeout:.0f} s{child.stderr_tail()}")


def start_backend(slots: int, chunks: int = 0, chunk_delay: float = 0.0) -> ChildServer:
    """The fake backend in its own process, listening and healthy (see backend_main)."""
    backend = ChildServer("fake backend", "backend", "backend_main",
                          [str(os.getpid()), str(slots), str(chunks), str(chunk_delay)])
    try:
        wait_healthy(backend.wait_port(), "/health", backend)
    except BaseException:
        backend.stop()
        raise
    return backend


def start_proxy(config: ProxyConfig, loop: str, http: str) -> ChildServer:
    """The proxy in its own process with `config`, listening and healthy (see proxy_main)."""
    proxy = ChildServer("proxy", "proxy", "proxy_main", [str(os.getpid()), config.model_dump_json(), loop, http])
    try:
        wait_healthy(proxy.wait_port(), "/health", proxy)
    except BaseException:
        proxy.stop()
        raise
    return proxy


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C while the block runs, so the child processes are ended on the way out."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
