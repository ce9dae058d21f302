"""Several replicas as one: proxy PROCESSES (`ttc-proxy serve`) sharing traces through a real redis-server,
`--workers N` sharing each backend's bounds and one embedded engine, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ttc_proxy.proxy.backends.engine import free_port
from ttc_proxy.proxy.backends.scheduler import FairScheduler
from ttc_proxy.proxy.config import BackendConfig, EmbeddedEngine, ProxyConfig
from ttc_proxy.proxy.backends.scheduler import share_bounds
from ttc_proxy.proxy.replicas import worker_config
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, user
from tests.redis_server import RedisServer, redis_server_or_skip

ROOT = Path(__file__).resolve().parents[2]
TTC_PROXY = [sys.executable, "-m", "ttc_proxy.tools.cli"]  # `ttc-proxy`, from this checkout (cwd first on the path)
# uvicorn, done shutting down, raises the signal again, so the parent sees what stopped it (or exits 0)
EXITED_ON_SIGTERM = (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from redis_server_or_skip()


class ProxyProcess:
    """`ttc-proxy serve` as its own process on a free port, its output kept in a file."""

    def __init__(self, args: list[str], *, command: list[str] | None = None, cwd: Path = ROOT) -> None:
        self.port = free_port("127.0.0.1")
        self.log = tempfile.NamedTemporaryFile(prefix="ttc-proxy-", suffix=".log", delete=False)
        self.process = subprocess.Popen([*(command or TTC_PROXY), "serve", "--port", str(self.port),
                                         "--log-level", "warning", *args],
                                        cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> "ProxyProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ttc-proxy exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"ttc-proxy did not answer /health within {timeout} s:\n{self.output()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        os.unlink(self.log.name)


def write_config(folder: Path, fake: FakeBackend, **server: Any) -> Path:
    path = folder / "config.yaml"
    backend = {"name": "fake", "kind": "llama_cpp", "base_url": fake.base_url}
    path.write_text(yaml.safe_dump({"backends": [backend], "server": server}))
    return path


# ---- two processes, one Redis: a trace made through one is read through the other ----

def test_a_trace_made_through_one_replica_is_read_through_another(redis_server, fake_backend, fake, tmp_path):
    config = write_config(tmp_path, fake_backend, trace_store=redis_server.url, api_keys=["key-a", "key-b"])
    first, second = ProxyProcess(["--config", str(config)]), ProxyProcess(["--config", str(config)])
    try:
        first.wait_ready(), second.wait_ready()
        response = httpx.post(f"{first.url}/v1/chat/completions", headers={"authorization": "Bearer key-a"},
                              json={"model": "sc:n=2-fake-model", "messages": user()}, timeout=30)
        assert response.status_code == 200, response.text
        trace_id = response.json()["ttc"]["trace_id"]
        trace = httpx.get(f"{second.url}/v1/traces/{trace_id}", headers={"authorization": "Bearer key-a"})
        assert trace.status_code == 200, trace.text
        root, *calls = trace.json()["nodes"]
        assert trace.json()["id"] == trace_id and root["status"] == "ok" and root["label"] == "sc"
        assert len([c for c in calls if c["kind"] == "call"]) >= 1
        # the other key does not see it on either replica
        for replica in (first, second):
            assert_openai_error(httpx.get(f"{replica.url}/v1/traces/{trace_id}",
                                          headers={"authorization": "Bearer key-b"}), 404, param="trace_id")
    finally:
        first.stop(), second.stop()


# ---- graceful shutdown ----

def _stream_in_thread(url: str, lines: list[str], errors: list[BaseException]) -> threading.Thread:
    def read() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                              json={"model": "fake-model", "messages": user(), "stream": True}) as response:
                for line in response.iter_lines():
                    lines.append(line)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=read, name="paced-stream")
    thread.start()
    return thread


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigterm_finishes_the_stream_in_flight_refuses_new_connections_and_exits(fake_backend, fake, tmp_path):
    fake.reset(lambda request: FakeReply(texts=[" ".join(f"w{i}" for i in range(20))], chunk_delay=0.1))
    config = write_config(tmp_path, fake_backend, shutdown_timeout_seconds=10)
    proxy = ProxyProcess(["--config", str(config), "--backend", fake_backend.base_url]).wait_ready()
    try:
        lines: list[str] = []
        errors: list[BaseException] = []
        reader = _stream_in_thread(proxy.url, lines, errors)
        _wait_for(lambda: any('w1"' in line for line in lines))  # the stream is under way
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # uvicorn closes its listening socket first
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{proxy.url}/health", timeout=2)
        assert proxy.process.poll() is None  # still finishing the stream
        reader.join(15)
        assert not errors and [line for line in lines if line][-1] == "data: [DONE]"
        assert sum(bool(re.search(r'w\d+"', line)) for line in lines) == 20  # every chunk arrived
        assert proxy.process.wait(10) in EXITED_ON_SIGTERM
        assert time.monotonic() - signalled < 10
    finally:
        proxy.stop()


def test_sigterm_waits_for_streams_no_longer_than_the_configured_bound(fake_backend, fake, tmp_path):
    fake.reset(lambda request: FakeReply(texts=[" ".join(f"w{i}" for i in range(40))], chunk_delay=0.25))  # 10 s
    config = write_config(tmp_path, fake_backend, shutdown_timeout_seconds=1)
    proxy = ProxyProcess(["--config", str(config), "--backend", fake_backend.base_url]).wait_ready()
    try:
        lines: list[str] = []
        errors: list[BaseException] = []
        reader = _stream_in_thread(proxy.url, lines, errors)
        _wait_for(lambda: any('w1"' in line for line in lines))
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        proxy.process.wait(8)
        waited = time.monotonic() - signalled
        assert 0.9 < waited < 4, waited  # the bound (1 s), and process exit
        reader.join(10)
        assert "data: [DONE]" not in lines  # cut off: it would have taken 10 s
        _wait_for(lambda: fake_backend.in_flight == 0)  # and its backend call was closed, not left running
    finally:
        proxy.stop()


# ---- each process's share of a backend ----

def test_each_replica_takes_its_share_of_a_backends_bounds():
    scheduler = FairScheduler(capacity=8, max_queue=1024)
    share_bounds("engine", scheduler, 3)
    assert (scheduler.capacity, scheduler.max_queue) == (2, 341)  # 3 x 2 <= 8: the engine's limit is kept
    single = FairScheduler(capacity=8, max_queue=1024)
    share_bounds("engine", single, 1)
    assert (single.capacity, single.max_queue) == (8, 1024)
    tiny = FairScheduler(capacity=1, max_queue=4)
    share_bounds("engine", tiny, 2)
    assert tiny.capacity == 1  # never none at all
    one_queued = FairScheduler(capacity=8, max_queue=1)  # a queue of one stays one: not zero (every wait a 429)
    share_bounds("engine", one_queued, 2)
    assert one_queued.max_queue == 1
    no_queue = FairScheduler(capacity=8, max_queue=0)
    share_bounds("engine", no_queue, 2)
    assert no_queue.max_queue == 0


def test_a_proxy_told_it_is_one_of_several_replicas_divides_the_learned_slots(fake_backend, fake):
    # The fake reports 4 slots on /props; two replicas take 2 each.
    with ProxyServer(fake_config(fake_backend, server={"replicas": 2})) as server:
        backend = server.server.config.app.state.proxy.backends["fake"]
        assert backend.scheduler.capacity == 2
    with ProxyServer(fake_config(fake_backend, server={"workers": 4})) as server:
        assert server.server.config.app.state.proxy.backends["fake"].scheduler.capacity == 1


def test_a_worker_is_pointed_at_the_engine_the_parent_started():
    config = ProxyConfig(backends=[BackendConfig(name="local", kind="llama_cpp", embedded=EmbeddedEngine()),
                                   BackendConfig(name="remote", base_url="http://10.0.0.1:8000/v1")])
    worker = worker_config(config, 3, {"local": "http://127.0.0.1:5555/v1"})
    local, remote = worker.backends
    assert local.embedded is None and local.base_url == "http://127.0.0.1:5555/v1" and local.kind == "llama_cpp"
    assert local.models == ["smollm2"] and remote == config.backends[1]
    assert worker.server.workers == 3 and worker.server.sharing() == 3


# ---- --workers N with an embedded engine: started once, shared, stopped ----

FAKE_LLAMA_SERVER = """\
#!{python}
# Stands in for llama-server: records that it was started, then serves the scripted fake backend on --port.
import asyncio, os, sys
sys.path.insert(0, {root!r})
from ttc_proxy.tools.fakebackend import FakeBackend
args = sys.argv
with open({starts!r}, "a") as starts:
    starts.write(f"{{os.getpid()}}\\n")
