from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.config import BackendConfig, ProxyConfig
from tools.fakebackend import FakeBackend

from .helpers import ProxyServer


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


def fake_config(fake: FakeBackend, **overrides: object) -> ProxyConfig:
    backend = BackendConfig(name="fake", kind="llama_cpp", base_url=fake.base_url)
    return ProxyConfig.model_validate({"backends": [backend.model_dump()], **overrides})


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
