"""Chain of thought (`cot`), budget forcing (`think`) and parallel deep thinking (`deepthink`), over HTTP with the
official SDK against the scripted fake (and `deepthink`'s plan parser as a pure function)."""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import pytest

from ttc_proxy.strategies.cot import EXAMPLE, INSTRUCTIONS
from ttc_proxy.strategies.deepthink import APPROACHES, parse_plan
from ttc_proxy.tools.fakebackend import FakeReply

from tests.helpers import fake_config
from tests.helpers import (
    ProxyServer,
    assert_openai_error,
    backend_entry,
    chat,
    sync_client,
    user,
)

COT_PROMPT = f"{INSTRUCTIONS}\n\n{EXAMPLE}"


def is_probe(body: dict[str, Any]) -> bool:
    """The proxy's one-off prefill echo probe (asked once per backend, before its first prefill)."""
    messages = body.get("messages") or []
    return bool(messages) and str(messages[-1].get("content", "")).startswith("Echo probe")


def engine_calls(fake) -> list[dict[str, Any]]:
    return [r.body for r in fake.chat_requests() if not is_probe(r.body)]


def reasoning_of(completion: Any) -> str:
    return completion.choices[0].message.model_extra["reasoning_content"]


def with_logprob(p: float):
    return lambda choice, index, token: [(token, math.log(p))] + [(f"alt{j}", math.log(p) - 2 - j) for j in range(4)]


# ================================================================ cot

COT_REPLY = ("<thinking>6 times 7: six sevens make 42.</thinking>\n<reflection>42 / 6 = 7, so it holds.</reflection>\n"
             "<output>The answer is 42</output>")


