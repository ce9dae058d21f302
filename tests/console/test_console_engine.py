"""The console in headless chromium in front of the real engine (the embedded llama-server + SmolLM2): real runs
drawn as their traces say (every mcts node, the chosen candidate, the forked tokens), the playground streaming
two models side by side, and screenshots in build/screenshots/ (the docs show some of them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from selenium.webdriver.common.by import By

from ttc_proxy.proxy.config import BackendConfig, EmbeddedEngine, ProxyConfig, ServerSettings

from tests.helpers import ProxyServer

from .browser import check_drawing, open_console, run_playground, screenshot, show_run

pytestmark = pytest.mark.engine

KEY = "sk-console-engine"
QUESTION = [{"role": "user", "content": "What is 17 times 23? Answer with just the number."}]
# Every position is a fork (varentropy >= 0 is high, entropy <= 100 is not high): the reply is branched.
ALL_FORKS = "low_entropy=0,high_entropy=100,low_varentropy=0,high_varentropy=0"
RUNS = {
    "mcts": "mcts:iterations=2-smollm2",
    "bon": "bon:n=4-smollm2",
    "entropy": f"entropy:{ALL_FORKS}-smollm2",
    "deepthink": "deepthink-smollm2",
    "think": "think:min_thinking_tokens=16,max_thinking_tokens=48-smollm2",
    "bon-over-cot": "bon:n=4>cot-smollm2",
}


@pytest.fixture(scope="module")
def engine_proxy() -> Iterator[ProxyServer]:
    config = ProxyConfig(
        server=ServerSettings(api_keys=[KEY]),
        backends=[BackendConfig(name="local", kind="llama_cpp", embedded=EmbeddedEngine(slots=8, context=16384))],
    )
    with ProxyServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def runs(engine_proxy: ProxyServer) -> dict[str, dict[str, Any]]:
    """One real run of each drawing's strategy, the ttc object of each."""
    with openai.OpenAI(base_url=f"{engine_proxy.url}/v1", api_key=KEY, max_retries=0, timeout=300) as sdk:
        return {name: sdk.chat.completions.create(model=model, messages=QUESTION, max_tokens=48, temperature=0.7,
                                                  seed=7).model_extra["ttc"]
                for name, model in RUNS.items()}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_real_run_is_drawn_as_its_trace_says(engine_proxy: ProxyServer, runs: dict[str, dict[str, Any]],
                                               browser: Any, name: str) -> None:
    ttc = runs[name]
    trace = httpx.get(f"{engine_proxy.url}/v1/traces/{ttc['trace_id']}",
                      headers={"authorization": f"Bearer {KEY}"}).json()
    open_console(browser, engine_proxy.url, KEY)
    detail = show_run(browser, ttc["trace_id"])
    check_drawing(detail, ttc, trace)
    if name == "mcts":
        assert len(detail.find_elements(By.CSS_SELECTOR, "g.mcts-node")) > 1
    if name == "entropy":  # every position is a fork: at least one token was branched, and is marked
        assert detail.find_elements(By.CSS_SELECTOR, ".token.intervention")
    screenshot(browser, f"console-{name}")


def test_the_playground_streams_a_model_and_a_strategy_side_by_side(engine_proxy: ProxyServer,
                                                                    browser: Any) -> None:
    open_console(browser, engine_proxy.url, KEY)  # the key is kept for the page's session
    lanes = run_playground(browser, engine_proxy.url, ["smollm2", "bon:n=4-smollm2"],
                           "What is 17 times 23? Answer with just the number.")
    assert lanes[1].find_element(By.CSS_SELECTOR, ".reasoning").text  # bon's progress came first, as reasoning
    assert all(lane.find_element(By.CSS_SELECTOR, ".answer-text").text for lane in lanes)
    screenshot(browser, "console-playground")
