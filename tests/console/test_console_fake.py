"""The console in headless chromium against the scripted fake backend: the fast checks of what it draws (the real
engine's are in test_console_engine.py), the key rule, and that it is served from the package with nothing remote."""

from __future__ import annotations

from typing import Any

import httpx
from selenium.webdriver.common.by import By

from ttc_proxy.tools.fakebackend import FakeBackend

from tests.helpers import ProxyServer, fake_config, sync_client, user

from .browser import open_console, screenshot, show_run, wait_for

KEY = "sk-console-a"
OTHER_KEY = "sk-console-b"


def keyed(fake: FakeBackend) -> ProxyServer:
    return ProxyServer(fake_config(fake, server={"api_keys": [KEY, OTHER_KEY]}))


def test_the_console_is_served_from_the_package_and_loads_nothing_remote(fake: FakeBackend) -> None:
    with ProxyServer(fake_config(fake)) as server:
        page = httpx.get(server.url + "/ui")
        script = httpx.get(server.url + "/ui/console.js")
        missing = httpx.get(server.url + "/ui/../config.yaml")
        unknown = httpx.get(server.url + "/ui/secrets.txt")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "http://" not in page.text and "https://" not in page.text
    assert "https://" not in script.text  # no CDN
    assert missing.status_code == 404 and unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"


def test_the_console_can_be_switched_off(fake: FakeBackend) -> None:
    with ProxyServer(fake_config(fake, telemetry={"console": False})) as server:
        response = httpx.get(server.url + "/ui")
    assert response.status_code == 404
    assert "telemetry.console" in response.json()["error"]["message"]


def test_a_key_sees_its_own_runs_only(fake: FakeBackend, browser: Any) -> None:
    with keyed(fake) as server:
        with sync_client(server, api_key=KEY) as client:
            mine = client.chat.completions.create(model="sc:n=3-fake-model", messages=user()).model_extra["ttc"]
        with sync_client(server, api_key=OTHER_KEY) as client:
            theirs = client.chat.completions.create(model="sc:n=2-fake-model", messages=user()).model_extra["ttc"]
        listing = httpx.get(server.url + "/v1/traces", headers={"authorization": f"Bearer {KEY}"}).json()
        assert [t["id"] for t in listing["data"]] == [mine["trace_id"]]
        assert httpx.get(server.url + "/v1/traces").status_code == 401
        open_console(browser, server.url, KEY)
        items = [li.get_attribute("data-trace-id") for li in browser.find_elements(By.CSS_SELECTOR, "#run-list li")]
        assert items == [mine["trace_id"]]
        assert theirs["trace_id"] not in browser.page_source
        open_console(browser, server.url, "sk-wrong")
        assert "invalid or missing API key" in browser.find_element(By.ID, "runs-status").text


def test_the_drawings_match_the_traces(fake: FakeBackend, browser: Any) -> None:
    with ProxyServer(fake_config(fake)) as server, sync_client(server) as client:
        runs = {model: client.chat.completions.create(model=model, messages=user(), max_tokens=24).model_extra["ttc"]
                for model in ("bon:n=4-fake-model", "mcts:iterations=2-fake-model", "entropy-fake-model",
                              "deepthink-fake-model", "think-fake-model", "bon:n=2>cot-fake-model")}
        open_console(browser, server.url)
        for model, ttc in runs.items():
            detail = show_run(browser, ttc["trace_id"])
            trace = httpx.get(f"{server.url}/v1/traces/{ttc['trace_id']}").json()
            root = trace["nodes"][0]
            if model.startswith("bon:n=4"):
                cards = detail.find_elements(By.CSS_SELECTOR, ".candidate")
                assert len(cards) == 4
                chosen = detail.find_elements(By.CSS_SELECTOR, ".candidate.chosen")
                assert [c.get_attribute("data-index") for c in chosen] == [str(ttc["details"]["winner"]["index"])]
            elif model.startswith("mcts"):
                drawn = detail.find_elements(By.CSS_SELECTOR, "g.mcts-node")
                assert len(drawn) == len(root["notes"]["tree"]) == ttc["details"]["nodes"]
                assert [g.get_attribute("data-node-id") for g in detail.find_elements(By.CSS_SELECTOR, "g.mcts-node.chosen")] \
                    == [str(ttc["details"]["node"])]
            elif model.startswith("entropy"):
                tokens = detail.find_elements(By.CSS_SELECTOR, ".token[data-position]")
                assert len(tokens) == len(root["notes"]["positions"])
                forked = [t.get_attribute("data-position") for t in detail.find_elements(By.CSS_SELECTOR, ".token.intervention[data-position]")]
                assert forked == [str(i["position"]) for i in ttc["details"]["interventions"]]
            elif model.startswith("deepthink"):
                assert detail.find_element(By.CSS_SELECTOR, ".route").text == ttc["details"]["route"]
                assert len(detail.find_elements(By.CSS_SELECTOR, ".approaches .candidate")) == len(ttc["details"]["explorations"])
            elif model.startswith("think"):
                assert len(detail.find_elements(By.CSS_SELECTOR, ".thinking .wait")) == ttc["details"]["waits"]
            else:  # bon over cot: the nested cot runs drawn inside bon's
                nested = detail.find_elements(By.CSS_SELECTOR, 'section.nested[data-strategy="cot"]')
                assert len(nested) == 2
            screenshot(browser, f"fake-{model.split('-')[0].replace(':', '_').replace('>', '_over_')}")


def test_the_playground_streams_two_models_side_by_side(fake: FakeBackend, browser: Any) -> None:
    with ProxyServer(fake_config(fake)) as server:
        browser.get(server.url + "/ui")
        browser.find_element(By.CSS_SELECTOR, '[data-tab="playground"]').click()
        browser.find_element(By.ID, "model-a").clear()
        browser.find_element(By.ID, "model-a").send_keys("fake-model")
        browser.find_element(By.ID, "model-b").send_keys("sc:n=3-fake-model")
        browser.find_element(By.ID, "play").click()
        wait_for(browser, lambda d: all(lane.get_attribute("data-state") != "running"
                                        for lane in d.find_elements(By.CSS_SELECTOR, ".lane")))
        lanes = browser.find_elements(By.CSS_SELECTOR, ".lane")
        assert [lane.get_attribute("data-state") for lane in lanes] == ["done", "done"]
        assert all("42" in lane.find_element(By.CSS_SELECTOR, ".answer-text").text for lane in lanes)
        assert "sc: 3 samples" in lanes[1].find_element(By.CSS_SELECTOR, ".reasoning").text or \
            lanes[1].find_element(By.CSS_SELECTOR, ".reasoning").text
        assert all(lane.get_attribute("data-tokens") for lane in lanes)
        screenshot(browser, "fake-playground")
