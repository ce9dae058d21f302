"""`ttc-proxy strategies` and `ttc-proxy trace ID` (issue 17, items 6 and 7)."""

from __future__ import annotations

import json

import httpx
import pytest

from ttc_proxy.proxy.registry import load_registry
from ttc_proxy.tools import cli
from ttc_proxy.tools.fakebackend import FakeReply

from tests.helpers import ProxyServer, closed_port, fake_config, user


def test_strategies_lists_every_strategy_and_parameter(proxy, fake, capsys):
    assert cli.main(["strategies", "--proxy", proxy.url, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing == httpx.get(proxy.url + "/v1/strategies").json()
    assert cli.main(["strategies", "--proxy", proxy.url]) == 0
    text = capsys.readouterr().out
    for slug, strategy in load_registry()[0].items():
        assert f"{slug}: {strategy.description}" in text
        for name in strategy.Params.model_fields:
            assert f"\n  {name} " in text, (slug, name)
    assert "  n                integer, >= 1 (max: strategies.max_samples)  default 8 " in text


def test_strategies_without_a_proxy_lists_those_installed_here_and_one_by_slug(capsys):
    assert cli.main(["strategies", "cot"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "cot: chain of thought with reflection: one call with a reasoning prompt; the answer is its output",
        "  needs: nothing beyond chat completions",
        "  example        boolean         default true  show the worked example in the system prompt",
        "  system_prompt  string or null  default null  replaces the built-in instructions (keep the <output> "
        "section: the answer is read from it)"]
    assert cli.main(["strategies", "cto"]) == 2
    assert "not a strategy: cto" in capsys.readouterr().err


def test_trace_prints_the_run_as_a_tree(proxy, fake, capsys):
    fake.script = lambda body: FakeReply(texts=["<output>7</output>"])
    reply = httpx.post(proxy.url + "/v1/chat/completions", timeout=30,
                       json={"model": "bon:n=2>cot-fake-model", "messages": user(), "seed": 1}).json()
    trace_id = reply["ttc"]["trace_id"]
    assert cli.main(["trace", trace_id, "--proxy", proxy.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{trace_id} (5 nodes, started ")
    assert lines[1].startswith("bon [run] ok: ") and "2 calls" in lines[1] and "over=cot" in lines[1]
    assert "│  decision: selector=confidence, fallback=weighted, samples=2, source=cot, answer=7" in lines
    assert "│  scores: 7 0.905" in lines
    runs = [i for i, line in enumerate(lines) if "cot [strategy] ok" in line]
    assert len(runs) == 2 and lines[runs[0]].startswith("├─ ") and lines[runs[1]].startswith("└─ ")
    assert lines[runs[0] + 1] == "│  │  params: example=true"
    assert lines[runs[0] + 3].startswith("│  └─ cot [call] ok: ") and "seed=" in lines[runs[0] + 3]
    assert lines[runs[0] + 4] == "│        → <output>7</output>"


def test_trace_of_an_unknown_id_or_an_absent_proxy_says_why(proxy, fake, capsys):
    assert cli.main(["trace", "trace-nope", "--proxy", proxy.url]) == 1
    assert "HTTP 404: no trace 'trace-nope'" in capsys.readouterr().err
    assert cli.main(["trace", "trace-nope", "--proxy", f"http://127.0.0.1:{closed_port()}"]) == 1
    assert "cannot reach the proxy" in capsys.readouterr().err


def test_trace_with_keys_needs_the_key_that_ran_it(fake_backend, capsys):
    fake_backend.reset(lambda body: FakeReply(texts=["7"]))
    with ProxyServer(fake_config(fake_backend, server={"api_keys": ["sk-one"]})) as server:
        reply = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": "Bearer sk-one"},
                           json={"model": "sc:n=2-fake-model", "messages": user()}, timeout=30).json()
        trace_id = reply["ttc"]["trace_id"]
        assert cli.main(["trace", trace_id, "--proxy", server.url]) == 1
        assert "HTTP 401" in capsys.readouterr().err
        assert cli.main(["trace", trace_id, "--proxy", server.url + "/v1", "--key", "sk-one"]) == 0
        assert capsys.readouterr().out.splitlines()[1].startswith("sc [run] ok: ")
    fake_backend.reset()


@pytest.mark.parametrize("value", ["\n", " "])
def test_a_whitespace_parameter_is_shown_quoted(value):
    from ttc_proxy.tools.trace import short

    assert short(value) == json.dumps(value)
