from __future__ import annotations

from collections.abc import Iterator

import pytest

from ttc_proxy.tools.fakebackend import FakeBackend

from .helpers import ProxyServer, fake_config


@pytest.fixture(scope="session")
def fake_backend() -> Iterator[FakeBackend]:
    fake = FakeBackend(slots=4).start_in_thread()
    yield fake
    fake.stop_thread()


@pytest.fixture()
def fake(fake_backend: FakeBackend) -> FakeBackend:
    """The shared scripted backend, with its script and records reset for this test."""
    fake_backend.reset()
    return fake_backend


@pytest.fixture(scope="session")
def proxy(fake_backend: FakeBackend) -> Iterator[ProxyServer]:
    """The proxy in front of the fake backend with default settings."""
    with ProxyServer(fake_config(fake_backend)) as server:
        yield server


# ---- added for the unit-test suite ----

import openai  # noqa: E402

from .helpers import sync_client  # noqa: E402


@pytest.fixture()
def client(proxy: ProxyServer, fake: FakeBackend) -> Iterator[openai.OpenAI]:
    """The official OpenAI SDK against the default proxy (the fake is reset for the test)."""
    with sync_client(proxy) as sdk:
        yield sdk


# ---- each phase's time, printed at the end of the run (CI shows where its minutes go) ----

class PhaseClock:
    """Seconds per test module, and named phases (an engine's start, its tests) that fixtures record."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.modules: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        module = report.nodeid.split("::", 1)[0]
        self.modules[module] = self.modules.get(module, 0.0) + report.duration

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.section("time per phase")
        for name, seconds in self.phases.items():
            terminalreporter.write_line(f"{seconds:8.1f} s  {name}")
        for module, seconds in sorted(self.modules.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:8.1f} s  {module}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(PhaseClock(), "phase-clock")


@pytest.fixture(scope="session")
def phase_times(pytestconfig: pytest.Config) -> dict[str, float]:
    clock = pytestconfig.pluginmanager.get_plugin("phase-clock")
    assert isinstance(clock, PhaseClock)
    return clock.phases
