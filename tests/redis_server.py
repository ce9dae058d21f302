"""A real redis-server for the tests, on a free loopback port with a temporary folder, stopped afterwards.

Missing redis-server (the Debian package; `make test` installs it): skipped with the reason, except under
CI=true, where a missing server fails the run (CI must not pass by skipping the replica tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from ttc_proxy.proxy.backends.engine import free_port


class RedisServer:
    def __init__(self, binary: str) -> None:
        self.port = free_port("127.0.0.1")
        self.folder = tempfile.TemporaryDirectory(prefix="ttc-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.folder.name, "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--logfile", os.path.join(self.folder.name, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.folder.cleanup()


def redis_server_or_skip() -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (Debian: apt-get install redis-server; `make test` installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    server = RedisServer(binary)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