def test_cot_prompt_goes_after_the_clients_system_messages_and_leaves_the_rest(client, fake):
    fake.script = lambda body: FakeReply(texts=[COT_REPLY])
    conversation = [
        {"role": "system", "content": "Be terse."},
        {"role": "developer", "content": "Numbers only."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! Ask away."},
        {"role": "system", "content": "A later system note stays where it is."},
        {"role": "user", "content": "What is 6 times 7?"},
    ]
    client.chat.completions.create(model="cot-fake-model", messages=conversation)
    (body,) = engine_calls(fake)
    assert body["messages"] == [*conversation[:2], {"role": "system", "content": COT_PROMPT}, *conversation[2:]]

    fake.reset(lambda body: FakeReply(texts=[COT_REPLY]))
    client.chat.completions.create(model="cot-fake-model", messages=user())
    (body,) = engine_calls(fake)
    assert body["messages"] == [{"role": "system", "content": COT_PROMPT}, *user()]


def test_cot_answer_is_the_output_section_and_the_reasoning_its_thinking(client, fake):
    fake.script = lambda body: FakeReply(texts=[COT_REPLY])
    completion = client.chat.completions.create(model="cot-fake-model", messages=user())
    assert completion.choices[0].message.content == "The answer is 42"
    reasoning = reasoning_of(completion)
    assert "6 times 7: six sevens make 42." in reasoning and "42 / 6 = 7, so it holds." in reasoning
    assert "<output>" not in reasoning and "The answer is 42" not in reasoning
    details = completion.ttc["details"]
    assert details["format_followed"] is True and details["answer"] == "The answer is 42"
    assert completion.choices[0].finish_reason == "stop"
    # Everything but the output section's tokens is reasoning.
    usage = completion.usage
    assert usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens


@pytest.mark.parametrize(("reply", "answer"), [
    ("<thinking>6 sevens.</thinking> It is 42.", "It is 42."),
    ("<thinking>6 sevens.</thinking>\n<reflection>Fine.</reflection>\nSo: 42", "So: 42"),
    ("Just 42.", "Just 42."),
])
def test_cot_reply_without_an_output_section_is_the_reply_minus_its_sections(client, fake, reply, answer):
    fake.script = lambda body: FakeReply(texts=[reply])
    completion = client.chat.completions.create(model="cot-fake-model", messages=user())
    assert completion.choices[0].message.content == answer
    assert completion.ttc["details"]["format_followed"] is False
    if "<thinking>" in reply:
        assert "6 sevens." in reasoning_of(completion)


# The fake's tokens are word pieces that start at a space: here the output section's tokens are " The",
# " answer", " is", " 42" (the answer "The answer is 42" begins one character into " The").
SPACED_REPLY = ("<thinking>6 times 7 is 42.</thinking> <reflection>Checked.</reflection> "
                "<output> The answer is 42 </output>")
OUTPUT_TOKENS = [" The", " answer", " is", " 42"]


def test_cot_logprobs_cover_no_thinking_tokens(client, fake):
    fake.script = lambda body: FakeReply(texts=[SPACED_REPLY])
    completion = client.chat.completions.create(model="cot-fake-model", messages=user(), logprobs=True,
                                                top_logprobs=2)
    (body,) = engine_calls(fake)
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert completion.choices[0].message.content == "The answer is 42"
    content = completion.choices[0].logprobs.content
    assert content, "the answer's tokens come with their logprobs"
    texts = [entry.token for entry in content]
    assert all(text in OUTPUT_TOKENS for text in texts), texts  # nothing from thinking, reflection or the tags
    assert texts == OUTPUT_TOKENS[len(OUTPUT_TOKENS) - len(texts):]
    assert all(len(entry.top_logprobs) == 2 and entry.logprob == -0.1 for entry in content)


def test_cot_logprobs_cover_the_whole_answer(client, fake):
    fake.script = lambda body: FakeReply(texts=[SPACED_REPLY])
    completion = client.chat.completions.create(model="cot-fake-model", messages=user(), logprobs=True,
                                                top_logprobs=2)
    texts = [entry.token for entry in completion.choices[0].logprobs.content]
    assert texts == OUTPUT_TOKENS  # the answer's first word included
    assert "".join(texts).strip() == completion.choices[0].message.content


@pytest.mark.parametrize(("temperature", "used"), [(None, 0.8), (0.3, 0.3)])
def test_bon_over_cot_runs_cot_n_times_at_the_parents_temperature(client, fake, temperature, used):
    answers = iter(["41", "42", "42"])
    fake.script = lambda body: FakeReply(texts=[COT_REPLY.replace("The answer is 42", next(answers))])
    kwargs = {} if temperature is None else {"temperature": temperature}
    completion = client.chat.completions.create(model="bon:n=3,select=vote>cot-fake-model", messages=user(),
                                                **kwargs)
    calls = engine_calls(fake)
    assert len(calls) == 3 and completion.ttc["backend_calls"] == 3
    for body in calls:
        assert body["messages"] == [{"role": "system", "content": COT_PROMPT}, *user()]
        assert body["temperature"] == used and "n" not in body
    details = completion.ttc["details"]
    assert completion.ttc["over"] == "cot" and details["source"] == "cot"
    assert sorted(c["answer"] for c in details["candidates"]) == ["41", "42", "42"]
    assert details["answer"] == "42" and details["scores"] == {"42": 2, "41": 1}
    assert completion.choices[0].message.content == "42"


# ================================================================ think

THINK = "think:min_thinking_tokens=10,max_thinking_tokens=20-fake-model"
ANSWER = " The answer is 42."
FIRST_THOUGHT = "6 times 7 is 42."  # 5 tokens: stops below min_thinking_tokens


def think_script(answer_delay: float = 0.0):
    """The model stops thinking after 5 tokens; after "Wait" it thinks on until max_tokens (honoured, as an
    engine does); the answer after the cue is streamed token by token."""

    def script(body: dict[str, Any]) -> FakeReply:
        if is_probe(body):
            return FakeReply(texts=["ok"])
        prefix = body["messages"][-1]["content"]
        assert body["messages"][-1]["role"] == "assistant" and body["messages"][:-1] == user()
        if body.get("stream"):
            return FakeReply(texts=[ANSWER], chunk_delay=answer_delay)
        if prefix.endswith("Wait"):
            return FakeReply(texts=["".join(f" w{i}" for i in range(body["max_tokens"]))], finish_reason="length")
        return FakeReply(texts=[FIRST_THOUGHT])

    return script


THINKING = "<think>\n" + FIRST_THOUGHT + "\nWait" + "".join(f" w{i}" for i in range(15))


def test_think_appends_wait_then_cuts_at_max_and_asks_for_the_answer(client, proxy, fake):
    fake.script = think_script()
    completion = client.chat.completions.create(model=THINK, messages=user())
    first, second, answer = engine_calls(fake)
    assert first["messages"][-1] == {"role": "assistant", "content": "<think>\n"}
    assert first["max_tokens"] == 20 and first["stop"] == ["</think>"] and not first.get("stream")
    # Stopped after 5 tokens, below the minimum of 10: "Wait" is appended and the model goes on.
    assert second["messages"][-1]["content"] == "<think>\n" + FIRST_THOUGHT + "\nWait"
    assert second["messages"][-1]["content"].endswith("Wait")
    assert second["max_tokens"] == 15 and second["stop"] == ["</think>"]
    # At 20 thinking tokens the thinking is cut: the close tag and the answer cue follow, and the answer streams.
    assert answer["messages"][-1]["content"] == THINKING + "\n</think>\nFinal answer:"
    assert answer["stream"] is True
    details = completion.ttc["details"]
    assert details == {"thinking_tokens": 20, "waits": 1, "answer_tokens": 4, "cut_at_max": True,
                       "continued_model_thinking": False}
    assert completion.choices[0].message.content == "The answer is 42."
    reasoning = reasoning_of(completion)
    assert FIRST_THOUGHT in reasoning and " w14" in reasoning
    assert "stopped after 5 thinking tokens, below 10: appending 'Wait'" in reasoning
    assert "The answer is 42" not in reasoning
    # The backend's one-time prefill echo probe is counted by the run that made it (the first to continue a prefix).
    trace = httpx.get(f"{proxy.url}/v1/traces/{completion.ttc['trace_id']}").json()
    probe = sum(n["completion_tokens"] for n in trace["nodes"] if n["label"] == "echo probe")
    assert completion.usage.completion_tokens == 5 + 15 + 4 + probe
    assert completion.usage.completion_tokens_details.reasoning_tokens == 20 + probe


def test_think_streams_the_answer_as_it_is_generated(client, fake):
    fake.script = think_script(answer_delay=0.05)
    stream = client.chat.completions.create(model=THINK, messages=user(), stream=True)
    arrivals = []
    for chunk in stream:
        arrivals.append((time.monotonic(), chunk))
    finals = [i for i, (_, c) in enumerate(arrivals) if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    final_at, final = arrivals[finals[0]]
    contents = [(at, c.choices[0].delta.content) for at, c in arrivals[:finals[0]]
                if c.choices and c.choices[0].delta.content]
    assert len(contents) > 1  # token by token, not in one piece at the end
    assert "".join(text for _, text in contents) == "The answer is 42."
    assert not final.choices[0].delta.content
    # The first pieces reached the client while the engine was still generating the rest.
    assert final_at - contents[0][0] >= 0.1
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for _, c in arrivals if c.choices)
    assert FIRST_THOUGHT in reasoning and "appending 'Wait'" in reasoning
    assert final.model_extra["ttc"]["details"]["cut_at_max"] is True


def test_think_waits_at_most_max_waits_times(client, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if is_probe(body):
            return FakeReply(texts=["ok"])
        if body.get("stream"):
            return FakeReply(texts=[" 42"])
        return FakeReply(texts=["Hmm, 42."])  # always stops early

    fake.script = script
    completion = client.chat.completions.create(
        model="think:min_thinking_tokens=50,max_thinking_tokens=100,max_waits=2-fake-model", messages=user())
    calls = engine_calls(fake)
    thinking = [b for b in calls if not b.get("stream")]
    assert len(thinking) == 3 and len(calls) == 4
    assert [b["messages"][-1]["content"].count("\nWait") for b in thinking] == [0, 1, 2]
    assert all(b["messages"][-1]["content"].endswith("Wait") for b in thinking[1:])
    assert completion.ttc["details"]["waits"] == 2 and completion.ttc["details"]["cut_at_max"] is False
    assert calls[-1]["messages"][-1]["content"].endswith("Hmm, 42.\n</think>\nFinal answer:")
    assert completion.choices[0].message.content == "42"


def test_think_without_prefill_continues_the_rendered_conversation(fake_backend, fake):
    def script(body: dict[str, Any]) -> FakeReply:
        if body.get("stream"):
            return FakeReply(texts=[ANSWER])
        return FakeReply(texts=[" long enough thinking here, it says forty-two."])

    fake.script = script
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, capabilities={"prefill": False})])
    with ProxyServer(config) as server, sync_client(server) as client:
        completion = client.chat.completions.create(model="think:min_thinking_tokens=4-fake-model",
                                                    messages=user())
    assert fake.chat_requests() == []
    raw = [r.body for r in fake.requests if r.path.endswith("/completions")]
    assert len(raw) == 2
    assert raw[0]["prompt"] == "<|user|>What is 6 times 7?\n<|assistant|><think>\n"
    assert raw[1]["prompt"].endswith("forty-two.\n</think>\nFinal answer:") and raw[1]["stream"] is True
    assert completion.choices[0].message.content == "The answer is 42."


