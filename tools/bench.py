"""`ttc-proxy bench`: what the proxy itself adds in pass-through.

Three processes, so that none shares an event loop (or the GIL) with another:

* the backend: tools.fakebackend.FakeBackend on raw asyncio (uvloop when installed), answering at once;
* the proxy: create_app(config_for_backend_url(backend)) under one uvicorn worker (uvloop + httptools);
* the load generator: a minimal raw-asyncio HTTP/1.1 keep-alive client (an asyncio.Protocol that writes
  request bytes and parses status line, headers, content-length bodies and chunked server-sent events).
  A full client such as httpx would spend more CPU per request than the proxy does, on a 2-core machine.

Each scenario runs once straight at the backend and once through the proxy; the difference is the proxy's cost:

* 1 connection, sequential, non-streaming: latency p50/p99;
* 1 connection, sequential, streaming: time to first token (the first `data:` event carrying content);
* N connections (default 16) for a fixed time, non-streaming: requests per second.

Everything stays on 127.0.0.1, every phase is bounded in count and time, and the child processes are ended
on the way out, including on errors and Ctrl-C (and they end themselves if this process dies).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .argtypes import positive_float, positive_int

BENCH_MODEL = "fake-model"
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
DEFAULT_OUTPUT = Path("bench-results/overhead.json")

# Pass-through targets on the reference machine (2 cores, one proxy worker).
TARGET_ADDED_P50_MS = 1.0
TARGET_PROXY_RPS = 500.0

MAX_REQUESTS = 1_000_000
MAX_DURATION = 600.0
MAX_CONCURRENCY = 1024


def request_body(stream: bool) -> bytes:
    body: dict[str, Any] = {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "What is 2+2?"}],
                            "max_tokens": 16}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def request_bytes(port: int, stream: bool) -> bytes:
    body = request_body(stream)
    head = (f"POST {CHAT_PATH} HTTP/1.1\r\nhost: {HOST}:{port}\r\ncontent-type: application/json\r\n"
            f"accept: {'text/event-stream' if stream else 'application/json'}\r\n"
            f"content-length: {len(body)}\r\n\r\n")
    return head.encode() + body


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


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Child processes: each one ends itself when the benchmark process that started it is gone.


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _run_loop(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def backend_main(argv: Sequence[str]) -> None:
    """Child: the fake backend on 127.0.0.1; prints `PORT <n>` once it listens, then serves until terminated."""
    parent_pid, slots = int(argv[0]), int(argv[1])
    _exit_with_parent(parent_pid)
    from .fakebackend import FakeBackend

    async def main() -> None:
        fake = FakeBackend(slots=slots, model=BENCH_MODEL)
        await fake.start()
        print(f"PORT {fake.port}", flush=True)
        while True:  # the fake records every request; keep its memory flat
            await asyncio.sleep(1.0)
            fake.requests.clear()

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        _run_loop(main())
    except KeyboardInterrupt:
        pass


def proxy_main(argv: Sequence[str]) -> None:
    """Child: the proxy in front of `backend_url`, one uvicorn worker; prints `PORT <n>` before it starts."""
    parent_pid, backend_url, loop, http = int(argv[0]), argv[1], argv[2], argv[3]
    _exit_with_parent(parent_pid)
    import uvicorn

    from proxy.app import create_app
    from proxy.config import config_for_backend_url

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(config_for_backend_url(backend_url)), host=HOST, port=port, loop=loop,
                            http=http, access_log=False, log_level="warning", workers=1, lifespan="on",
                            backlog=2048)
    print(f"PORT {port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def loadgen_main() -> None:
    """Child: reads one phase's spec as JSON on stdin, runs it, prints the result as JSON on stdout."""
    spec = json.loads(sys.stdin.read())
    _exit_with_parent(int(spec["parent_pid"]))
    result = _run_loop(run_phase(spec))
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------
# The load generator: a raw HTTP/1.1 keep-alive client


