"""AB-MCTS (`mcts`): the tree it grows, how it batches siblings, scorers, selectors, budgets, step level,
composition over cot, streaming and the trace, all over HTTP with the official SDK against the scripted fake."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import httpx
import pytest

from ttc_proxy.strategies.cot import INSTRUCTIONS
from ttc_proxy.tools.fakebackend import FakeBackend, FakeReply

from tests.helpers import fake_config
from tests.helpers import (
    ProxyServer,
    assert_openai_error,
    backend_entry,
    chat,
    sync_client,
    user,
)

QUESTION = user()
REFINE_START = "Your answer above was scored"
LINE = re.compile(r"^round (\d+): node (\d+) \((widen|deepen|step|final step) (?:from the root|from node (\d+))\)")


# ---------------------------------------------------------------- helpers


def is_probe(body: dict[str, Any]) -> bool:
    """The proxy's one-off prefill echo probe (asked once per backend, before its first prefill)."""
    messages = body.get("messages") or []
    return bool(messages) and str(messages[-1].get("content", "")).startswith("Echo probe")


def engine_calls(fake: FakeBackend) -> list[dict[str, Any]]:
    """The chat request bodies the strategy sent (the echo probe left out)."""
    return [r.body for r in fake.chat_requests() if not is_probe(r.body)]


def is_refine(body: dict[str, Any]) -> bool:
    return str(body["messages"][-1].get("content", "")).startswith(REFINE_START)


def with_logprob(p: float):
    """logprobs_fn: every token is sampled with probability p (and has four less likely alternatives)."""
    return lambda choice, index, token: [(token, math.log(p))] + [(f"alt{j}", math.log(p) - 2 - j) for j in range(4)]


class Numbered:
    """A script whose every choice says a new number ("The answer is K.", K = 100, 101, ...), so each node of the
    tree can be traced back to the request that made it (`made[answer]` is that request's body)."""

    def __init__(self, logprob: float = -0.1) -> None:
        self.next = 100
        self.logprob = logprob
        self.made: dict[str, dict[str, Any]] = {}

    def __call__(self, body: dict[str, Any]) -> FakeReply:
        if is_probe(body):
            return FakeReply(texts=["ok"])
        numbers = list(range(self.next, self.next + int(body.get("n") or 1)))
        self.next += len(numbers)
        for k in numbers:
            self.made[str(k)] = body
        return FakeReply(texts=[f"The answer is {k}." for k in numbers], token_logprob=self.logprob)


def text_of(answer: str) -> str:
    return f"The answer is {answer}."


def reasoning_of(completion: Any) -> str:
    return completion.choices[0].message.model_extra["reasoning_content"]


def rounds_of(reasoning: str) -> dict[int, int]:
    """node id -> the round that made it, from the progress lines."""
    made = {}
    for line in reasoning.splitlines():
        match = LINE.match(line)
        if match:
            made[int(match.group(2))] = int(match.group(1))
    return made


def check_tree(details: dict[str, Any], iterations: int, batch: int) -> list[dict[str, Any]]:
    """The invariants every answer-level tree keeps; returns the tree."""
    tree = details["tree"]
    assert [n["id"] for n in tree] == list(range(len(tree)))
    refused = [n for n in tree if n["action"] == "refused"]
    assert len(tree) == iterations * batch  # every trial of every round is a node (refused ones included)
    assert details["refused_trials"] == len(refused)
    assert details["nodes"] == iterations * batch - len(refused)
    assert details["widened"] == sum(n["action"] == "widen" for n in tree)
    assert details["deepened"] == sum(n["action"] == "deepen" for n in tree)
    for node in tree:
        if node["action"] == "widen":
            assert node["parent"] is None and node["depth"] == 1
        else:
            parent = node["parent"]
            assert parent is not None and 0 <= parent < node["id"], node  # an earlier node
            assert node["depth"] == tree[parent]["depth"] + 1
            assert tree[parent]["action"] != "refused" or node["action"] == "refused"
    chosen = tree[details["node"]]
    assert chosen["action"] != "refused" and details["answer"] == chosen["answer"]
    return tree