def test_think_on_a_backend_that_cannot_continue_is_a_400(fake_backend, fake):
    config = fake_config(fake_backend, backends=[backend_entry(fake_backend, kind="transformers")])
    with ProxyServer(config) as server:
        for stream in (False, True):
            response = chat(server, {"model": "think-fake-model", "messages": user(), "stream": stream})
            error = assert_openai_error(response, 400, code="backend_capability_missing")
            assert "continue" in error["message"] and "transformers" in error["message"]
    assert fake.requests == []


# ================================================================ deepthink


def test_parse_plan_picks_fillers_and_short_adaptations():
    plan = ("2: Split 6 times 7 into 6 times 5 plus 6 times 2.\n"
            "5. ok\n"
            "9: a way that is not on the list\n"
            "2: the same way twice counts once\n"
            "4) Estimate 6 times 7 near 40, then compute it.")
    approaches, planned = parse_plan(plan, 3)
    assert approaches == ["Split 6 times 7 into 6 times 5 plus 6 times 2.", APPROACHES[4],
                          "Estimate 6 times 7 near 40, then compute it."]
    assert planned == 3
    # Fewer picks than k: the rest come from the list, in order, skipping the picked ones.
    approaches, planned = parse_plan("1: Multiply 6 by 7 digit by digit.", 3)
    assert approaches == ["Multiply 6 by 7 digit by digit.", APPROACHES[1], APPROACHES[2]] and planned == 1
    # Picks beyond k are ignored.
    approaches, planned = parse_plan("3: Check it by dividing 42 by 7.\n6: Try 6 times 1 first, then scale.", 1)
    assert approaches == ["Check it by dividing 42 by 7."] and planned == 1
    # Nothing usable: the first k of the list.
    assert parse_plan("I would just compute it.", 2) == ([APPROACHES[0], APPROACHES[1]], 0)
    assert parse_plan("", 4) == (list(APPROACHES[:4]), 0)


