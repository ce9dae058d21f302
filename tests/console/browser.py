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