# ---------------------------------------------------------------- the tree


def test_tree_bookkeeping(client, fake):
    fake.script = script = Numbered()
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=4,batch=3-fake-model", messages=QUESTION, seed=11)
    details = completion.ttc["details"]
    tree = check_tree(details, 4, 3)
    assert details["deepened"] >= 1, "seed 11 deepens some node"
    assert details["level"] == "answer" and details["score"] == "logprob" and details["select"] == "best"
    assert details["temperature"] == 0.8
    calls = engine_calls(fake)
    assert all(body["temperature"] == 0.8 for body in calls)
    # Every node that made a call traces back to exactly one request; widen requests ask the question as it
    # was, deepen requests refine the parent's answer.
    for node in tree:
        if node["action"] == "refused":
            continue
        body = script.made[node["answer"]]
        if node["action"] == "widen":
            assert body["messages"] == QUESTION
        else:
            parent = tree[node["parent"]]
            assert is_refine(body)
            assert body["messages"][:-2] == QUESTION
            assert body["messages"][-2] == {"role": "assistant", "content": text_of(parent["answer"])}
            assert f"scored {parent['score']:.2f} out of 1" in body["messages"][-1]["content"]
    # The tree in the details is the one the trace's root noted, and the answer is the chosen node's text.
    trace = httpx.get(f"{client.base_url}traces/{completion.ttc['trace_id']}").json()
    assert trace["nodes"][0]["notes"]["tree"] == tree
    assert completion.choices[0].message.content == text_of(details["answer"])
    # One progress line per node that was grown, naming its round, its parent and its answer.
    lines = {int(m.group(2)): m for m in map(LINE.match, reasoning_of(completion).splitlines()) if m}
    assert sorted(lines) == [n["id"] for n in tree if n["action"] != "refused"]
    for node_id, match in lines.items():
        node = tree[node_id]
        assert match.group(3) == node["action"]
        assert (int(match.group(4)) if match.group(4) else None) == node["parent"]


def test_refine_prompt_holds_the_parents_answer_and_the_answers_found_so_far(client, fake):
    # One trial per round: the nodes that exist when a refine prompt is written are exactly the earlier ids.
    fake.script = script = Numbered()
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=5,batch=1-fake-model", messages=QUESTION, seed=5)
    details = completion.ttc["details"]
    tree = check_tree(details, 5, 1)
    deepened = [n for n in tree if n["action"] == "deepen"]
    assert deepened, "seed 5 deepens some node"
    for node in deepened:
        body = script.made[node["answer"]]
        parent = tree[node["parent"]]
        others = [n["answer"] for n in tree[:node["id"]] if n["action"] != "refused" and n["id"] != parent["id"]]
        assert body["messages"][-2] == {"role": "assistant", "content": text_of(parent["answer"])}
        prompt = body["messages"][-1]["content"]
        assert prompt.startswith(f"{REFINE_START} {parent['score']:.2f} out of 1 by a checker. ")
        assert f"Answers found so far: {', '.join(others[:8]) or 'none'}. " in prompt


def test_a_parent_too_deep_is_refused_without_a_call(client, fake):
    fake.script = script = Numbered()
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=4,batch=2,max_depth=1-fake-model", messages=QUESTION, seed=3)
    details = completion.ttc["details"]
    tree = check_tree(details, 4, 2)
    refused = [n for n in tree if n["action"] == "refused"]
    assert refused, "seed 3 tries to deepen"
    assert details["deepened"] == 0
    for node in refused:
        assert node["score"] == 0 and tree[node["parent"]]["action"] in ("widen", "refused")
    calls = engine_calls(fake)
    assert not any(is_refine(body) for body in calls)
    assert len(calls) == details["nodes"] == len(script.made)  # seeded: one call per grown node, none per refusal
    assert completion.ttc["backend_calls"] == details["nodes"]


# ---------------------------------------------------------------- batching and seeds


