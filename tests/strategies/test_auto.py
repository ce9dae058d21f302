"""`auto` on the scripted backend: the cascade's routing (stop or go on by a stage's signal), reuse of earlier
stages' runs (a later stage sends exactly the calls it lacks), operating points by budget, the default cascade, the
policy from config, streaming, and errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from ttc_proxy.proxy.config import ConfigError, load_config
from ttc_proxy.strategies.framework import Candidate, StrategyResult, Token
from ttc_proxy.strategies.policy import CascadePolicy, stage_signals
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import ProxyServer, chat, fake_config

LP = {"select": "confidence", "confidence": "logprob"}
SURE, UNSURE = -0.01, -2.0


def cot_over(n: int) -> dict[str, Any]:
    return {"strategy": "bon", "params": {"n": n, **LP}, "over": {"strategy": "cot"}}


def policy(*points: list[dict[str, Any]], default: int = 0, budgets: list[float] | None = None) -> dict[str, Any]:
    budgets = budgets or [100.0 * (i + 1) for i in range(len(points))]
    return {"model": "fake-model", "created": "2026-12-07", "default": default,
            "points": [{"budget": b, "stages": stages} for b, stages in zip(budgets, points)]}


COT_THEN_BON4 = [{"name": "cot", "spec": {"strategy": "cot"}, "stop": {"signal": "logprob", "threshold": 0.9}},
                 {"name": "bon:n=4>cot", "spec": cot_over(4)}]


def script(greedy_logprob: float, sampled: str = "12") -> Any:
    """cot at temperature 0 answers 7 with this logprob; sampled cot runs answer `sampled`, unsure."""
    def reply(body: dict[str, Any]) -> FakeReply:
        if body.get("temperature") == 0:
            return FakeReply(texts=["<thinking>3+4</thinking><output>7</output>"], token_logprob=greedy_logprob)
        return FakeReply(texts=[f"<output>{sampled}</output>"], token_logprob=-0.5)
    return reply


def ask(client: openai.OpenAI, params: dict[str, Any], model: str = "auto-fake-model", **kwargs: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 3 + 4?"}],
                                          temperature=0, extra_body={"ttc": {"params": params}}, **kwargs)


def test_a_sure_first_answer_stops_the_cascade_after_one_call(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script(SURE)
    completion = ask(client, {"policy": policy(COT_THEN_BON4)})
    assert completion.choices[0].message.content == "7"
    (request,) = fake.chat_requests()
    assert request.body["temperature"] == 0 and request.body["top_logprobs"] == 5
    details = completion.ttc["details"]
    (stage,) = details["stages"]
    assert stage["decision"] == "stop" and stage["rule"] == {"signal": "logprob", "threshold": 0.9}
    assert stage["signals"]["logprob"] == pytest.approx(0.99005, abs=1e-4)
    assert details["stopped"].startswith("stage 1's logprob 0.99 >= 0.9")
    assert completion.ttc["backend_calls"] == 1


def test_an_unsure_first_answer_goes_on_and_stage_two_draws_only_the_runs_it_lacks(client: openai.OpenAI,
                                                                                    fake: FakeBackend) -> None:
    fake.script = script(UNSURE)
    completion = ask(client, {"policy": policy(COT_THEN_BON4)})
    requests = fake.chat_requests()
    # Stage 1's cot answer is one of bon's four cot runs: three more, not four.
    assert len(requests) == 1 + 3
    assert [r.body["temperature"] for r in requests[1:]] == [0.8, 0.8, 0.8]
    assert all("<output>" in r.body["messages"][0]["content"] for r in requests)  # every call is a cot prompt
    first, second = completion.ttc["details"]["stages"]
    assert first["decision"] == "continue" and first["calls"] == 1
    assert second["decision"] == "last stage" and second["reused_runs"] == 1 and second["calls"] == 3
    assert completion.ttc["backend_calls"] == 4
    # The sampled runs' answer (12, logprob e^-0.5) beats the reused greedy one (7, e^-2) on logprob.
    assert completion.choices[0].message.content == "12"
    assert completion.usage.total_tokens == first["tokens"] + second["tokens"]


def test_a_third_stage_reuses_every_run_the_first_two_drew(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script(UNSURE)
    stages = [COT_THEN_BON4[0],
              {"name": "bon:n=2>cot", "spec": cot_over(2), "stop": {"signal": "logprob", "threshold": 0.99}},
              {"name": "bon:n=5>cot", "spec": cot_over(5)}]
    completion = ask(client, {"policy": policy(stages)})
    # 1 (cot) + 1 (bon:n=2 reuses it) + 3 (bon:n=5 reuses both)
    assert len(fake.chat_requests()) == 5
    assert [s.get("reused_runs", 0) for s in completion.ttc["details"]["stages"]] == [0, 1, 2]


def test_a_signal_the_stage_lacks_never_stops_it(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script(SURE)
    stages = [{"name": "cot", "spec": {"strategy": "cot"}, "stop": {"signal": "agreement", "threshold": 0.5}},
              {"name": "bon:n=2>cot", "spec": cot_over(2)}]
    completion = ask(client, {"policy": policy(stages)})
    assert [s["decision"] for s in completion.ttc["details"]["stages"]] == ["continue", "last stage"]
    assert len(fake.chat_requests()) == 2


def test_budget_picks_the_operating_point(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script(UNSURE)
    cheap = [{"name": "cot", "spec": {"strategy": "cot"}}]
    document = policy(cheap, COT_THEN_BON4, default=1, budgets=[250, 1000])
    by_param = ask(client, {"policy": document, "budget": 300})
    assert len(by_param.ttc["details"]["stages"]) == 1
    assert by_param.ttc["details"]["operating_point"]["chosen_by"] == "budget=300"
    assert len(fake.chat_requests()) == 1
    fake.reset(script(UNSURE))
    by_default = ask(client, {"policy": document})
    assert by_default.ttc["details"]["operating_point"]["budget"] == 1000
    assert len(fake.chat_requests()) == 4
    fake.reset(script(UNSURE))
    by_ttc_budget = client.chat.completions.create(
        model="auto-fake-model", messages=[{"role": "user", "content": "What is 3 + 4?"}], temperature=0,
        extra_body={"ttc": {"params": {"policy": document}, "budget": {"max_total_tokens": 600}}})
    assert by_ttc_budget.ttc["details"]["operating_point"]["budget"] == 250
    assert "token budget" in by_ttc_budget.ttc["details"]["operating_point"]["chosen_by"]


def test_budget_from_the_model_string(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script(UNSURE)
    completion = ask(client, {}, model="auto:budget=300-fake-model")
    assert completion.ttc["details"]["operating_point"]["budget"] == 250  # the built-in default's cheapest
    assert len(fake.chat_requests()) == 1


def test_without_a_policy_the_built_in_default_runs_and_says_so(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script(SURE)
    completion = client.chat.completions.create(model="auto-fake-model", temperature=0,
                                                messages=[{"role": "user", "content": "What is 3 + 4?"}])
    details = completion.ttc["details"]
    assert details["policy"].startswith("built-in default: no policy file is configured")
    assert [s["stage"] for s in details["stages"]] == ["cot"]
    assert completion.choices[0].message.content == "7"


def test_streaming_shows_each_stage_as_progress(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script(UNSURE)
    stream = ask(client, {"policy": policy(COT_THEN_BON4)}, stream=True)
    content, reasoning, ttc = [], [], {}
    for chunk in stream:
        ttc = getattr(chunk, "ttc", None) or ttc
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
    text = "".join(reasoning)
    assert "stage 1/2: cot" in text and "stage 2/2: bon:n=4>cot" in text
    assert "stage 1 → '7' (logprob 0.135; stop when logprob >= 0.9): continue" in text
    assert "".join(content) == "12"
    assert [s["decision"] for s in ttc["details"]["stages"]] == ["continue", "last stage"]
    assert ttc["backend_calls"] == 4


def test_the_models_policy_file_from_config(fake: FakeBackend, tmp_path: Path) -> None:
    path = tmp_path / "fake.json"
    path.write_text(json.dumps(policy([{"name": "cot", "spec": {"strategy": "cot"}}], budgets=[123])))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f"backends: [{{name: fake, kind: llama_cpp, base_url: '{fake.base_url}'}}]\n"
        f"strategies: {{policies: {{fake-model: {path.name}}}}}\n")
    config = load_config(config_file)  # the path is read beside the config file
    fake.script = script(UNSURE)
    with ProxyServer(config) as server:
        response = chat(server, {"model": "auto-fake-model", "temperature": 0,
                                 "messages": [{"role": "user", "content": "What is 3 + 4?"}]})
    assert response.status_code == 200
    details = response.json()["ttc"]["details"]
    assert details["policy"] == "tuned for fake-model on 2026-12-07"
    assert details["operating_point"]["budget"] == 123


def test_a_config_naming_a_bad_policy_file_does_not_load(fake: FakeBackend, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": "m", "points": [{"budget": 1, "stages": [
        {"name": "x", "spec": {"strategy": "bon", "params": {"n": "many"}}}]}]}))
    with pytest.raises(ValueError, match=r"strategies.policies.m: .* is not a policy"):
        fake_config(fake, strategies={"policies": {"m": str(path)}})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"backends: [{{name: fake, kind: llama_cpp, base_url: 'http://x'}}]\n"
                           f"strategies: {{policies: {{m: missing.json}}}}\n")
    with pytest.raises(ConfigError, match="missing.json"):
        load_config(config_file)


@pytest.mark.parametrize("bad, fragment", [
    ({"policy": {"model": "m", "points": []}}, "points"),
    ({"policy": policy([{"name": "a", "spec": {"strategy": "auto"}}])}, "cannot be auto"),
    ({"policy": policy([{"name": "a", "spec": {"strategy": "cot", "over": {"strategy": "cot"}}}])},
     "cannot run over"),
    ({"policy": policy([{"name": "a", "spec": {"strategy": "cot"}, "stop": {"signal": "vibes", "threshold": 1}}])},
     "signal"),
    ({"budget": 0}, "budget"),
])
def test_a_bad_inline_policy_is_a_400_naming_it(proxy: ProxyServer, fake: FakeBackend, bad: dict[str, Any],
                                                fragment: str) -> None:
    response = chat(proxy, {"model": "auto-fake-model", "messages": [{"role": "user", "content": "hi"}],
                            "ttc": {"params": bad}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_strategy_params" and fragment in error["message"]
    assert fake.chat_requests() == []


def test_the_budget_running_out_in_stage_two_returns_what_the_stages_had(client: openai.OpenAI,
                                                                         fake: FakeBackend) -> None:
    fake.script = script(UNSURE)
    completion = client.chat.completions.create(
        model="auto-fake-model", messages=[{"role": "user", "content": "What is 3 + 4?"}], temperature=0,
        extra_body={"ttc": {"params": {"policy": policy(COT_THEN_BON4, budgets=[10])},
                            "budget": {"max_calls": 1}}})
    # Stage 2 could draw nothing: its one candidate is stage 1's reused answer.
    assert completion.choices[0].message.content == "7"
    assert len(fake.chat_requests()) == 1
    assert completion.choices[0].finish_reason == "length" and completion.ttc["budget_exhausted"] is True
    assert completion.ttc["details"]["stages"][1]["reused_runs"] == 1


def test_routing_costs_well_under_a_millisecond_per_stage() -> None:
    document = CascadePolicy.model_validate(policy(COT_THEN_BON4, COT_THEN_BON4, budgets=[100, 200]))
    tokens = tuple(Token(text=c, logprob=-0.1, offset=i) for i, c in enumerate("<output>42</output>"))
    result = StrategyResult([Candidate(text="42", tokens=tokens, generated="<output>42</output>", text_start=8)],
                            details={"answer": "42", "winner": {"confidence": 0.9},
                                     "candidates": [{"answer": "42", "counted": True}] * 16})
    rounds = 2000
    started = time.perf_counter()
    for _ in range(rounds):
        point, _why = document.point_for(None, 1e5)
        signals = stage_signals(result)
        point.stages[0].stop.stops(signals)  # type: ignore[union-attr]
    per_stage_ms = (time.perf_counter() - started) * 1000 / rounds
    assert per_stage_ms < 0.2


def test_auto_through_the_ttc_object(client: openai.OpenAI, fake: FakeBackend) -> None:
    fake.script = script(SURE)
    completion = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "What is 3 + 4?"}], temperature=0,
        extra_body={"ttc": {"strategy": "auto", "params": {"policy": policy(COT_THEN_BON4)}}})
    assert completion.choices[0].message.content == "7"
    assert completion.ttc["details"]["stages"][0]["decision"] == "stop"


def test_a_stage_the_backend_cannot_run_is_skipped_saying_why(fake: FakeBackend) -> None:
    config = fake_config(fake, backends=[{"name": "fake", "kind": "generic", "base_url": fake.base_url,
                                          "capabilities": {"logprobs": False}}])
    fake.script = script(UNSURE)
    stages = [{"name": "cot", "spec": {"strategy": "cot"}, "stop": {"signal": "logprob", "threshold": 0.5}},
              {"name": "bon:n=4>cot", "spec": cot_over(4)}]
    with ProxyServer(config) as server:
        response = chat(server, {"model": "auto-fake-model", "temperature": 0,
                                 "messages": [{"role": "user", "content": "What is 3 + 4?"}],
                                 "ttc": {"params": {"policy": policy(stages)}}})
    assert response.status_code == 200
    details = response.json()["ttc"]["details"]
    first, second = details["stages"]
    assert first["signals"] == {} and first["decision"] == "continue"  # no logprobs: the rule cannot fire
    assert second["skipped"] == "the backend lacks logprobs"
    assert details["stopped"] == "the stages after the last answer could not run on this backend"
    assert response.json()["choices"][0]["message"]["content"] == "7"
    assert len(fake.chat_requests()) == 1
