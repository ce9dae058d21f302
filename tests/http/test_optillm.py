"""optillm compatibility (issue 21): optillm's approach slugs as model prefixes, '&' and '|', the `optillm_approach`
body field and the `<optillm_approach>` prompt tag; approaches we lack are a 400 listing what maps. The contract
tests send optillm's README request examples as written (only the base URL changed, as a migrating client would);
the scripted backend stands in for gpt-4o / gpt-4o-mini (it serves any model name)."""

from __future__ import annotations

import openai
import pytest

from ttc_proxy.proxy.optillm import APPROACHES, is_optillm_prefix, optillm_spec, read_optillm_request
from ttc_proxy.strategies import BUILTIN_STRATEGIES
from ttc_proxy.tools.fakebackend import FakeReply

from tests.helpers import ProxyServer, fake_config, assert_openai_error, backend_entry, chat, sse_lines, sse_payloads, sync_client, user


@pytest.fixture(scope="module")
def optillm_proxy(fake_backend):
    """The proxy with the scripted backend serving the README's model names, as a migrating user's config would."""
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, models=["gpt-4o", "gpt-4o-mini"])])
    with ProxyServer(config) as server:
        yield server


@pytest.fixture()
def proxy(optillm_proxy):
    return optillm_proxy


@pytest.fixture()
def client(optillm_proxy, fake):
    with sync_client(optillm_proxy) as sdk:
        yield sdk


# ---------------------------------------------------------------- optillm's README examples, as written


def test_readme_usage_example_moa_answers(client, fake):
    completion = client.chat.completions.create(
        model="moa-gpt-4o",
        messages=[{"role": "user", "content": "Write a Python program to build an RL model to recite text from "
                                              "any position that the user provides, using only numpy."}],
        temperature=0.2)
    assert completion.model_extra["ttc"]["strategy"] == "moa" and completion.choices[0].message.content
    assert completion.model == "moa-gpt-4o"


def test_readme_body_field_example_runs_each_approach_as_a_choice(client, fake):
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": ""}],
                                                temperature=0.2, extra_body={"optillm_approach": "bon|moa|mcts"})
    assert completion.model_extra["ttc"]["strategy"] == "parallel"
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert all("optillm_approach" not in request.body for request in fake.requests)


def test_readme_prompt_tag_example_runs_re2_without_the_tag(client, fake):
    completion = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "<optillm_approach>re2</optillm_approach> How many r's are there "
                                              "in strawberry?"}],
        temperature=0.2)
    assert completion.model_extra["ttc"]["strategy"] == "re2" and completion.choices[0].message.content
    sent = str(fake.requests[0].body)
    assert "optillm_approach" not in sent and sent.count("How many r's are there in strawberry?") == 2


def test_an_approach_we_lack_is_a_400_listing_what_maps(client, fake):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="rto-gpt-4o", messages=user("Q"), temperature=0.2)
    error = info.value.body
    assert error["code"] == "unsupported_optillm_approach" and error["param"] == "model"
    assert "rto has no counterpart here" in error["message"]
    assert "cot_reflection → cot" in error["message"] and "moa → moa" in error["message"]
    assert fake.requests == []


# ---------------------------------------------------------------- the same conventions with approaches that map


def test_prefix_slug_runs_our_counterpart(client, fake):
    completion = client.chat.completions.create(model="cot_reflection-gpt-4o-mini", messages=user(), temperature=0.2)
    assert completion.model_extra["ttc"]["strategy"] == "cot"
    assert completion.choices[0].message.content
    assert {r.body["model"] for r in fake.chat_requests()} == {"gpt-4o-mini"}


@pytest.mark.parametrize("approach, strategy, params", [
    ("self_consistency", "sc", {}), ("thinkdeeper", "think", {}), ("entropy_decoding", "entropy", {}),
    ("majority_voting", "sc", {"n": 6}), ("genselect", "bon", {"select": "judge"}), ("deepthink", "deepthink", {}),
    ("bon", "bon", {}), ("mcts", "mcts", {}), ("deepconf", "deepconf", {}),
])
def test_each_mapped_approach(approach, strategy, params):
    spec = optillm_spec(approach, f"{approach}-m")
    assert (spec.slug, dict(spec.params)) == (strategy, params)
    assert spec.slug in BUILTIN_STRATEGIES


def test_body_field_runs_the_approach_and_is_not_forwarded(client, fake):
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=user(),
                                                extra_body={"optillm_approach": "self_consistency"})
    assert completion.model_extra["ttc"]["strategy"] == "sc"
    assert all("optillm_approach" not in r.body for r in fake.chat_requests())


def test_system_prompt_tag_runs_the_approach_and_is_cut_from_the_prompt(client, fake):
    messages = [{"role": "system", "content": "Be brief. <optillm_approach>cot_reflection</optillm_approach>"},
                {"role": "user", "content": "What is 6 times 7?"}]
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                extra_body={"optillm_approach": "self_consistency"})
    assert completion.model_extra["ttc"]["strategy"] == "cot"  # the tag wins over the field, as in optillm
    sent = fake.chat_requests()[0].body["messages"]
    assert "optillm_approach" not in str(sent)
    assert sent[0]["content"].startswith("Be brief.")