class FavouringRefinements(Numbered):
    """Numbered, with refinements far more likely (0.99) than fresh answers (0.1): the search soon prefers to
    deepen, and then often expands one node several times in a round."""

    def __call__(self, body: dict[str, Any]) -> FakeReply:
        reply = super().__call__(body)
        reply.token_logprob = math.log(0.99 if is_refine(body) else 0.1)
        return reply


def test_siblings_share_one_request_with_n_when_unseeded(client, fake):
    fake.script = Numbered()
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=1,batch=4-fake-model", messages=QUESTION)
    (body,) = engine_calls(fake)
    assert body["n"] == 4 and "seed" not in body
    assert [n["action"] for n in completion.ttc["details"]["tree"]] == ["widen"] * 4

    # Over several rounds: one request per (round, parent) group, drawing all of that group's siblings. Unseeded,
    # the search is random: run it until some round has refined one node several times (9 runs in 10 do).
    refined_siblings = []
    for _ in range(10):
        script = FavouringRefinements()
        fake.reset(script)
        completion = client.chat.completions.create(
            model="mcts:level=answer,iterations=4,batch=4-fake-model", messages=QUESTION)
        details = completion.ttc["details"]
        tree = check_tree(details, 4, 4)
        rounds = rounds_of(reasoning_of(completion))
        groups: dict[tuple[int, int | None], list[int]] = defaultdict(list)
        for node in tree:
            if node["action"] != "refused":
                groups[(rounds[node["id"]], node["parent"])].append(node["id"])
        calls = engine_calls(fake)
        assert len(calls) == len(groups) == completion.ttc["backend_calls"]
        assert sum(body.get("n", 1) for body in calls) == details["nodes"]
        for (_, parent), group in groups.items():
            bodies = {id(script.made[tree[i]["answer"]]) for i in group}
            assert len(bodies) == 1, "siblings of one parent in one round come from one request"
            body = script.made[tree[group[0]]["answer"]]
            assert body.get("n", 1) == len(group) and "seed" not in body
            if parent is not None and len(group) > 1:
                assert is_refine(body)
                assert body["messages"][-2]["content"] == text_of(tree[parent]["answer"])
                refined_siblings.append(group)
        if refined_siblings:
            break
    assert refined_siblings, "no run refined one node twice in a round"


def test_seeded_samples_are_each_their_own_request_and_a_rerun_repeats(client, fake):
    model = "mcts:level=answer,iterations=3,batch=3,score=agreement-fake-model"

    def script(body: dict[str, Any]) -> FakeReply:
        return FakeReply(texts=[f"The answer is {body['seed'] % 3}."])

    fake.script = script
    first = client.chat.completions.create(model=model, messages=QUESTION, seed=42)
    calls = engine_calls(fake)
    details = first.ttc["details"]
    check_tree(details, 3, 3)
    assert all("n" not in body for body in calls)
    assert len(calls) == details["nodes"] == first.ttc["backend_calls"]
    seeds = [body["seed"] for body in calls]
    assert len(set(seeds)) == len(seeds)
    widen_seeds = sorted(body["seed"] for body in calls if not is_refine(body))
    assert widen_seeds == list(range(42, 42 + details["widened"]))  # fresh answers: seed + i, as in sc and bon

    fake.reset(script)
    again = client.chat.completions.create(model=model, messages=QUESTION, seed=42)
    assert again.ttc["details"]["tree"] == details["tree"]
    assert again.choices[0].message.content == first.choices[0].message.content
    assert sorted(body["seed"] for body in engine_calls(fake)) == sorted(seeds)


