"""An unchanged LangChain agent loop (langchain-openai's ChatOpenAI with bound tools) through `sc:n=5-<model>`,
`bon-<model>` and `auto-<model>` on the scripted backend: the model asks for a tool, the loop runs it, sends the result back as a
`tool` message, and the model answers."""

from __future__ import annotations

import pytest

import langchain_openai  # noqa: E402
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402

from ttc_proxy.tools.fakebackend import FakeReply  # noqa: E402


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def scripted_model(body: dict) -> FakeReply:
    """Asks for multiply(6, 7) until a tool result is in the conversation, then answers with it."""
    results = [m["content"] for m in body["messages"] if m.get("role") == "tool"]
    if results:
        return FakeReply(texts=[f"The answer is {results[-1]}."])
    return FakeReply(tool_calls=[[("multiply", '{"a": 6, "b": 7}')]])


def run_agent(model: str, base_url: str, streaming: bool = False) -> tuple[str, list]:
    llm = langchain_openai.ChatOpenAI(model=model, base_url=base_url, api_key="x", max_retries=0,
                                      streaming=streaming).bind_tools([multiply])
    messages: list = [HumanMessage("What is 6 times 7? Use the tool.")]
    for _ in range(4):
        reply = llm.invoke(messages)
        messages.append(reply)
        if not reply.tool_calls:
            return str(reply.content), messages
        for call in reply.tool_calls:
            messages.append(ToolMessage(str(multiply.invoke(call["args"])), tool_call_id=call["id"]))
    raise AssertionError("the agent did not finish")


@pytest.mark.parametrize("model", ["sc:n=5-fake-model", "bon-fake-model", "bon:n=3,select=verifier-fake-model",
                                   "auto-fake-model"])
@pytest.mark.parametrize("streaming", [False, True])
def test_langchain_agent_loop_runs_unchanged(proxy, fake, model, streaming):
    fake.script = scripted_model
    answer, messages = run_agent(model, proxy.url + "/v1", streaming)
    assert answer == "The answer is 42."
    call = messages[1].tool_calls[0]
    assert call["name"] == "multiply" and call["args"] == {"a": 6, "b": 7} and call["id"]
    assert messages[2].content == "42"
    # the second turn's samples carried the tool result, linked to the call's id
    last = fake.chat_requests()[-1].body["messages"]
    assert last[-1] == {"role": "tool", "content": "42", "tool_call_id": call["id"]}
    assert last[-2]["tool_calls"][0]["id"] == call["id"]
