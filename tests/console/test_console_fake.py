"""The console in headless chromium against the scripted fake backend: the fast checks of what it draws (the real
engine's are in test_console_engine.py), the key rule, and that it is served from the package with nothing remote."""

from __future__ import annotations

from typing import Any

import httpx
from selenium.webdriver.common.by import By

from ttc_proxy.tools.fakebackend import FakeBackend

from tests.helpers import ProxyServer, backend_entry, fake_config, sync_client, user

from .browser import check_drawing, open_console, run_playground, screenshot, show_run

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
        runs = {name: client.chat.completions.create(model=model, messages=user(), max_tokens=24).model_extra["ttc"]
                for name, model in (("bon", "bon:n=4-fake-model"), ("sc", "sc:n=3-fake-model"),
                                    ("deepconf", "deepconf:n=4,warmup=2-fake-model"),
                                    ("mcts", "mcts:iterations=2-fake-model"), ("entropy", "entropy-fake-model"),
                                    ("pts", "pts-fake-model"), ("deepthink", "deepthink-fake-model"),
                                    ("think", "think-fake-model"), ("bon-over-cot", "bon:n=2>cot-fake-model"))}
        open_console(browser, server.url)
        for name, ttc in runs.items():
            detail = show_run(browser, ttc["trace_id"])
            trace = httpx.get(f"{server.url}/v1/traces/{ttc['trace_id']}").json()
            check_drawing(detail, ttc, trace)
            screenshot(browser, f"fake-{name}")


def test_an_mcts_tree_over_two_models_names_each_nodes_model(fake: FakeBackend, browser: Any) -> None:
    config = fake_config(fake, backends=[backend_entry(fake, name="a", models=["fake-model"]),
                                         backend_entry(fake, name="b", models=["other-model"])])
    with ProxyServer(config) as server, sync_client(server) as client:
        ttc = client.chat.completions.create(  # model names with '-' go in the ttc object, not the prefix
            model="mcts:iterations=3-fake-model", messages=user(), max_tokens=24,
            extra_body={"ttc": {"params": {"models": ["fake-model", "other-model"]}}}).model_extra["ttc"]
        open_console(browser, server.url)
        detail = show_run(browser, ttc["trace_id"])
        trace = httpx.get(f"{server.url}/v1/traces/{ttc['trace_id']}").json()
        check_drawing(detail, ttc, trace)
        drawn = {g.get_attribute("data-model") for g in detail.find_elements(By.CSS_SELECTOR, "g.mcts-node")}
        assert drawn == set(ttc["details"]["models"]) and drawn <= {"fake-model", "other-model"}
        names = [t.text for t in detail.find_elements(By.CSS_SELECTOR, "text.node-model")]
        assert len(names) == ttc["details"]["nodes"] + ttc["details"]["refused_trials"]  # every node drawn names it
        screenshot(browser, "fake-mcts-two-models")


def test_the_playground_streams_two_models_side_by_side(fake: FakeBackend, browser: Any) -> None:
    with ProxyServer(fake_config(fake)) as server:
        lanes = run_playground(browser, server.url, ["fake-model", "sc:n=3-fake-model"], "What is 6 times 7?")
        assert all("42" in lane.find_element(By.CSS_SELECTOR, ".answer-text").text for lane in lanes)
        assert "winner: 42" in lanes[1].find_element(By.CSS_SELECTOR, ".reasoning").text
        screenshot(browser, "fake-playground")
