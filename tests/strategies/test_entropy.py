"""Entropy-based sampling: the maths (known distributions, tail bounds), regimes, calibration, and the strategy's
cut-and-continue at exact token offsets, against the scripted backend."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest

from ttc_proxy.proxy.config import ConfigError, load_config
from ttc_proxy.strategies.framework import StreamEvent, Token, TokenAlternative
from ttc_proxy.strategies.guided import sample_alternative, top_alternatives
from ttc_proxy.strategies.uncertainty import Thresholds, uncertainty
from ttc_proxy.tools.calibrate import calibration_record, thresholds_from
from ttc_proxy.tools.fakebackend import FakeReply, _tokens, render_template

from tests.helpers import fake_config
from tests.helpers import ProxyServer, assert_openai_error, backend_entry, chat, sync_client, user

LN2 = math.log(2)


# ================================================================ the maths


def test_uniform_listed_distribution_has_entropy_ln_k_and_no_varentropy():
    for k in (2, 5, 20):
        measured = uncertainty([math.log(1 / k)] * k)
        assert measured is not None
        assert measured.entropy == pytest.approx(math.log(k))
        assert measured.varentropy == pytest.approx(0.0, abs=1e-12)
        assert measured.tail_mass == pytest.approx(0.0, abs=1e-12)
        assert measured.entropy_low == pytest.approx(measured.entropy_high)  # no tail: the bounds meet


def test_known_distribution_entropy_and_varentropy():
    measured = uncertainty([math.log(0.25), math.log(0.5), math.log(0.25)])  # any order
    assert measured is not None
    assert measured.entropy == pytest.approx(1.5 * LN2)
    # surprises ln2 (p=1/2) and 2 ln2 (p=1/4 twice), each 1/2 ln2 from the mean
    assert measured.varentropy == pytest.approx(0.25 * LN2 ** 2)


def test_one_certain_token_is_zero_entropy():
    measured = uncertainty([0.0, -math.inf, float("nan")])
    assert measured is not None and measured.entropy == 0.0 and measured.varentropy == 0.0


def test_nothing_listed_is_unknown():
    assert uncertainty([]) is None
    assert uncertainty([-math.inf]) is None


def test_probabilities_above_one_are_scaled_back():
    measured = uncertainty([math.log(0.6), math.log(0.6)])
    assert measured is not None and measured.entropy == pytest.approx(LN2) and measured.tail_mass == 0.0


def test_tail_is_concentrated_for_the_low_bound_and_spread_for_the_high_one():
    # One listed token of p=1/2: the tail (1/2) can be at most one token of 1/2 -> ln 2 at least.
    measured = uncertainty([math.log(0.5)], vocab_size=1001)
    assert measured is not None
    assert measured.tail_mass == pytest.approx(0.5)
    assert measured.entropy_low == pytest.approx(LN2)
    assert measured.entropy_high == pytest.approx(-0.5 * math.log(0.5) - 0.5 * math.log(0.5 / 1000))
    # p=0.4 listed, tail 0.6 in pieces of at most 0.4: 0.4 + 0.2
    measured = uncertainty([math.log(0.4)])
    assert measured is not None
    assert measured.entropy_low == pytest.approx(-2 * 0.4 * math.log(0.4) - 0.2 * math.log(0.2))


def test_bounds_hold_for_random_distributions_truncated_to_their_top_k():
    rng = np.random.default_rng(7)
    for _ in range(200):
        vocab = int(rng.integers(25, 200))
        full = rng.dirichlet(np.full(vocab, float(rng.choice([0.05, 0.3, 1.0]))))
        true_entropy = float(-(full[full > 0] * np.log(full[full > 0])).sum())
        top = np.sort(full)[::-1][:20]
        measured = uncertainty([math.log(p) for p in top if p > 0], vocab_size=vocab)
        assert measured is not None
        assert measured.entropy_low <= true_entropy + 1e-9 <= measured.entropy_high + 2e-9
        assert measured.entropy_high <= math.log(vocab) + 1e-9


def test_a_rounded_confident_position_is_measured_at_once():
    # float32 rounding: the top token at 1 - 6e-8 beside alternatives down to e^-36 leaves a tail (3.6e-8) that
    # ~1.5e8 pieces of the smallest listed probability would hold; the vocabulary bounds the pieces (it took 40 s
    # and 1 GB per position, on the event loop, when the completion was a list).
    import time

    logprobs = [math.log(0.99999994)] + [-18.0 - i for i in range(19)]
    started = time.monotonic()
    measured = uncertainty(logprobs)
    assert time.monotonic() - started < 0.5
    assert measured is not None and measured.entropy < 1e-5 and measured.entropy <= measured.entropy_high
    assert measured.tail_mass == pytest.approx(3.59e-8, rel=0.01)


def test_twenty_listed_tokens_cap_the_estimate_near_ln_20():
    measured = uncertainty([math.log(0.05)] * 20)
    assert measured is not None and measured.entropy == pytest.approx(math.log(20))


# ================================================================ regimes


THRESHOLDS = Thresholds(low_entropy=0.5, high_entropy=2.0, low_varentropy=0.5, high_varentropy=2.5)


def fork_distribution() -> list[float]:
    return [math.log(0.85)] + [math.log(0.15 / 19)] * 19


@pytest.mark.parametrize("logprobs, regime", [
    ([0.0], "flowing"),
    ([math.log(0.05)] * 20, "careful"),
    (fork_distribution(), "fork"),
    ([math.log(0.5), math.log(0.5)], "middle"),
])
def test_regimes_of_known_distributions(logprobs, regime):
    measured = uncertainty(logprobs)
    assert measured is not None
    assert THRESHOLDS.regime(measured) == regime


def test_regime_boundaries_and_the_misty_quadrant():
    from ttc_proxy.strategies.uncertainty import Uncertainty

    def at(entropy: float, varentropy: float) -> str:
        return THRESHOLDS.regime(Uncertainty(entropy, varentropy, entropy, entropy, 0.0, 20))

    assert at(0.5, 0.5) == "flowing"  # thresholds are inclusive
    assert at(0.51, 0.5) == "middle"
    assert at(2.0, 0.5) == "careful"
    assert at(1.0, 2.5) == "fork"
    assert at(2.5, 3.0) == "misty"
    assert at(1.0, 1.0) == "middle"


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError):
        Thresholds(low_entropy=2.0, high_entropy=1.0)
    with pytest.raises(ValueError):
        Thresholds(low_varentropy=3.0, high_varentropy=1.0)


def test_calibration_sets_thresholds_at_quantiles():
    measured = [uncertainty([math.log(p), math.log(1 - p)]) for p in np.linspace(0.5, 0.999, 101)]
    values = [m for m in measured if m is not None]
    thresholds = thresholds_from(values, 50, 90)
    entropies = sorted(m.entropy for m in values)
    assert thresholds.low_entropy == pytest.approx(float(np.percentile(entropies, 50)), abs=1e-4)
    assert thresholds.high_entropy == pytest.approx(float(np.percentile(entropies, 90)), abs=1e-4)
    record = calibration_record("m", values, thresholds, {"tasks": 3})
    assert record["defaults"] == {"entropy": thresholds.model_dump()}
    assert record["measured"]["positions"] == len(values)
    assert sum(record["measured"]["regime_shares"].values()) == pytest.approx(1.0, abs=1e-3)


def test_calibrated_defaults_apply_to_their_model_and_requests_override_them(tmp_path):
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / "m.json").write_text(json.dumps({"defaults": {"entropy": {"high_entropy": 2.2}}}))
    (tmp_path / "config.yaml").write_text(
        "backends: [{name: b, base_url: 'http://127.0.0.1:9', models: [m, other]}]\n"
        "strategies: {defaults: {entropy: {high_entropy: 1.9, low_entropy: 0.3}}, calibration: {m: cal/m.json}}\n")
    config = load_config(tmp_path / "config.yaml")  # the path is read from the config's folder
    from ttc_proxy.proxy.runs.validation import check_params
    from ttc_proxy.strategies.entropy import EntropySampling

    params = check_params(EntropySampling, {}, config.strategies, "m")
    assert (params.high_entropy, params.low_entropy) == (2.2, 0.3)
    assert check_params(EntropySampling, {}, config.strategies, "other").high_entropy == 1.9
    assert check_params(EntropySampling, {"high_entropy": 2.9}, config.strategies, "m").high_entropy == 2.9


def test_unreadable_calibration_is_a_config_error(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "backends: [{name: b, base_url: 'http://127.0.0.1:9'}]\nstrategies: {calibration: {m: nope.json}}\n")
    with pytest.raises(ConfigError, match="nope.json"):
        load_config(tmp_path / "config.yaml")
    (tmp_path / "bad.json").write_text('{"thresholds": {}}')
    (tmp_path / "config.yaml").write_text(
        "backends: [{name: b, base_url: 'http://127.0.0.1:9'}]\nstrategies: {calibration: {m: bad.json}}\n")
    with pytest.raises(ConfigError, match="defaults"):
        load_config(tmp_path / "config.yaml")


# ================================================================ local redraws


def token_with(alternatives: list[tuple[str, float]], chosen: str) -> Token:
    top = tuple(TokenAlternative(text, lp, id=i) for i, (text, lp) in enumerate(alternatives))
    own = next(a for a in top if a.text == chosen)
    return Token(chosen, own.logprob, own.id, top=top)


def test_top_alternatives_put_the_streamed_token_first_and_drop_unlikely_ones():
    token = token_with([("a", math.log(0.5)), ("b", math.log(0.3)), ("c", math.log(0.15)), ("d", math.log(0.01))],
                       "b")
    assert [a.text for a in top_alternatives(token, 3, 0.05)] == ["b", "a", "c"]
    assert [a.text for a in top_alternatives(token, 5, 0.05)] == ["b", "a", "c"]
    assert [a.text for a in top_alternatives(token, 2, 0.05)] == ["b", "a"]


def test_redraw_at_temperature_follows_the_tempered_distribution():
    token = token_with([("a", math.log(0.75)), ("b", math.log(0.25))], "a")
    rng = random.Random(3)
    draws = [sample_alternative(token, 1.0, rng).text for _ in range(4000)]
    assert draws.count("b") / 4000 == pytest.approx(0.25, abs=0.03)
    # T = 1/2 squares the odds: 9:1
    draws = [sample_alternative(token, 0.5, rng).text for _ in range(4000)]
    assert draws.count("b") / 4000 == pytest.approx(0.1, abs=0.02)
    assert sample_alternative(token, 0.0, rng).text == "a"


# ================================================================ the strategy, against the scripted backend


def entries(logprobs: dict[str, list[tuple[str, float]]]):
    """A FakeReply logprobs_fn: the listed alternatives for a token text (the token itself first), else certain."""
    return lambda choice, index, token: logprobs.get(token, [(token, 0.0)])


UNIFORM = [(f"u{j}", math.log(0.05)) for j in range(19)]
PARAMS = "mapping=entropix,low_entropy=0.5,high_entropy=2.0,low_varentropy=0.5,high_varentropy=2.5"


def rendered_ids(fake, text: str) -> list[int]:
    return fake.vocabulary.encode(text)


def completions(fake) -> list[dict[str, Any]]:
    return [r.body for r in fake.requests if r.path.endswith("/completions") and "prompt" in r.body]


def test_careful_position_gets_the_pause_text_and_the_reply_continues_from_exact_token_ids(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:  # the continuation after the pause
            return FakeReply(texts=[" is 42."], logprobs_fn=entries({}))
        return FakeReply(texts=["The answer is 42."],
                         logprobs_fn=entries({" is": [(" is", math.log(0.05)), *UNIFORM]}))

    fake.script = script
    completion = client.chat.completions.create(model=f"entropy:{PARAMS}-fake-model", messages=user(),
                                                max_tokens=32)
    assert completion.choices[0].message.content == "The answer Wait, is 42."
    (continued,) = completions(fake)
    prompt = render_template(user())
    # the rendered chat, the two kept tokens as the engine streamed them, the pause text tokenized
    expected = (fake.vocabulary.encode(prompt) + [fake.vocabulary.id("The"), fake.vocabulary.id(" answer")]
                + fake.vocabulary.encode(" Wait,"))
    assert continued["prompt"] == expected
    assert continued["stream"] is True and continued["max_tokens"] == 32 - 2 - len(_tokens(" Wait,"))
    details = completion.model_extra["ttc"]["details"]
    (intervention,) = details["interventions"]
    assert intervention["action"] == "pause" and intervention["offset"] == len("The answer")
    assert intervention["token"] == " is" and intervention["why"].startswith("careful")
    assert details["pauses_inserted"] == [" Wait,"]
    assert details["regimes"]["careful"] == 1


def test_fork_finishes_each_alternative_and_keeps_the_best_scoring_branch(client, fake):
    fork = [(" 42", math.log(0.85)), (" 41", math.log(0.15 / 19))] + [(f"f{j}", math.log(0.15 / 19))
                                                                      for j in range(18)]

    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:  # the other branch, continued from its forced token id
            return FakeReply(texts=["!"], token_logprob=-0.05)
        return FakeReply(texts=["The answer is 42 sure"],
                         logprobs_fn=entries({" 42": fork, " sure": [(" sure", -6.0)]}))

    fake.script = script
    completion = client.chat.completions.create(
        model=f"entropy:{PARAMS},branches=2,min_branch_probability=0.005-fake-model", messages=user())
    # own branch: " 42" (ln .85) then " sure" (-6): mean -3.08; other: " 41" (ln .0079) then "!" (-0.05): -2.45
    assert completion.choices[0].message.content == "The answer is 41!"
    (branch,) = completions(fake)
    assert branch["prompt"][-4:] == [fake.vocabulary.id(t) for t in ("The", " answer", " is", " 41")]
    assert branch["prompt"][:-4] == fake.vocabulary.encode(render_template(user()))
    (intervention,) = completion.model_extra["ttc"]["details"]["interventions"]
    assert intervention["action"] == "branch ×2" and intervention["kept"] == " 41"
    assert intervention["offset"] == len("The answer is")


def test_the_default_mapping_branches_at_the_first_position_that_is_not_flowing(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:
            return FakeReply(texts=[" 40"], logprobs_fn=entries({}))
        # " answer" is careful (uniform), " is" would be a middle position: the first one branches, nothing after
        return FakeReply(texts=["The answer is 42"],
                         logprobs_fn=entries({" answer": [(" answer", math.log(0.05)), *UNIFORM],
                                              " is": [(" is", math.log(0.5)), (" was", math.log(0.5))]}))

    fake.script = script
    thresholds = PARAMS.replace("mapping=entropix,", "")
    completion = client.chat.completions.create(model=f"entropy:{thresholds},branches=3-fake-model",
                                                messages=user())
    details = completion.model_extra["ttc"]["details"]
    (intervention,) = details["interventions"]
    assert intervention["action"] == "branch ×3" and intervention["token"] == " answer"
    assert intervention["why"].startswith("careful")
    assert len(completions(fake)) == 2  # the two other alternatives; the open stream finished its own
    # "The", the fork at " answer", and the kept branch's later positions: " is" (middle) and " 42"
    assert details["regimes"] == {"flowing": 2, "careful": 1, "middle": 1}
    # the own branch (" answer is 42": ln .05 then three certain tokens) beats "u0 40" (ln .05, one certain token)
    assert completion.choices[0].message.content == "The answer is 42"


def test_a_redraw_that_differs_cuts_and_one_that_agrees_costs_nothing(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:
            return FakeReply(texts=[" 42."], logprobs_fn=entries({}))
        # " is" was streamed though " was" is far likelier: a redraw (flowing mapped to adapt) replaces it
        return FakeReply(texts=["The answer is 42."],
                         logprobs_fn=entries({" is": [(" is", -12.0), (" was", -0.0001)]}))

    fake.script = script
    completion = client.chat.completions.create(model=f"entropy:{PARAMS},flowing=adapt,max_interventions=1-fake-model",
                                                messages=user(), seed=5)
    assert completion.choices[0].message.content == "The answer was 42."
    (continued,) = completions(fake)
    assert continued["prompt"][-3:] == [fake.vocabulary.id(t) for t in ("The", " answer", " was")]
    (intervention,) = completion.model_extra["ttc"]["details"]["interventions"]
    assert intervention["action"].startswith("adapt at T=") and intervention["inserted"] == " was"
    # "The" and " answer" were certain: their redraws agreed, no cut
    assert completion.model_extra["ttc"]["details"]["streams"] == 2


def test_interventions_are_bounded_per_reply(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        return FakeReply(texts=[" x y z"] if "prompt" in body else ["a b c d"],
                         logprobs_fn=lambda choice, index, token: [(token, -12.0), (" w", -0.0001)])

    fake.script = script
    completion = client.chat.completions.create(
        model=f"entropy:{PARAMS},flowing=adapt,max_interventions=2-fake-model", messages=user(), max_tokens=20)
    details = completion.model_extra["ttc"]["details"]
    assert len(details["interventions"]) == 2
    assert len(completions(fake)) == 2  # each cut is one continuation, no more
    assert completion.choices[0].message.content == " w w x y z"


def test_entropy_streams_kept_tokens_and_reports_why_it_intervened(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:
            return FakeReply(texts=[" is 42."], logprobs_fn=entries({}))
        return FakeReply(texts=["The answer is 42."],
                         logprobs_fn=entries({" is": [(" is", math.log(0.05)), *UNIFORM]}))

    fake.script = script
    stream = client.chat.completions.create(model=f"entropy:{PARAMS}-fake-model", messages=user(), stream=True)
    content, reasoning = [], []
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            content.append(delta.content or "")
            reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
    assert "".join(content) == "The answer Wait, is 42."
    assert [c for c in content if c][:2] == ["The", " answer"]  # kept tokens went out one by one, as generated
    assert "careful" in "".join(reasoning) and "pause" in "".join(reasoning)


def test_positions_regimes_and_actions_are_in_the_trace(client, fake, proxy):
    import httpx

    fake.script = lambda body: FakeReply(texts=["The answer is 42."], logprobs_fn=entries({}))
    completion = client.chat.completions.create(model=f"entropy:{PARAMS}-fake-model", messages=user())
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.model_extra['ttc']['trace_id']}").json()
    notes = json.dumps(trace)
    assert '"positions"' in notes and '"regime": "flowing"' in notes and '"entropy_bounds"' in notes


def test_entropy_needs_raw_completions_and_says_so(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities={"completions": False})])
    with ProxyServer(config) as server:
        for stream in (False, True):
            response = chat(server, {"model": "entropy-fake-model", "messages": user(), "stream": stream})
            error = assert_openai_error(response, 400, code="backend_capability_missing")
            assert "completions" in error["message"]
    assert fake.requests == []


def test_bad_entropy_parameters_are_a_400(proxy):
    for model in ("entropy:careful=shout-fake-model", "entropy:low_entropy=3,high_entropy=1-fake-model",
                  "entropy:branches=1-fake-model"):
        assert_openai_error(chat(proxy, {"model": model, "messages": user()}), 400,
                            code="invalid_strategy_params")


def test_a_certain_reply_is_streamed_once_without_interventions(proxy, fake):
    fake.script = lambda body: FakeReply(texts=["The answer is 42."], logprobs_fn=entries({}))
    with sync_client(proxy) as sdk:
        completion = sdk.chat.completions.create(model="entropy-fake-model", messages=user())
    assert completion.choices[0].message.content == "The answer is 42."
    assert completion.model_extra["ttc"]["details"]["interventions"] == []
    assert completion.model_extra["ttc"]["details"]["regimes"] == {"flowing": 4}
    assert completions(fake) == []


def test_prompt_tokens_served_from_the_engine_cache_are_summed_and_reported(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:
            return FakeReply(texts=[" is 42."], logprobs_fn=entries({}), cached_tokens=7)
        return FakeReply(texts=["The answer is 42."], cached_tokens=2,
                         logprobs_fn=entries({" is": [(" is", math.log(0.05)), *UNIFORM]}))

    fake.script = script
    completion = client.chat.completions.create(model=f"entropy:{PARAMS}-fake-model", messages=user())
    assert completion.usage.prompt_tokens_details.cached_tokens == 9  # the first stream's 2, the continuation's 7
    assert completion.usage.prompt_tokens > 9


def test_branch_from_streams_the_first_positions_at_once(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:
            return FakeReply(texts=[" 40"], logprobs_fn=entries({}))
        uniform = lambda choice, index, token: [(token, math.log(0.05)), *UNIFORM]  # noqa: E731
        return FakeReply(texts=["The answer is 42"], logprobs_fn=uniform)

    fake.script = script
    thresholds = PARAMS.replace("mapping=entropix,", "")
    completion = client.chat.completions.create(model=f"entropy:{thresholds},branches=2,branch_from=2-fake-model",
                                                messages=user())
    (intervention,) = completion.model_extra["ttc"]["details"]["interventions"]
    assert intervention["position"] == 2 and intervention["token"] == " is"  # "The", " answer" kept, unbranched


def test_a_json_response_format_is_refused_by_strategies_that_continue_token_ids(proxy, fake):
    for model in ("entropy-fake-model", "pts-fake-model"):
        response = chat(proxy, {"model": model, "messages": user(), "response_format": {"type": "json_object"}})
        error = assert_openai_error(response, 400, param="response_format", code="unsupported_by_strategy")
        assert "token ids" in error["message"]
    fake.script = lambda body: FakeReply(texts=["42"], logprobs_fn=entries({}))
    ok = chat(proxy, {"model": "entropy-fake-model", "messages": user(), "response_format": {"type": "text"}})
    assert ok.status_code == 200


def test_a_fork_at_the_last_allowed_position_keeps_max_tokens(client, fake):
    # the other branch is its forced token alone (it had asked for one more token: 5 tokens of max_tokens=4)
    fork = [(" 42", math.log(0.85)), (" 41", math.log(0.15 / 19))] + [(f"f{j}", math.log(0.15 / 19))
                                                                      for j in range(18)]

    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:
            return FakeReply(texts=["!"], token_logprob=-0.05)
        return FakeReply(texts=["The answer is 42"], finish_reason="length",
                         logprobs_fn=entries({" 42": fork}))

    fake.script = script
    completion = client.chat.completions.create(
        model=f"entropy:{PARAMS},branches=2,min_branch_probability=0.005-fake-model", messages=user(), max_tokens=4)
    assert completion.choices[0].message.content in ("The answer is 41", "The answer is 42")
    assert completion.choices[0].finish_reason == "length"


def test_a_pause_that_does_not_fit_in_max_tokens_is_not_inserted(client, fake):
    # " hold on" (2 tokens) at the last of 3 positions would make 4
    fake.script = lambda body: FakeReply(texts=["The answer is"], finish_reason="length",
                                         logprobs_fn=entries({" is": [(" is", math.log(0.05)), *UNIFORM]}))
    params = dict(p.split("=") for p in PARAMS.split(","))
    completion = client.chat.completions.create(
        model="fake-model", messages=user(), max_tokens=3,
        extra_body={"ttc": {"strategy": "entropy", "params": {**params, "pause": " hold on"}}})
    assert completion.choices[0].message.content == "The answer is"


def test_a_client_leaving_while_a_cut_stream_winds_down_stops_the_decoder():
    # The cut stream's reader is awaited as it winds down; a cancellation (the client leaving) that arrives then
    # must end the decoder, not be taken for the reader's own and let it open the next stream.
    import asyncio

    from ttc_proxy.strategies.guided import GuidedDecoder, Insert

    opened: list[object] = []

    class Ctx:
        def stream(self, options=None, *, prefix=None, **_: object):
            opened.append(prefix)

            async def events():
                try:
                    yield StreamEvent("a", Token("a", -0.1, 1, top=(TokenAlternative("a", -0.1, 1),)))
                    await asyncio.sleep(10)
                finally:
                    await asyncio.sleep(0.2)  # closing the engine's response takes a moment

            return events()

        async def emit(self, text: str) -> None:
            pass

        async def token_ids(self, tokens):
            return [t.id for t in tokens]

    async def policy(position, decoder):
        return Insert((2,), "b", "pause", "test")

    async def main() -> None:
        decoder = GuidedDecoder(Ctx(), max_tokens=8, temperature=0.0, top_logprobs=2, max_interventions=3)
        task = asyncio.create_task(decoder.run(policy))
        await asyncio.sleep(0.1)  # the cut is made; the reader is winding down
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(opened) == 1

    asyncio.run(main())


def test_vllm_style_logprobs_name_alternatives_by_id_and_list_the_stop_token(client, fake):
    """vLLM names tokens "token_id:N" (alternatives with that name's bytes, not their text) and lists the stop
    token, with empty text, in a stream's last chunk: neither may reach the reply."""
    fork = [(" 42", math.log(0.85)), (" 41", math.log(0.15 / 19))] + [(f"f{j}", math.log(0.15 / 19))
                                                                      for j in range(18)]

    def script(body: dict[str, Any]) -> FakeReply:
        if "prompt" in body:
            return FakeReply(texts=["!"], token_logprob=-0.05)
        return FakeReply(texts=["The answer is 42 sure"],
                         logprobs_fn=entries({" 42": fork, " sure": [(" sure", -6.0)]}))

    fake.script = script
    fake.vllm_logprobs = True
    try:
        completion = client.chat.completions.create(
            model=f"entropy:{PARAMS},branches=2,min_branch_probability=0.005-fake-model", messages=user())
        plain = client.chat.completions.create(model="entropy:branch_from=100-fake-model", messages=user())
    finally:
        fake.vllm_logprobs = False
    assert completion.choices[0].message.content == "The answer is 41!"  # " 41" detokenized from its id
    (intervention,) = completion.model_extra["ttc"]["details"]["interventions"]
    assert intervention["kept"] == " 41"
    assert [r for r in fake.requests if r.path == "/detokenize"]
    assert plain.choices[0].message.content == "The answer is 42 sure"  # no "<|im_end|>"