class _HTTPConnection(asyncio.Protocol):
    """One keep-alive connection, one request at a time. A request resolves to (status, seconds, ttft, ok)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, float, float | None, bool]] | None = None
        self.lost: BaseException | None = None
        self._reset()

    def _reset(self) -> None:
        self.t0 = 0.0
        self.status = 0
        self.mode = "head"  # head, length, chunked, trailer
        self.remaining = 0
        self.stream = False
        self.events = bytearray()  # SSE bytes, until the first content event is found
        self.tail = b""  # the last bytes of the stream, to see its `data: [DONE]`
        self.ttft: float | None = None
        self.body = bytearray()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except Exception as exc:  # noqa: BLE001 - a malformed response fails the request, not the loop
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)

    # requests

    def request(self, data: bytes, stream: bool) -> asyncio.Future[tuple[int, float, float | None, bool]]:
        assert self.transport is not None
        if self.lost is not None:
            raise ConnectionResetError("connection is closed")
        self._reset()
        self.stream = stream
        self.waiter = asyncio.get_running_loop().create_future()
        self.t0 = time.perf_counter()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # parsing

    def _finish(self, ok: bool) -> None:
        elapsed = time.perf_counter() - self.t0
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, elapsed, self.ttft, ok))

    def _parse(self) -> None:
        buf = self.buf
        while True:
            if self.mode == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                self.status = int(lines[0].split(b" ", 2)[1])
                length = None
                chunked = False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value.strip())
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                if chunked:
                    self.mode = "chunked"
                elif length is not None:
                    self.mode, self.remaining = "length", length
                else:
                    raise ValueError("a response with neither content-length nor chunked encoding")
            elif self.mode == "length":
                if len(buf) < self.remaining:
                    return
                self.body = buf[: self.remaining]
                del buf[: self.remaining]
                self.mode = "head"
                self._finish(self.status == 200 and self._body_ok(bytes(self.body)))
                return
            elif self.mode == "chunked":
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    return
                size = int(bytes(buf[:line_end]).split(b";", 1)[0], 16)
                if size == 0:
                    del buf[: line_end + 2]
                    self.mode = "trailer"
                    continue
                if len(buf) < line_end + 2 + size + 2:
                    return
                chunk = bytes(buf[line_end + 2: line_end + 2 + size])
                del buf[: line_end + 2 + size + 2]
                self._on_chunk(chunk)
            elif self.mode == "trailer":
                if buf[:2] == b"\r\n":
                    del buf[:2]
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    del buf[: end + 4]
                self.mode = "head"
                done = b"data: [DONE]" in self.tail
                self._finish(self.status == 200 and (done if self.stream else True) and
                             (self.ttft is not None if self.stream else True))
                return

    def _on_chunk(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk)[-64:]
        if not self.stream or self.ttft is not None:
            return
        self.events += chunk
        while True:
            end = self.events.find(b"\n\n")
            if end < 0:
                return
            event = bytes(self.events[:end]).strip()
            del self.events[: end + 2]
            if _carries_content(event):
                self.ttft = time.perf_counter() - self.t0
                self.events.clear()
                return

    @staticmethod
    def _body_ok(body: bytes) -> bool:
        try:
            payload = json.loads(body)
        except ValueError:
            return False
        return isinstance(payload, dict) and bool(payload.get("choices"))


def _carries_content(event: bytes) -> bool:
    """A `data:` event whose first choice has non-empty content (chat delta) or text (completions)."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        try:
            payload = json.loads(data)
        except ValueError:
            continue
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content") or choice.get("text"):
                return True
    return False


async def _connect(port: int) -> _HTTPConnection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_HTTPConnection, HOST, port)
    return conn


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank-with-interpolation percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize_ms(seconds: list[float]) -> dict[str, float] | None:
    if not seconds:
        return None
    values = sorted(s * 1000.0 for s in seconds)
    return {
        "count": len(values),
        "min": values[0],
        "p50": _percentile(values, 50),
        "p90": _percentile(values, 90),
        "p99": _percentile(values, 99),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }


class _Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.statuses: dict[str, int] = {}
        self.bad = 0

    def add(self, status: int, seconds: float, ttft: float | None, ok: bool) -> None:
        self.latencies.append(seconds)
        if ttft is not None:
            self.ttfts.append(ttft)
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        if not ok:
            self.bad += 1

    def result(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "ok": len(self.latencies) - self.bad,
            "statuses": self.statuses,
            "latency_ms": summarize_ms(self.latencies),
            "ttft_ms": summarize_ms(self.ttfts),
        }


async def _sequential(port: int, stream: bool, requests: int, warmup: int) -> dict[str, Any]:
    data = request_bytes(port, stream)
    conn = await _connect(port)
    try:
        for _ in range(warmup):
            await conn.request(data, stream)
        tally = _Tally()
        gc.collect()
        started = time.perf_counter()
        for _ in range(requests):
            tally.add(*await conn.request(data, stream))
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    return {**tally.result(), "sent": warmup + requests, "seconds": elapsed,
            "rps": requests / elapsed if elapsed > 0 else 0.0}


async def _concurrent(port: int, stream: bool, concurrency: int, duration: float, warmup: int) -> dict[str, Any]:
    data = request_bytes(port, stream)
    conns = await asyncio.gather(*(_connect(port) for _ in range(concurrency)))
    tally = _Tally()
    late = 0
    deadline = 0.0

    async def warm(conn: _HTTPConnection) -> None:
        for _ in range(warmup):
            await conn.request(data, stream)

    async def worker(conn: _HTTPConnection) -> None:
        nonlocal late
        while True:
            result = await conn.request(data, stream)
            if time.perf_counter() > deadline:
                late += 1  # finished after the window closed: not counted
                return
            tally.add(*result)

    try:
        await asyncio.gather(*(warm(conn) for conn in conns))
        gc.collect()
        deadline = time.perf_counter() + duration
        await asyncio.gather(*(worker(conn) for conn in conns))
    finally:
        for conn in conns:
            conn.close()
    counted = tally.result()
    return {**counted, "sent": warmup * concurrency + counted["requests"] + late, "seconds": duration,
            "rps": counted["requests"] / duration, "concurrency": concurrency, "late": late}


async def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """One phase against one port: `sequential` (requests, warmup) or `concurrent` (concurrency, duration)."""
    gc.disable()
    try:
        if spec["kind"] == "sequential":
            return await _sequential(spec["port"], spec["stream"], spec["requests"], spec["warmup"])
        return await _concurrent(spec["port"], spec["stream"], spec["concurrency"], spec["duration"],
                                 spec["warmup"])
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------------------------
# Orchestration