def test_a_seeded_rerun_repeats_whatever_order_the_engine_answers_in(client, fake):
    # A round of this seeded search expands two parents at once; the engine answers those calls in an order the
    # client does not control (here: the first run gets one call back first, the rerun the other). The same seed
    # must still give the same tree and the same answer.
    model = "mcts:level=answer,iterations=3,batch=2-fake-model"

    def script(reverse: bool):
        def reply(body: dict[str, Any]) -> FakeReply:
            refine = is_refine(body)
            if refine:  # "Refined: K0" for a parent that answered K; more likely than a fresh answer
                key = int(re.findall(r"\d+", body["messages"][-2]["content"])[-1]) % 10
                text, p = f"Refined: {key}0", 0.95
            else:
                key = (body["seed"] - 3) % 10
                text, p = f"The answer is {body['seed'] % 7}.", 0.6
            delay = 0.03 * ((10 - key) if reverse else key)
            return FakeReply(texts=[text], logprobs_fn=with_logprob(p), delay=delay)
        return reply

    results = []
    for reverse in (False, True):
        fake.reset(script(reverse))
        completion = client.chat.completions.create(model=model, messages=QUESTION, seed=3)
        rounds = rounds_of(reasoning_of(completion))
        parents = {(rounds[n["id"]], n["parent"]) for n in completion.ttc["details"]["tree"] if n["id"] in rounds}
        assert len(parents) > len(set(rounds.values())), "seed 3 expands two parents in one round"
        results.append((completion.ttc["details"]["tree"], completion.choices[0].message.content))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]


def test_nodes_of_one_round_are_scored_against_the_same_pool(client, fake):
    # Seed 42 refines three parents in round 2, and all three refinements answer 0. Scored by agreement over the
    # same nodes, equal answers of one round must score the same, whichever call the engine answered first.
    fake.script = lambda body: FakeReply(texts=[f"The answer is {body['seed'] % 3}."])
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=3,batch=3,score=agreement-fake-model", messages=QUESTION, seed=42)
    tree = completion.ttc["details"]["tree"]
    rounds = rounds_of(reasoning_of(completion))
    by_answer: dict[tuple[int, str], set[float]] = defaultdict(set)
    for node in tree:
        by_answer[(rounds[node["id"]], node["answer"])].add(node["score"])
    assert any(len({n["parent"] for n in tree if rounds[n["id"]] == r}) > 1 for r in set(rounds.values())), \
        "seed 42 expands several parents in one round"
    assert {key: scores for key, scores in by_answer.items() if len(scores) > 1} == {}


# ---------------------------------------------------------------- scorers and selectors


def test_logprob_scorer_picks_the_most_probable_node(client, fake):
    texts = ["The answer is 7.", "It is 8.", "I get 12.", "So 9"]
    probabilities = [0.5, 0.6, 0.97, 0.3]
    fake.script = lambda body: FakeReply(
        texts=texts, logprobs_fn=lambda choice, index, token: with_logprob(probabilities[choice])(choice, index, token))
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=1,batch=4,score=logprob-fake-model", messages=QUESTION)
    (body,) = engine_calls(fake)
    assert body["n"] == 4 and body["logprobs"] is True and body["top_logprobs"] == 5
    details = completion.ttc["details"]
    assert [n["score"] for n in details["tree"]] == pytest.approx(probabilities, abs=1e-4)
    assert details["node"] == 2 and details["answer"] == "12"
    assert completion.choices[0].message.content == "I get 12."


def test_agreement_scorer_scores_by_shared_answers_and_ignores_logprobs(client, fake):
    texts = ["The answer is 7.", "7", "I get 12.", "It is 7"]
    probabilities = [0.3, 0.3, 0.99, 0.3]  # 12 is the most probable reply, but the others agree
    fake.script = lambda body: FakeReply(
        texts=texts, logprobs_fn=lambda choice, index, token: with_logprob(probabilities[choice])(choice, index, token))
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=1,batch=4,score=agreement-fake-model", messages=QUESTION)
    (body,) = engine_calls(fake)
    assert "top_logprobs" not in body  # the scorer asks for no alternatives
    details = completion.ttc["details"]
    assert [n["score"] for n in details["tree"]] == [0.6667, 0.6667, 0.0, 0.6667]  # the others that agree
    assert details["answer"] == "7" and details["node"] == 0
    assert completion.choices[0].message.content == "The answer is 7."