def test_none_and_auto_are_the_plain_model(client, fake):
    plain = client.chat.completions.create(model="none-gpt-4o-mini", messages=user())
    assert "ttc" not in (plain.model_extra or {})
    assert fake.requests[-1].body["model"] == "gpt-4o-mini"
    auto = client.chat.completions.create(model="gpt-4o-mini", messages=user(),
                                          extra_body={"optillm_approach": "auto"})
    assert "ttc" not in (auto.model_extra or {})
    assert "optillm_approach" not in fake.requests[-1].body


def test_pipe_returns_one_choice_per_approach(client, fake):
    fake.script = lambda body: FakeReply(texts=["The answer is 42."])
    completion = client.chat.completions.create(model="cot_reflection|self_consistency-gpt-4o-mini", messages=user())
    assert completion.model_extra["ttc"]["strategy"] == "parallel"
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.message.content == "The answer is 42." for c in completion.choices)
    stages = completion.model_extra["ttc"]["details"]["stages"]
    assert [s["strategy"] for s in stages] == ["cot", "sc"]


def test_pipe_streams_one_choice_per_approach(proxy, fake):
    fake.script = lambda body: FakeReply(texts=["42"])
    response = chat(proxy, {"model": "gpt-4o-mini", "messages": user(), "stream": True,
                            "optillm_approach": "self_consistency|majority_voting"})
    payloads = [p for p in sse_payloads(sse_lines(response)) if isinstance(p, dict)]
    finishes = {c["index"]: c["finish_reason"] for p in payloads for c in p["choices"] if c.get("finish_reason")}
    assert finishes == {0: "stop", 1: "stop"}
    content = {}
    for p in payloads:
        for c in p["choices"]:
            content[c["index"]] = content.get(c["index"], "") + (c["delta"].get("content") or "")
    assert content == {0: "42", 1: "42"}


def test_ampersand_feeds_each_answer_to_the_next(client, fake):
    def script(body):
        question = body["messages"][-1]["content"]
        return FakeReply(texts=[f"[{question}]"])

    fake.script = script
    completion = client.chat.completions.create(model="self_consistency&majority_voting-gpt-4o-mini",
                                                messages=user("Q"), temperature=0.5)
    assert completion.model_extra["ttc"]["strategy"] == "pipeline"
    assert completion.choices[0].message.content == "[[Q]]"  # the second stage answered the first one's answer
    stages = completion.model_extra["ttc"]["details"]["stages"]
    assert [s["answer"] for s in stages] == ["[Q]", "[[Q]]"]


@pytest.mark.parametrize("model, fragment", [
    ("bon&z3-gpt-4o", "z3 has no counterpart"),
    ("bon&mcts|self_consistency-gpt-4o", "'&' or with '|', not both"),
    ("none&bon-gpt-4o", "'none' cannot be combined"),
    ("memory|readurls-gpt-4o", "memory, readurls have no counterpart"),
])
def test_bad_combinations_are_400s(proxy, fake, model, fragment):
    error = assert_openai_error(chat(proxy, {"model": model, "messages": user()}), 400, param="model")
    assert fragment in error["message"]
    assert fake.requests == []


def test_a_body_field_that_is_no_approach(proxy, fake):
    error = assert_openai_error(chat(proxy, {"model": "m", "messages": user(), "optillm_approach": "frobnicate"}),
                                400, param="optillm_approach", code="unsupported_optillm_approach")
    assert "cot_reflection → cot" in error["message"]
    error = assert_openai_error(chat(proxy, {"model": "m", "messages": user(), "optillm_approach": 3}), 400,
                                param="optillm_approach", code="invalid_type")


def test_plain_model_names_are_not_optillm():
    assert not is_optillm_prefix("gpt") and not is_optillm_prefix("fake") and not is_optillm_prefix("Qwen3")
    assert is_optillm_prefix("bon|moa|mcts") and is_optillm_prefix("none")
    body = {"model": "m", "messages": user()}
    assert read_optillm_request(body) is body  # untouched without the field or the tag


def test_every_optillm_slug_is_listed():
    # optillm's known_approaches, its local decodings and its plugins (optillm/server.py and optillm/plugins)
    known = {"mcts", "bon", "moa", "rto", "z3", "self_consistency", "pvg", "rstar", "cot_reflection", "plansearch",
             "leap", "re2", "cepo", "mars", "cot_decoding", "entropy_decoding", "thinkdeeper", "autothink", "deepconf",
             "coc", "deep_research", "deepthink", "executecode", "genselect", "json", "longcepo", "majority_voting",
             "mcp", "memory", "privacy", "proxy", "readurls", "router", "spl", "web_search"}
    assert set(APPROACHES) == known