def test_parse_plan_reads_a_pick_without_adaptation_as_its_listed_way():
    # "2:" adapts nothing: it keeps way 2's listed text, and the next line is a pick of its own.
    approaches, planned = parse_plan("2:\n3: Compute 6 x 7, then divide by 7 to check.", 3)
    assert approaches == [APPROACHES[1], "Compute 6 x 7, then divide by 7 to check.", APPROACHES[0]]
    assert planned == 2


PLAN_REPLY = ("3: Compute 6 x 7, then divide 42 by 7 to check.\n"
              "1: Add 7 six times, writing each sum.\n"
              "5: Note that 6 and 7 are given and their product is asked.")
PLANNED = ["Compute 6 x 7, then divide 42 by 7 to check.", "Add 7 six times, writing each sum.",
           "Note that 6 and 7 are given and their product is asked."]
SYNTHESIS_REPLY = "Attempt 1 checks its result.\nAnswer: 42"


def is_plan(body: dict[str, Any]) -> bool:
    return body["messages"][-1]["content"].startswith("Here are ways to reason about a problem:")


def is_synthesis(body: dict[str, Any]) -> bool:
    return "They disagree." in body["messages"][-1]["content"]


def deepthink_script(explorations: dict[str, tuple[str, float, str]]):
    """Plan: PLAN_REPLY. Exploration of approach A: explorations[A] = (reply, token probability, finish)."""

    def script(body: dict[str, Any]) -> FakeReply:
        if is_plan(body):
            return FakeReply(texts=[PLAN_REPLY])
        if is_synthesis(body):
            return FakeReply(texts=[SYNTHESIS_REPLY])
        system = body["messages"][0]["content"]
        (approach,) = [a for a in explorations if a in system]
        text, p, finish = explorations[approach]
        return FakeReply(texts=[text], logprobs_fn=with_logprob(p), finish_reason=finish)

    return script