async def main():
    fake = FakeBackend(slots=int(args[args.index("-np") + 1]))
    await fake.start(int(args[args.index("--port") + 1]))
    await asyncio.Event().wait()
asyncio.run(main())
"""

SERVE_WITH_FAKE_ENGINE = """\
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
import ttc_proxy.proxy.backends.engine as engine
engine.llama_server_binary = lambda: Path({binary!r})
engine.model_path = lambda embedded: Path("/dev/null")
from ttc_proxy.tools.cli import main
if __name__ == "__main__":  # uvicorn's workers are spawned: they import this file again
    sys.exit(main(sys.argv[1:]))
"""


def test_workers_share_one_embedded_engine_started_by_the_parent(tmp_path):
    starts = tmp_path / "engine-starts"
    binary = tmp_path / "llama-server"
    binary.write_text(FAKE_LLAMA_SERVER.format(python=sys.executable, root=str(ROOT), starts=str(starts)))
    binary.chmod(0o755)
    wrapper = tmp_path / "serve.py"
    wrapper.write_text(SERVE_WITH_FAKE_ENGINE.format(root=str(ROOT), binary=str(binary)))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"backends": [{"name": "local", "kind": "llama_cpp",
                                                    "embedded": {"slots": 4, "alias": "fake-model"}}],
                                      "server": {"api_keys": ["k"]}}))
    proxy = ProxyProcess(["--config", str(config), "--workers", "2"], command=[sys.executable, str(wrapper)])
    try:
        proxy.wait_ready()
        engine_pids = starts.read_text().split()
        assert len(engine_pids) == 1  # once, not once per worker
        headers = {"authorization": "Bearer k"}
        health = [httpx.get(f"{proxy.url}/health", headers=headers).json() for _ in range(6)]
        assert len({h["backends"]["local"]["url"] for h in health}) == 1  # every worker points at that one engine
        for _ in range(4):
            response = httpx.post(f"{proxy.url}/v1/chat/completions", headers=headers, timeout=30,
                                  json={"model": "sc:n=2-fake-model", "messages": user()})
            assert response.status_code == 200, response.text
        assert len(starts.read_text().split()) == 1
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(30) in EXITED_ON_SIGTERM
        _wait_for(lambda: not _alive(int(engine_pids[0])))  # the parent stopped the engine after its workers
    finally:
        proxy.stop()
        for pid in starts.read_text().split() if starts.exists() else []:
            if _alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"


# ---- a missing redis-server: skipped with its name, but under CI=true a failure ----

def test_a_missing_redis_server_skips_naming_it_and_fails_under_ci(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server"):
        next(redis_server_or_skip())
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and redis-server is not installed"):
        next(redis_server_or_skip())


def test_workers_start_and_serve_beside_a_silent_backend(fake_backend, fake, tmp_path):
    """Issue 17: each worker discovers in the background; a backend that takes connections and never answers holds
    no worker's start-up (it held them for its read timeout) and is a 503 naming it; the other is served."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"backends": [
            {"name": "stalled", "kind": "llama_cpp", "base_url": f"http://127.0.0.1:{silent.getsockname()[1]}/v1",
             "models": ["stalled-model"], "timeouts": {"read": 120}},
            {"name": "fake", "kind": "llama_cpp", "base_url": fake.base_url, "models": ["fake-model"]}]}))
        proxy = ProxyProcess(["--config", str(config), "--workers", "2"])
        try:
            proxy.wait_ready(timeout=30)
            for _ in range(4):  # either worker
                served = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                                    json={"model": "fake-model", "messages": user()})
                assert served.status_code == 200, served.text
                refused = httpx.post(f"{proxy.url}/v1/chat/completions", timeout=30,
                                     json={"model": "stalled-model", "messages": user()})
                assert "stalled" in assert_openai_error(refused, 503, code="backend_down")["message"]
        finally:
            proxy.stop()