# Six fresh answers (seeds 100..105): 3 at 0.1 (most votes), 12 at 0.6 twice (highest summed score, 1.2),
# 99 once at 0.95 (best single node).
POOL = [("It is 3.", 0.1), ("3", 0.1), ("So 3", 0.1), ("I get 12.", 0.6), ("12!", 0.6), ("Surely 99.", 0.95)]


@pytest.mark.parametrize(("select", "answer", "content"), [
    ("best", "99", "Surely 99."),
    ("vote", "3", "It is 3."),
    ("weighted", "12", "I get 12."),
])
def test_select(client, fake, select, answer, content):
    def script(body: dict[str, Any]) -> FakeReply:
        text, p = POOL[body["seed"] - 100]
        return FakeReply(texts=[text], logprobs_fn=with_logprob(p))

    fake.script = script
    completion = client.chat.completions.create(
        model=f"mcts:level=answer,iterations=1,batch=6,select={select}-fake-model", messages=QUESTION, seed=100)
    details = completion.ttc["details"]
    assert [n["answer"] for n in details["tree"]] == ["3", "3", "3", "12", "12", "99"]
    assert details["select"] == select and details["answer"] == answer
    assert completion.choices[0].message.content == content


def test_a_truncated_node_scores_zero_unless_count_truncated(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if body["seed"] == 100:  # very likely, but cut off by max_tokens while still quoting an operand
            return FakeReply(texts=["So 12 + 12"], finish_reason="length", logprobs_fn=with_logprob(0.99))
        return FakeReply(texts=["It is 5."], logprobs_fn=with_logprob(0.5))

    fake.script = script
    model = "mcts:level=answer,iterations=1,batch=2{}-fake-model"
    default = client.chat.completions.create(model=model.format(""), messages=QUESTION, seed=100, max_tokens=4)
    tree = default.ttc["details"]["tree"]
    assert tree[0]["finish_reason"] == "length" and tree[0]["score"] == 0
    assert tree[1]["score"] == pytest.approx(0.5, abs=1e-4)
    assert default.choices[0].message.content == "It is 5." and default.choices[0].finish_reason == "stop"

    counted = client.chat.completions.create(model=model.format(",count_truncated=true"), messages=QUESTION,
                                             seed=100, max_tokens=4)
    tree = counted.ttc["details"]["tree"]
    assert tree[0]["score"] == pytest.approx(0.99, abs=1e-4)
    assert counted.choices[0].message.content == "So 12 + 12"
    assert counted.choices[0].finish_reason == "length"  # the chosen reply itself was cut off


# ---------------------------------------------------------------- budgets


def test_budget_exhaustion_returns_the_best_node_so_far(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if is_refine(body):
            return FakeReply(texts=["Refined: 9"], logprobs_fn=with_logprob(0.99))
        probabilities = [0.9, 0.4]
        return FakeReply(texts=["The answer is 7.", "It is 8."],
                         logprobs_fn=lambda c, i, t: with_logprob(probabilities[c])(c, i, t))

    fake.script = script
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=4,batch=2-fake-model", messages=QUESTION,
        extra_body={"ttc": {"budget": {"max_calls": 3}}})
    assert completion.ttc["budget_exhausted"] is True
    assert completion.choices[0].finish_reason == "length"
    assert completion.ttc["backend_calls"] == 3 and len(engine_calls(fake)) == 3
    details = completion.ttc["details"]
    tree = details["tree"]
    assert 2 <= details["nodes"] < 8  # the first round's two nodes at least, not the whole search
    best = max((n for n in tree if n["action"] != "refused"), key=lambda n: (n["score"], -n["id"]))
    assert details["node"] == best["id"]
    texts = {"7": "The answer is 7.", "8": "It is 8.", "9": "Refined: 9"}
    assert completion.choices[0].message.content == texts[best["answer"]]


def test_budget_with_no_answer_yet_is_429_not_to_be_retried(proxy, fake):
    fake.script = lambda body: FakeReply(delay=2.0)
    response = chat(proxy, {"model": "mcts:level=answer,iterations=2,batch=2-fake-model", "messages": QUESTION,
                            "ttc": {"budget": {"max_seconds": 0.2}}})
    error = assert_openai_error(response, 429, code="budget_exhausted")
    assert response.headers["x-should-retry"] == "false"
    assert "budget" in error["message"]


def test_one_call_budget_whose_call_fails_is_429(proxy, fake):
    # Seeded, the first round's two samples are two calls: the budget lets one start, and that one fails.
    fake.script = lambda body: FakeReply(status=500)
    response = chat(proxy, {"model": "mcts:level=answer,iterations=2,batch=2-fake-model", "messages": QUESTION,
                            "seed": 1, "ttc": {"budget": {"max_calls": 1}}})
    assert_openai_error(response, 429, code="budget_exhausted")
    assert response.headers["x-should-retry"] == "false"
    assert len(engine_calls(fake)) == 1


# ---------------------------------------------------------------- step level


def test_step_level_continues_the_parents_text_and_cuts_at_the_delimiter(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if is_probe(body):
            return FakeReply(texts=["ok"])
        messages = body["messages"]
        if messages[-1]["role"] == "assistant":  # a continuation of the parent's text (prefill)
            return FakeReply(texts=["Step 2|The answer is 42"])
        return FakeReply(texts=["Step 1|Step 2|"])

    fake.script = script
    completion = client.chat.completions.create(
        model="mcts:iterations=3,batch=1,level=step,delimiter=|,step_tokens=7,max_depth=2-fake-model",
        messages=QUESTION, seed=1)
    details = completion.ttc["details"]
    tree = details["tree"]
    assert details["level"] == "step"
    finals = [n for n in tree if n["action"] == "finish"]
    assert finals, "seed 1 continues a step"
    for node in tree:
        if node["action"] == "step":  # cut after the first delimiter of "Step 1|Step 2|"
            assert node["parent"] is None and node["depth"] == 1 and node["terminal"] is False
            assert node["answer"] == "1" and node["finish_reason"] == "step"
        else:  # at the last depth the whole continuation is kept
            assert node["action"] == "finish" and node["terminal"] is True
            assert tree[node["parent"]]["action"] == "step" and node["depth"] == 2 and node["answer"] == "42"
    calls = engine_calls(fake)
    fresh = [b for b in calls if b["messages"][-1]["role"] != "assistant"]
    continued = [b for b in calls if b["messages"][-1]["role"] == "assistant"]
    assert len(fresh) == sum(n["action"] == "step" for n in tree) and len(continued) == len(finals)
    assert all(b["messages"] == QUESTION and b["max_tokens"] == 7 for b in fresh)
    for body in continued:
        assert body["messages"] == [*QUESTION, {"role": "assistant", "content": "Step 1|"}]
        assert body["max_tokens"] == 512  # the last step is a whole reply: the request's max_tokens
    assert completion.choices[0].message.content == "Step 1|Step 2|The answer is 42"
    assert completion.choices[0].finish_reason == "stop"


def test_step_level_cuts_each_intermediate_step_at_the_delimiter(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if is_probe(body):
            return FakeReply(texts=["ok"])
        messages = body["messages"]
        if messages[-1]["role"] == "assistant":
            prefix = messages[-1]["content"]
            k = prefix.count(";") + 1
            return FakeReply(texts=[f" step {k}; step {k + 1}; step {k + 2};"])
        return FakeReply(texts=["step 1; step 2;"])

    fake.script = script
    completion = client.chat.completions.create(
        model="mcts:iterations=4,batch=1,level=step,delimiter=;,max_depth=4-fake-model", messages=QUESTION, seed=1)
    tree = completion.ttc["details"]["tree"]
    continued = [b for b in engine_calls(fake) if b["messages"][-1]["role"] == "assistant"]
    assert continued, "seed 1 continues a step"
    for body in continued:
        # Each prefix is a parent's text: whole steps, each ending at the delimiter.
        prefix = body["messages"][-1]["content"]
        assert prefix.endswith(";")
        k = prefix.count(";")
        assert prefix == "step 1;" + "".join(f" step {i};" for i in range(2, k + 1))
    for node in tree:
        if node["action"] == "step":
            assert node["answer"] == str(node["depth"])  # one more step per level, cut after its delimiter


def test_logprob_scoring_without_logprobs_is_a_400_before_any_call(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities={"logprobs": False})])
    with ProxyServer(config) as server, sync_client(server) as client:
        for model in ("mcts-fake-model", "mcts:score=logprob-fake-model", "mcts:score=confidence-fake-model"):
            response = chat(server, {"model": model, "messages": QUESTION})
            error = assert_openai_error(response, 400, code="backend_capability_missing")
            assert "logprobs" in error["message"]
        assert fake.requests == []
        # A scorer that needs no logprobs runs there, and asks for none.
        fake.script = lambda body: FakeReply(texts=["7", "7", "8"])
        completion = client.chat.completions.create(
            model="mcts:level=answer,iterations=1,batch=3,score=agreement-fake-model", messages=QUESTION)
    assert completion.ttc["details"]["answer"] == "7"
    assert all("logprobs" not in body and "top_logprobs" not in body for body in engine_calls(fake))


# ---------------------------------------------------------------- composition, streaming, trace

COT_REPLY = ("<thinking>6 times 7: 6 sevens are {a}.</thinking>\n<reflection>Checked.</reflection>\n"
             "<output>{a}</output>")


def test_mcts_over_cot(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        answer = 41 if is_refine(body) else 42
        return FakeReply(texts=[COT_REPLY.format(a=answer)])

    fake.script = script
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=2,batch=2>cot-fake-model", messages=QUESTION)
    assert completion.ttc["over"] == "cot"
    details = completion.ttc["details"]
    tree = check_tree(details, 2, 2)
    assert details["temperature"] is None  # the runs of cot sample; mcts only passes its temperature on
    calls = engine_calls(fake)
    assert len(calls) == details["nodes"]  # one cot run, one call, per node
    for body in calls:
        assert body["messages"][0]["role"] == "system" and body["messages"][0]["content"].startswith(INSTRUCTIONS)
        assert body["temperature"] == 0.8 and body["logprobs"] is True
    widen = [b for b in calls if not is_refine(b)]
    assert len(widen) == details["widened"] >= 2
    assert all(b["messages"][1:] == QUESTION for b in widen)
    for body in calls:
        if is_refine(body):  # the parent cot run's answer is its output section
            assert body["messages"][-2] == {"role": "assistant", "content": "42"}
    assert completion.choices[0].message.content in ("42", "41")
    assert [n["answer"] for n in tree if n["action"] == "widen"] == ["42"] * details["widened"]


def test_step_level_over_another_strategy_is_a_400_before_any_call(proxy, fake):
    response = chat(proxy, {"model": "mcts:level=step>cot-fake-model", "messages": QUESTION})
    error = assert_openai_error(response, 400)
    assert "level=step" in error["message"] and "level=answer" in error["message"]
    assert fake.requests == []


def test_streaming_shows_progress_then_the_answer(client, fake):
    fake.script = lambda body: FakeReply(texts=["The answer is 7.", "It is 8."])
    stream = client.chat.completions.create(
        model="mcts:level=answer,iterations=2,batch=2-fake-model", messages=QUESTION, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    lines = reasoning.splitlines()
    assert lines[0] == "AB-MCTS: 2 rounds of 2 nodes (answer level), scored by logprob"
    assert lines[1:3] == ["round 1: node 0 (widen from the root) → 7 score 0.905",
                          "round 1: node 1 (widen from the root) → 8 score 0.905"]
    assert all(line.startswith("round 2: node ") for line in lines[3:5])
    assert lines[-1] == "answer: 7 (node 0, score 0.905, 4 nodes)"
    assert content == "The answer is 7."
    assert "round 1" not in content and "The answer is 7." not in reasoning
    last = chunks[-1] if chunks[-1].choices else chunks[-2]
    assert last.choices[0].finish_reason == "stop"
    assert last.model_extra["ttc"]["details"]["answer"] == "7"


def test_trace_has_deepen_spans_linked_to_their_parents(client, fake):
    fake.script = script = Numbered()
    completion = client.chat.completions.create(
        model="mcts:level=answer,iterations=5,batch=1-fake-model", messages=QUESTION, seed=5)
    tree = completion.ttc["details"]["tree"]
    deepened = [n for n in tree if n["action"] == "deepen"]
    assert deepened, "seed 5 deepens some node"
    trace = httpx.get(f"{client.base_url}traces/{completion.ttc['trace_id']}").json()
    nodes = trace["nodes"]
    root = nodes[0]
    assert root["label"] == "mcts" and root["kind"] == "run" and root["status"] == "ok"
    spans = [n for n in nodes if n["label"] == "deepen"]
    assert spans and all(s["kind"] == "span" and s["parent"] == 0 for s in spans)
    assert sorted(s["expands"] for s in spans) == sorted(n["parent"] for n in deepened)
    for span in spans:
        (call,) = [n for n in nodes if n["parent"] == span["id"]]
        assert call["label"] == "refine" and call["kind"] == "call" and call["status"] == "ok"
        # The call's output is the refinement of the node the span expands.
        (child,) = [n for n in deepened if n["parent"] == span["expands"] and text_of(n["answer"]) in call["outputs"]]
        assert script.made[child["answer"]]["messages"][-2]["content"] == text_of(tree[span["expands"]]["answer"])
    widen_calls = [n for n in nodes if n["label"] == "widen"]
    assert len(widen_calls) == completion.ttc["details"]["widened"]
    assert all(n["parent"] == 0 and n["kind"] == "call" for n in widen_calls)


def is_judge(body: dict[str, Any]) -> bool:
    return str(body["messages"][-1].get("content", "")).endswith("Is the proposed answer correct? Answer yes or no.")


def test_the_judge_scorer_asks_once_per_distinct_answer(client, fake):
    fake.script = lambda body: FakeReply(texts=["yes"] if is_judge(body) else ["The answer is 7."])
    completion = client.chat.completions.create(
        model="mcts:level=answer,score=judge,iterations=2,batch=4-fake-model", messages=QUESTION)
    assert completion.ttc["details"]["nodes"] == 8
    judged = [b for b in engine_calls(fake) if is_judge(b)]
    assert len(judged) == 1  # eight nodes, one answer ("7"): one question


def test_a_judge_refused_by_the_budget_keeps_the_answers_drawn(client, fake):
    fake.script = lambda body: FakeReply(texts=["yes"] if is_judge(body) else ["The answer is 7."])
    completion = client.chat.completions.create(
        model="mcts:level=answer,score=judge,iterations=2,batch=4-fake-model", messages=QUESTION,
        extra_body={"ttc": {"budget": {"max_calls": 1}}})
    # The four answers came in one call (n=4); their judge was refused, so they stand unjudged (score ½).
    assert completion.ttc["budget_exhausted"] is True and completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content == "The answer is 7."
    assert [n["score"] for n in completion.ttc["details"]["tree"]] == [0.5] * 4


@pytest.mark.parametrize(("model", "capabilities", "level"), [
    ("mcts:iterations=1,batch=2-fake-model", {}, "step"),  # the default: the best measured, where it can run
    ("mcts:iterations=1,batch=2-fake-model", {"prefill": False, "completions": False}, "answer"),
    ("mcts:iterations=1,batch=2>cot-fake-model", {}, "answer"),
    ("mcts:iterations=1,batch=2,level=answer-fake-model", {}, "answer"),
])
def test_level_auto_is_step_where_it_can_run(fake_backend, fake, model, capabilities, level):
    fake.script = lambda body: FakeReply(texts=["<output>7</output>"])
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities=capabilities)])
    with ProxyServer(config) as server, sync_client(server) as client:
        completion = client.chat.completions.create(model=model, messages=QUESTION)
    assert completion.ttc["details"]["level"] == level
    assert completion.ttc["params"]["level"] == ("answer" if "level=answer" in model else "auto")
