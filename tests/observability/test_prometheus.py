"""A real Prometheus (Debian's `prometheus`) scrapes `ttc-proxy serve` and its query API returns the request counter
after a known mix of requests: one process, and `--workers 2` (whichever worker answers a scrape sums all)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from ttc_proxy.proxy.backends.engine import free_port
from ttc_proxy.tools.fakebackend import FakeBackend

from tests.helpers import stop_service, user
from tests.robustness.test_replicas import ProxyProcess, write_config

CHAT = "/v1/chat/completions"


class Prometheus:
    """prometheus on loopback scraping one target every second, its data in a temporary folder."""

    def __init__(self, binary: str, target: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ttc-prometheus-"))
        self.port = free_port("127.0.0.1")
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": [{"job_name": "ttc-proxy", "static_configs": [{"targets": [target]}]}]}
        (self.folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.folder / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.folder / 'prometheus.yml'}", f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expression: str) -> list[dict]:
        response = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expression}, timeout=5)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def wait_for(self, expression: str, expected: float, timeout: float = 60.0) -> float:
        """The query's single value once it equals `expected` (scrapes are every second), else the last seen."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            try:
                result = self.query(expression)
            except httpx.HTTPError:
                result = []
            if result:
                seen = float(result[0]["value"][1])
                if seen == expected:
                    return seen
            time.sleep(0.5)
        raise AssertionError(f"{expression}: {seen} after {timeout} s, expected {expected}\n"
                             f"{(self.folder / 'prometheus.log').read_text(errors='replace')[-2000:]}")

    def stop(self) -> None:
        stop_service(self.process, self.log, self.folder)


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        reason = "prometheus is not installed (the Debian package; `make test` installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return binary


@pytest.fixture()
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ttc-prom-config-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_prometheus_scrapes_the_request_counter(fake: FakeBackend, folder: Path, workers: int) -> None:
    binary = prometheus_binary()
    proxy = ProxyProcess(["--config", str(write_config(folder, fake)), "--workers", str(workers)]).wait_ready()
    prometheus = Prometheus(binary, f"127.0.0.1:{proxy.port}")
    try:
        # a known mix, each on a connection of its own (so the kernel spreads them over the workers)
        for _ in range(7):
            with httpx.Client() as client:
                assert client.post(proxy.url + CHAT, json={"model": "fake-model", "messages": user()}).status_code == 200
        for _ in range(3):
            with httpx.Client() as client:
                assert client.post(proxy.url + CHAT, json={"model": "sc:n=2-fake-model",
                                                           "messages": user()}).status_code == 200
        for _ in range(2):
            with httpx.Client() as client:
                assert client.post(proxy.url + CHAT, json={"model": "nobody-serves-this",
                                                           "messages": user()}).status_code == 404
        # every scrape, whichever worker answers it, has every worker's counts
        for _ in range(6):
            with httpx.Client() as client:
                text = client.get(proxy.url + "/metrics").text
            assert ('ttc_requests_total{endpoint="/v1/chat/completions",model="fake-model",status="200",'
                    'strategy="none"} 7.0') in text
        served = f'ttc_requests_total{{endpoint="{CHAT}",model="fake-model",status="200"}}'
        assert prometheus.wait_for(f'sum({served})', 10) == 10
        assert prometheus.wait_for(f'sum(ttc_requests_total{{endpoint="{CHAT}",strategy="sc"}})', 3) == 3
        assert prometheus.wait_for(f'sum(ttc_requests_total{{endpoint="{CHAT}",status="404",model="-"}})', 2) == 2
        # pass-through: one call each; sc:n=2 without a seed: one call of n=2 each
        assert prometheus.wait_for('sum(ttc_backend_calls_total{kind="chat",status="200"})', 10) == 10
        assert prometheus.query('count(ttc_requests_total{model="nobody-serves-this"})') == []
    finally:
        prometheus.stop()
        proxy.stop()