class BenchError(RuntimeError):
    pass


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _python_c(entry: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; from tools.bench import {entry}; {entry}(sys.argv[1:])"]


class _Child:
    """A server child process that prints `PORT <n>` when it is about to serve."""

    def __init__(self, name: str, key: str, entry: str, args: Sequence[str]) -> None:
        self.name = name
        self.key = key
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(_python_c(entry) + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=_child_env())
        self.port = 0

    def wait_port(self, timeout: float = 30.0) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name} did not start within {timeout:.0f} s{self.stderr_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                byte = os.read(self.proc.stdout.fileno(), 1)
                if not byte:
                    raise BenchError(f"{self.name} exited with {self.proc.wait()}{self.stderr_tail()}")
                line += byte
        if not line.startswith(b"PORT "):
            raise BenchError(f"{self.name} said {line!r}{self.stderr_tail()}")
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
            raise BenchError(f"{self.name} exited with {self.proc.returncode}{self.stderr_tail()}")

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


def _wait_healthy(port: int, path: str, child: _Child, timeout: float = 60.0) -> None:
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
    raise BenchError(f"{child.name} at port {port} was not healthy within {timeout:.0f} s{child.stderr_tail()}")


def _run_loadgen(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    spec = {**spec, "parent_pid": os.getpid()}
    stderr = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-c", "from tools.bench import loadgen_main; loadgen_main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=_child_env())
    try:
        out, _ = proc.communicate(json.dumps(spec).encode(), timeout=timeout)
    except BaseException as exc:
        proc.kill()
        proc.wait(5)
        stderr.close()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise BenchError(f"the {spec['kind']} phase on port {spec['port']} did not finish within {timeout:.0f} s")
        raise
    try:
        if proc.returncode != 0:
            stderr.seek(0)
            raise BenchError(f"load generator failed ({proc.returncode}):\n"
                             f"{stderr.read().decode('utf-8', 'replace')[-3000:]}")
        return json.loads(out)
    finally:
        stderr.close()


def _p(result: dict[str, Any], key: str, stat: str) -> float | None:
    summary = result.get(key)
    return None if summary is None else summary[stat]


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def run_benchmark(*, requests: int = 2000, warmup: int = 200, duration: float = 5.0, concurrency: int = 16,
                  loop: str | None = None, http: str | None = None,
                  progress: Any = None) -> dict[str, Any]:
    """Start the backend and the proxy, run every phase direct and through the proxy, return all numbers."""
    if not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests must be in 1..{MAX_REQUESTS}")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION}]")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be in 1..{MAX_CONCURRENCY}")
    warmup = max(0, min(warmup, MAX_REQUESTS))
    loop = loop or ("uvloop" if _has("uvloop") else "asyncio")
    http = http or ("httptools" if _has("httptools") else "h11")
    say = progress or (lambda message: None)

    backend = proxy = None
    started = time.time()
    load_before = load_average()
    try:
        backend = _Child("fake backend", "backend", "backend_main", [str(os.getpid()), str(max(64, concurrency))])
        backend_port = backend.wait_port()
        _wait_healthy(backend_port, "/health", backend)
        proxy = _Child("proxy", "proxy", "proxy_main",
                       [str(os.getpid()), f"http://{HOST}:{backend_port}/v1", loop, http])
        proxy_port = proxy.wait_port()
        _wait_healthy(proxy_port, "/health", proxy)

        targets = {"direct": backend_port, "proxy": proxy_port}
        sequential_timeout = 60.0 + (requests + warmup) * 0.05
        concurrent_timeout = 60.0 + duration * 2 + warmup * 0.05
        phases: dict[str, dict[str, Any]] = {"sequential": {}, "streaming": {}, "concurrent": {}}
        plan = [
            ("sequential", {"kind": "sequential", "stream": False, "requests": requests, "warmup": warmup},
             sequential_timeout),
            ("streaming", {"kind": "sequential", "stream": True, "requests": requests, "warmup": warmup},
             sequential_timeout),
            ("concurrent", {"kind": "concurrent", "stream": False, "concurrency": concurrency, "duration": duration,
                            "warmup": max(1, min(warmup // 10, 50))}, concurrent_timeout),
        ]
        for name, spec, timeout in plan:
            for target, port in targets.items():
                say(f"{name:<11} {target:<6} ...")
                before = {child.name: process_cpu_seconds(child.proc.pid) for child in (backend, proxy)}
                result = _run_loadgen({**spec, "port": port}, timeout)
                cpu: dict[str, float | None] = {}
                for child in (backend, proxy):
                    end, start = process_cpu_seconds(child.proc.pid), before[child.name]
                    cpu[child.key] = (None if end is None or start is None or not result["sent"]
                                      else (end - start) * 1000.0 / result["sent"])
                result["cpu_ms_per_request"] = cpu
                phases[name][target] = result
                backend.check_alive()
                proxy.check_alive()
    finally:
        for child in (proxy, backend):
            if child is not None:
                child.stop()

    seq, stream, conc = phases["sequential"], phases["streaming"], phases["concurrent"]
    summary = {
        "sequential_added_p50_ms": _diff(_p(seq["direct"], "latency_ms", "p50"), _p(seq["proxy"], "latency_ms", "p50")),
        "sequential_added_p99_ms": _diff(_p(seq["direct"], "latency_ms", "p99"), _p(seq["proxy"], "latency_ms", "p99")),
        "ttft_added_p50_ms": _diff(_p(stream["direct"], "ttft_ms", "p50"), _p(stream["proxy"], "ttft_ms", "p50")),
        "ttft_added_p99_ms": _diff(_p(stream["direct"], "ttft_ms", "p99"), _p(stream["proxy"], "ttft_ms", "p99")),
        "direct_rps": conc["direct"]["rps"],
        "proxy_rps": conc["proxy"]["rps"],
        "proxy_rps_fraction": conc["proxy"]["rps"] / conc["direct"]["rps"] if conc["direct"]["rps"] else None,
    }
    checks = [
        {"name": "added p50 latency, 1 connection, non-streaming", "value": summary["sequential_added_p50_ms"],
         "target": f"<= {TARGET_ADDED_P50_MS:g} ms", "unit": "ms"},
        {"name": "added p50 TTFT, 1 connection, streaming", "value": summary["ttft_added_p50_ms"],
         "target": f"<= {TARGET_ADDED_P50_MS:g} ms", "unit": "ms"},
        {"name": f"requests/s via proxy, {concurrency} connections", "value": summary["proxy_rps"],
         "target": f">= {TARGET_PROXY_RPS:g}", "unit": "req/s"},
    ]
    for check, limit, upper in zip(checks, (TARGET_ADDED_P50_MS, TARGET_ADDED_P50_MS, TARGET_PROXY_RPS),
                                   (True, True, False)):
        value = check["value"]
        check["met"] = value is not None and (value <= limit if upper else value >= limit)
    answered = all(result["requests"] > 0 and result["ok"] == result["requests"]
                   for phase in phases.values() for result in phase.values())
    return {
        "benchmark": "pass-through overhead",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": time.time() - started,
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": load_average()},
        "setup": {
            "model": BENCH_MODEL,
            "request_body": json.loads(request_body(False)),
            "backend": "tools.fakebackend.FakeBackend, own process, " + ("uvloop" if _has("uvloop") else "asyncio"),
            "proxy": f"create_app(config_for_backend_url(...)), uvicorn, 1 worker, loop={loop}, http={http}, "
                     "access log off",
            "client": "raw asyncio HTTP/1.1 keep-alive, own process",
            "requests": requests,
            "warmup": warmup,
            "duration_s": duration,
            "concurrency": concurrency,
        },
        "phases": phases,
        "summary": summary,
        "targets": checks,
        "all_answered_ok": answered,
    }


# ---------------------------------------------------------------------------------------------------------------
# Output


def _fmt(value: float | None, unit: str = "ms", sign: bool = False) -> str:
    if value is None or value != value:
        return "-"
    if unit == "ms":
        return f"{value:+.3f} ms" if sign else f"{value:.3f} ms"
    return f"{value:+,.0f}" if sign else f"{value:,.0f}"


def _cpu(result: dict[str, Any], key: str) -> float | None:
    return (result.get("cpu_ms_per_request") or {}).get(key)


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    setup = report["setup"]
    phases = report["phases"]
    seq, stream, conc = phases["sequential"], phases["streaming"], phases["concurrent"]
    load = m.get("load_average_before")
    lines = [
        "ttc-proxy pass-through overhead",
        f"machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['implementation']} {m['python']}, {m['platform']}",
        f"         load average before {' '.join(f'{x:.2f}' for x in load) if load else '-'}"
        f", after {' '.join(f'{x:.2f}' for x in m['load_average_after']) if m.get('load_average_after') else '-'}",
        f"proxy:   {setup['proxy']}",
        f"backend: {setup['backend']}; client: {setup['client']}",
        f"load:    {setup['requests']} sequential requests after {setup['warmup']} warm-up; "
        f"{setup['concurrency']} connections for {setup['duration_s']:g} s",
        "",
        f"{'scenario':<32}{'metric':<20}{'direct':>14}{'via proxy':>14}{'added':>14}",
        "-" * 94,
    ]

    def line(scenario: str, metric: str, direct: float | None, proxied: float | None, unit: str = "ms") -> None:
        lines.append(f"{scenario:<32}{metric:<20}{_fmt(direct, unit):>14}{_fmt(proxied, unit):>14}"
                     f"{_fmt(_diff(direct, proxied), unit, sign=True):>14}")

    def row(scenario: str, metric: str, key: str, stat: str, pair: dict[str, Any]) -> None:
        line(scenario, metric, _p(pair["direct"], key, stat), _p(pair["proxy"], key, stat))

    def cpu_rows(pair: dict[str, Any]) -> None:
        lines.append(f"{'':<32}{'proxy CPU/request':<20}{'':>14}{_fmt(_cpu(pair['proxy'], 'proxy')):>14}")

    row("1 connection, non-streaming", "latency p50", "latency_ms", "p50", seq)
    row("", "latency p99", "latency_ms", "p99", seq)
    cpu_rows(seq)
    row("1 connection, streaming", "TTFT p50", "ttft_ms", "p50", stream)
    row("", "TTFT p99", "ttft_ms", "p99", stream)
    row("", "complete p50", "latency_ms", "p50", stream)
    cpu_rows(stream)
    c = setup["concurrency"]
    line(f"{c} connections, non-streaming", "requests/s", conc["direct"]["rps"], conc["proxy"]["rps"], "rps")
    row("", "latency p50", "latency_ms", "p50", conc)
    row("", "latency p99", "latency_ms", "p99", conc)
    cpu_rows(conc)
    lines.append("")
    counts = []
    for name, pair in phases.items():
        for target, result in pair.items():
            counts.append(f"{name}/{target} {result['ok']}/{result['requests']}")
    lines.append("answered 200 with a well-formed body: " + ", ".join(counts))
    lines.append("")
    lines.append("targets:")
    for check in report["targets"]:
        value = check["value"]
        shown = "-" if value is None else (f"{value:.3f} ms" if check["unit"] == "ms" else f"{value:,.0f} req/s")
        lines.append(f"  {check['name']:<50}{check['target']:>12}  {shown:>14}  "
                     f"{'met' if check['met'] else 'MISSED'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_parser(commands: Any) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "bench", help="measure what the proxy adds in pass-through (latency, TTFT, requests/s)",
        description="Runs a fake backend, the proxy (one uvicorn worker) and a raw HTTP load generator, each in "
                    "its own process on 127.0.0.1, and compares direct-to-backend with through-the-proxy.",
    )
    parser.add_argument("--requests", type=positive_int, default=2000,
                        help="sequential requests per one-connection phase, after warm-up (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per phase (default 200)")
    parser.add_argument("--duration", type=positive_float, default=5.0,
                        help="seconds of the concurrent phase (default 5)")
    parser.add_argument("--concurrency", type=positive_int, default=16,
                        help="connections in the concurrent phase (default 16)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help=f"where to write the JSON results (default {DEFAULT_OUTPUT})")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], help="the proxy's event loop (default uvloop)")
    parser.add_argument("--http", choices=["httptools", "h11"], help="the proxy's HTTP parser (default httptools)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--log-level", default="warning")
    parser.set_defaults(handler=bench_command)
    return parser


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def bench_command(args: argparse.Namespace) -> int:
    # SIGTERM unwinds like Ctrl-C, so the child processes are ended on the way out.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return _bench(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _bench(args: argparse.Namespace) -> int:
    try:
        report = run_benchmark(requests=args.requests, warmup=args.warmup, duration=args.duration,
                               concurrency=args.concurrency, loop=args.loop, http=args.http,
                               progress=lambda message: print(message, file=sys.stderr, flush=True))
    except (BenchError, ValueError) as exc:
        print(f"ttc-proxy bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ttc-proxy bench: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {output}")
    if not report["all_answered_ok"]:
        print("ttc-proxy bench: some requests were not answered 200 with a well-formed body", file=sys.stderr)
        return 1
    if args.check and not all(check["met"] for check in report["targets"]):
        return 1
    return 0
