"""Debian's chromium, headless, driven by selenium through Debian's chromium-driver (no browser download)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "build" / "screenshots"


def browser_or_skip() -> Iterator[Any]:
    """A headless chromium session (1400x1000), closed after; skipped (failed under CI=true) without one."""
    chromium = shutil.which("chromium")
    driver_binary = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if chromium is None or driver_binary is None:
        reason = "chromium, chromium-driver (Debian) or selenium (the test extra) is missing; `make test` installs them"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_binary), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """The page as it is now, whole (the window grown to the document's height), in build/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 700)")
    driver.set_window_size(1400, min(int(height) + 40, 4000))
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    return path


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float = 30.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def open_console(driver: Any, url: str, key: str = "") -> None:
    """The console with the key entered and the key's runs listed."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/ui")
    field = driver.find_element(By.ID, "key")
    field.clear()
    if key:
        field.send_keys(key)
    driver.find_element(By.ID, "refresh").click()
    wait_for(driver, lambda d: "runs" in d.find_element(By.ID, "runs-status").text
             or "No strategy runs" in d.find_element(By.ID, "runs-status").text)


def show_run(driver: Any, trace_id: str) -> Any:
    """The run's drawing, once it is on the page."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'#run-list li[data-trace-id="{trace_id}"]').click()
    wait_for(driver, lambda d: d.find_element(By.ID, "run-detail").get_attribute("data-trace-id") == trace_id)
    return driver.find_element(By.ID, "run-detail")


def check_drawing(detail: Any, ttc: dict[str, Any], trace: dict[str, Any]) -> None:
    """The run's drawing shows what its trace holds: every candidate and the chosen one, every mcts node and the
    chosen one, every token and exactly the intervened ones, deepthink's route, think's waits, nested runs."""
    from selenium.webdriver.common.by import By

    root = trace["nodes"][0]
    details = ttc["details"]
    found = lambda selector: detail.find_elements(By.CSS_SELECTOR, selector)  # noqa: E731
    strategy = root["label"]
    nested = [n for n in trace["nodes"] if n["kind"] == "strategy"]
    if strategy in ("bon", "sc", "deepconf"):
        assert len(found(".run > div > .pool > .candidate")) == len(details["candidates"])
        chosen = [c.get_attribute("data-index") for c in found(".run > div > .pool > .candidate.chosen")]
        if strategy == "bon":
            assert chosen == [str(details["winner"]["index"])]
        else:
            assert len(chosen) == 1 and details["candidates"][int(chosen[0])]["answer"] == details["answer"]
    elif strategy == "mcts":
        # the tree holds refused trials too (drawn grey); `nodes` counts the nodes made
        assert len(found("g.mcts-node")) == len(root["notes"]["tree"]) == details["nodes"] + details["refused_trials"]
        assert [g.get_attribute("data-node-id") for g in found("g.mcts-node.chosen")] == [str(details["node"])]
        models = {str(n["id"]): n.get("model", "") for n in root["notes"]["tree"]}  # over several models: each node's
        assert {g.get_attribute("data-node-id"): g.get_attribute("data-model") for g in found("g.mcts-node")} == models
    elif strategy in ("entropy", "pts"):
        assert len(found(".token[data-position]")) == len(root["notes"]["positions"])
        forked = [t.get_attribute("data-position") for t in found(".token.intervention[data-position]")]
        assert forked == [str(i["position"]) for i in details["interventions"]]
    elif strategy == "deepthink":
        assert found(".route")[0].text == details["route"]
        assert len(found(".approaches .candidate")) == len(details["explorations"])
    elif strategy == "think":
        assert len(found(".thinking .wait")) == details["waits"]
    if nested:
        assert len(found(f'section.nested[data-strategy="{nested[0]["label"]}"]')) == min(len(nested), 6)


def run_playground(driver: Any, url: str, models: list[str], question: str, max_tokens: int = 48,
                   timeout: float = 300.0) -> list[Any]:
    """The playground run with one or two models; their lanes once both have finished (each must succeed)."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/ui")
    driver.find_element(By.CSS_SELECTOR, '[data-tab="playground"]').click()
    for field, model in zip(("model-a", "model-b"), [*models, ""]):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(model)
    question_box = driver.find_element(By.ID, "question")
    question_box.clear()
    question_box.send_keys(question)
    tokens = driver.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys(str(max_tokens))
    driver.find_element(By.ID, "play").click()
    wait_for(driver, lambda d: all(lane.get_attribute("data-state") != "running"
                                   for lane in d.find_elements(By.CSS_SELECTOR, ".lane")), timeout)
    lanes = driver.find_elements(By.CSS_SELECTOR, ".lane")
    assert [lane.get_attribute("data-model") for lane in lanes] == models
    assert [lane.get_attribute("data-state") for lane in lanes] == ["done"] * len(models), \
        [lane.text for lane in lanes]
    assert all(int(lane.get_attribute("data-tokens")) > 0 for lane in lanes)
    return lanes