def test_deepthink_agreement_answers_directly_without_synthesis(client, fake):
    fake.script = deepthink_script({
        PLANNED[0]: ("42 / 7 = 6, it checks.\nAnswer: 42", 0.5, "stop"),
        PLANNED[1]: ("7, 14, 21, 28, 35, 42.\nAnswer: 42", 0.9, "stop"),
        PLANNED[2]: ("The product is 41.\nAnswer: 41", 0.99, "stop"),
    })
    completion = client.chat.completions.create(model="deepthink-fake-model", messages=user())
    calls = engine_calls(fake)
    assert len(calls) == 4 and completion.ttc["backend_calls"] == 4  # the plan and three explorations
    assert not any(is_synthesis(b) for b in calls)
    (plan,) = [b for b in calls if is_plan(b)]
    assert plan["temperature"] == 0.0 and plan["max_tokens"] == 160
    assert "Problem: What is 6 times 7?" in plan["messages"][-1]["content"]
    assert "Pick the 3 ways" in plan["messages"][-1]["content"]
    explored = [b for b in calls if not is_plan(b)]
    assert sorted(b["messages"][0]["content"] for b in explored) == sorted(
        f"Solve the problem with this approach: {a} Reason briefly, then give the final answer on the last line "
        f"as 'Answer: ...'." for a in PLANNED)
    assert all(b["messages"][1:] == user() for b in explored)
    details = completion.ttc["details"]
    assert details["route"] == "direct" and details["answer"] == "42"
    assert details["approaches"] == PLANNED and details["planned"] == 3
    assert details["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    # Of the two explorations answering 42, the more likely one is returned.
    assert completion.choices[0].message.content == "7, 14, 21, 28, 35, 42.\nAnswer: 42"
    assert "answering directly" in reasoning_of(completion)


def test_deepthink_disagreement_makes_one_synthesis_call_listing_the_attempts(client, fake):
    replies = {PLANNED[0]: "42 / 7 = 6.\nAnswer: 42", PLANNED[1]: "7 + 7 + ... = 49.\nAnswer: 49",
               PLANNED[2]: "Given 6 and 7.\nAnswer: 13"}
    fake.script = deepthink_script({a: (r, 0.8, "stop") for a, r in replies.items()})
    conversation = [{"role": "system", "content": "Be exact."}, *user()]
    completion = client.chat.completions.create(model="deepthink-fake-model", messages=conversation)
    calls = engine_calls(fake)
    synthesis = [b for b in calls if is_synthesis(b)]
    assert len(calls) == 5 and len(synthesis) == 1
    (body,) = synthesis
    assert body["temperature"] == 0.0
    assert body["messages"][:-1] == conversation[:-1]  # the conversation before the question is kept
    prompt = body["messages"][-1]["content"]
    assert prompt.startswith("What is 6 times 7?\n\nHere are 3 attempts at this problem:\n\n")
    for i, approach in enumerate(PLANNED, start=1):
        assert f"Attempt {i} ({approach}):\n{replies[approach]}" in prompt
    details = completion.ttc["details"]
    assert details["route"] == "synthesis" and details["answer"] == "42"
    assert details["agreement"] == pytest.approx(1 / 3, abs=1e-4)
    assert completion.choices[0].message.content == SYNTHESIS_REPLY


def test_deepthink_cut_off_explorations_count_as_not_agreeing(client, fake):
    fake.script = deepthink_script({
        PLANNED[0]: ("So 42.\nAnswer: 42", 0.8, "stop"),
        PLANNED[1]: ("7 + 7 + 7 + 7 + 7 + 7 = 42", 0.8, "length"),
        PLANNED[2]: ("It is 41.\nAnswer: 41", 0.8, "stop"),
    })
    completion = client.chat.completions.create(model="deepthink-fake-model", messages=user())
    assert completion.ttc["details"]["route"] == "synthesis"
    assert len([b for b in engine_calls(fake) if is_synthesis(b)]) == 1


def test_deepthink_with_every_exploration_cut_off_does_not_answer_directly(client, fake):
    # Cut off by max_tokens, none of the explorations reached an answer (each quotes the last number it wrote):
    # no finished exploration agrees with another, so the synthesis decides.
    fake.script = deepthink_script({a: ("7 + 7 + 7 + 7 + 7 + 7 = 42", 0.8, "length") for a in PLANNED})
    completion = client.chat.completions.create(model="deepthink-fake-model", messages=user())
    details = completion.ttc["details"]
    assert [e["finish_reason"] for e in details["explorations"]] == ["length"] * 3
    assert details["route"] == "synthesis" and details["agreement"] == 0
    assert len([b for b in engine_calls(fake) if is_synthesis(b)]) == 1
    assert completion.choices[0].message.content == SYNTHESIS_REPLY


def test_deepthink_without_a_plan_explores_the_first_k_listed_ways(client, fake):
    fake.script = deepthink_script({a: ("So it is 42.\nAnswer: 42", 0.8, "stop") for a in APPROACHES})
    completion = client.chat.completions.create(model="deepthink:plan=false,k=2-fake-model", messages=user())
    calls = engine_calls(fake)
    assert len(calls) == 2 and completion.ttc["backend_calls"] == 2
    assert not any(is_plan(b) or is_synthesis(b) for b in calls)
    assert sorted(b["messages"][0]["content"] for b in calls) == sorted(
        f"Solve the problem with this approach: {a} Reason briefly, then give the final answer on the last line "
        f"as 'Answer: ...'." for a in APPROACHES[:2])
    details = completion.ttc["details"]
    assert details["approaches"] == list(APPROACHES[:2]) and details["planned"] == 0
    assert details["route"] == "direct" and completion.choices[0].message.content == "So it is 42.\nAnswer: 42"


def test_think_keeps_a_call_for_its_answer_when_the_budget_is_short(client, fake):
    fake.script = lambda body: FakeReply(texts=["ok" if body["messages"][-1]["content"].endswith("answer:")
                                                else "hmm"])
    completion = client.chat.completions.create(model="think:min_thinking_tokens=50-fake-model", messages=user(),
                                                extra_body={"ttc": {"budget": {"max_calls": 2}}})
    assert completion.choices[0].message.content.strip() == "ok"
    assert completion.choices[0].finish_reason == "length" and completion.ttc["budget_exhausted"] is True
    assert completion.ttc["backend_calls"] == 2 and completion.ttc["details"]["waits"] == 0


def test_think_within_its_budget_is_not_budget_exhausted(client, fake):
    fake.script = lambda body: FakeReply(texts=["ok" if body["messages"][-1]["content"].endswith("answer:")
                                                else "a long enough thought here"])
    completion = client.chat.completions.create(model="think:min_thinking_tokens=3-fake-model", messages=user(),
                                                extra_body={"ttc": {"budget": {"max_calls": 2}}})
    assert completion.choices[0].finish_reason == "stop" and completion.ttc["budget_exhausted"] is False


def test_think_returns_the_logprobs_of_its_answer(client, fake):
    fake.script = lambda body: FakeReply(texts=[" It is 42" if body["messages"][-1]["content"].endswith("answer:")
                                                else "a long enough thought here"])
    completion = client.chat.completions.create(model="think:min_thinking_tokens=3-fake-model", messages=user(),
                                                logprobs=True, top_logprobs=2)
    content = completion.choices[0].logprobs.content
    assert completion.choices[0].message.content == "It is 42"
    assert "".join(e.token for e in content) == " It is 42" and all(len(e.top_logprobs) == 2 for e in content)


@pytest.mark.parametrize("budget", [300, 600])
def test_think_under_a_token_budget_keeps_room_for_its_answer(client, fake, budget):
    # Thinking runs to whatever max_tokens it is given; the answer call's prompt holds all of that thinking, so the
    # thinking may take only about half of what the answer leaves.
    def script(body):
        last = body["messages"][-1]["content"]
        if body["messages"][-1]["role"] == "assistant" and "Final answer" not in last:
            return FakeReply(texts=[" ".join(["step"] * body["max_tokens"])], finish_reason="length")
        return FakeReply(texts=[" 42"])
    fake.script = script
    completion = client.chat.completions.create(model="think-fake-model", messages=user(), max_tokens=32,
                                                extra_body={"ttc": {"budget": {"max_total_tokens": budget}}})
    assert completion.choices[0].message.content.strip() == "42"
    assert completion.usage.total_tokens <= budget
    assert completion.choices[0].finish_reason == "length" and completion.ttc["budget_exhausted"] is True
    assert 0 < completion.ttc["details"]["thinking_tokens"] < budget / 2


def test_response_format_never_constrains_a_continued_prefix(client, fake):
    # A grammar applies to what the engine generates, here a continuation of the thinking: it would force the
    # thinking itself into JSON. So continuations go without it.
    fake.script = lambda body: FakeReply(texts=['{"answer": 42}' if body["messages"][-1]["content"].endswith("answer:")
                                                else "a long enough thought here"])
    completion = client.chat.completions.create(model="think:min_thinking_tokens=3-fake-model", messages=user(),
                                                response_format={"type": "json_object"})
    continued = [r.body for r in fake.chat_requests() if r.body["messages"][-1]["role"] == "assistant"]
    assert continued and all("response_format" not in body for body in continued)
    assert completion.choices[0].message.content == '{"answer": 42}'
