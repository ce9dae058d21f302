"""The example plugin package (examples/ttc-proxy-shortest) installs with pip and answers through the official SDK:
found by its entry point, its parameters validated and published, streamed and composed like a built-in."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import openai
import pytest

from ttc_proxy.proxy.registry import ENTRY_POINT_GROUP
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer, fake_config, sync_client

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "ttc-proxy-shortest"
# One answer per seed: sample i of a seeded request is sent with seed + i.
ANSWERS = ["The answer is 42, I am quite sure.", "42", "It is 42.", "Forty-two, which is 42."]


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The plugin pip-installed into a folder of its own (not the project venv, so the rest of the suite serves
    the built-ins only), put on sys.path for this module's proxies."""
    target = tmp_path_factory.mktemp("plugin")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(target), str(PLUGIN)], check=True, timeout=300)
    sys.path.insert(0, str(target))
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for name in [m for m in sys.modules if m == "ttc_shortest" or m.startswith("ttc_shortest.")]:
            del sys.modules[name]


@pytest.fixture()
def plugin_proxy(plugin_path: Path, fake: FakeBackend) -> Iterator[ProxyServer]:
    with ProxyServer(fake_config(fake)) as server:
        yield server


def by_seed(body: dict) -> FakeReply:
    return FakeReply(texts=[ANSWERS[(int(body["seed"]) - 100) % len(ANSWERS)]])


def test_pip_installs_the_plugin_under_the_entry_point_group(plugin_path: Path) -> None:
    assert (plugin_path / "ttc_shortest" / "__init__.py").exists()
    found = {entry.name: entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)}
    assert found.get("shortest") == "ttc_shortest:Shortest"


def test_the_plugin_answers_through_the_sdk(plugin_proxy: ProxyServer, fake: FakeBackend) -> None:
    fake.script = by_seed
    with sync_client(plugin_proxy) as client:
        reply = client.chat.completions.create(model="shortest:n=4-fake-model", seed=100, max_tokens=20,
                                               messages=[{"role": "user", "content": "What is 6 times 7?"}])
    assert reply.choices[0].message.content == "42"
    ttc = reply.model_extra["ttc"]
    assert ttc["strategy"] == "shortest" and ttc["params"]["n"] == 4
    assert ttc["details"]["lengths"] == [len(a) for a in ANSWERS]
    assert sorted(int(r.body["seed"]) for r in fake.chat_requests()) == [100, 101, 102, 103]
    assert reply.usage.completion_tokens > 0


def test_the_plugin_streams_and_composes(plugin_proxy: ProxyServer, fake: FakeBackend) -> None:
    fake.script = by_seed
    with sync_client(plugin_proxy) as client:
        stream = client.chat.completions.create(model="shortest:n=2-fake-model", seed=100, max_tokens=20,
                                                stream=True, messages=[{"role": "user", "content": "6 x 7?"}])
        chunks = list(stream)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert content == "42"  # seeds 100 and 101: the second is shorter
        composed = client.chat.completions.create(model="shortest:n=2>cot-fake-model", seed=100, max_tokens=20,
                                                  messages=[{"role": "user", "content": "6 x 7?"}])
    assert composed.model_extra["ttc"]["strategy"] == "shortest"
    assert composed.model_extra["ttc"]["details"]["drawn"] == 2


def test_the_plugin_validates_and_publishes_its_params(plugin_proxy: ProxyServer, fake: FakeBackend) -> None:
    with sync_client(plugin_proxy) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="shortest:n=0-fake-model",
                                           messages=[{"role": "user", "content": "hi"}])
    assert bad.value.status_code == 400 and "n" in bad.value.message
    document = httpx.get(f"{plugin_proxy.url}/openapi.json", timeout=10).json()
    params = document["components"]["schemas"]["Params_shortest"]
    assert params["properties"]["n"]["description"] == "answers to draw"
    assert fake.chat_requests() == []  # a bad parameter sends nothing
