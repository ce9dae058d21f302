"""RunSpans (a run's spans mirroring its trace tree) with the SDK's in-memory exporter: parents, GenAI attribute
names, no text without capture_content; and a failing observer never fails the run it watches."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ttc_proxy.proxy.config import TelemetrySettings
from ttc_proxy.proxy.telemetry import Telemetry
from ttc_proxy.proxy.traces import Trace


def finished_spans(capture_content: bool) -> dict[str, Any]:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TelemetrySettings(capture_content=capture_content), exporter=exporter)
    trace = Trace("bon")
    trace.update(0, model="smollm2")
    trace.observe(telemetry.run_spans("bon:n=2", [{"role": "user", "content": "secret question"}]))
    span = trace.add(0, "deepen", "span", expands=3)
    call = trace.add(span, "refine", "call", endpoint="/chat/completions", n=2, seed=7, temperature=0.8)
    trace.update(call, status="ok", prompt_tokens=11, completion_tokens=5, outputs=["secret answer"],
                 scores=[0.5, 0.25])
    trace.update(0, status="ok", details={"answer": "42", "votes": {"42": 2}})
    telemetry.shutdown()
    return {s.name: s for s in exporter.get_finished_spans()}


def test_spans_follow_the_tree_with_genai_names() -> None:
    spans = finished_spans(capture_content=False)
    assert set(spans) == {"strategy bon", "deepen", "chat smollm2"}
    root, deepen, call = spans["strategy bon"], spans["deepen"], spans["chat smollm2"]
    assert deepen.parent.span_id == root.context.span_id
    assert call.parent.span_id == deepen.context.span_id
    assert call.attributes["gen_ai.operation.name"] == "chat"
    assert call.attributes["gen_ai.request.model"] == "smollm2"
    assert call.attributes["gen_ai.usage.input_tokens"] == 11
    assert call.attributes["gen_ai.usage.output_tokens"] == 5
    assert call.attributes["gen_ai.request.seed"] == 7
    assert call.attributes["gen_ai.request.choice.count"] == 2
    assert tuple(call.attributes["ttc.scores"]) == (0.5, 0.25)
    assert deepen.attributes["ttc.expands"] == 3
    # text stays out: the outputs, the prompt, and details holding an answer
    assert "ttc.outputs" not in call.attributes
    assert "gen_ai.input.messages" not in root.attributes
    assert "ttc.details" not in root.attributes
    assert all(span.end_time is not None for span in spans.values())


def test_capture_content_adds_the_text() -> None:
    spans = finished_spans(capture_content=True)
    assert "secret answer" in spans["chat smollm2"].attributes["ttc.outputs"]
    assert "secret question" in spans["strategy bon"].attributes["gen_ai.input.messages"]
    assert '"answer": "42"' in spans["strategy bon"].attributes["ttc.details"]


class Failing:
    def started(self, trace_id: str, root: dict[str, Any]) -> None:
        pass

    def added(self, node: dict[str, Any]) -> None:
        raise RuntimeError("exporter bug")

    def updated(self, node: dict[str, Any]) -> None:
        raise AssertionError("dropped after its first failure")


def test_a_failing_observer_is_dropped_and_the_trace_goes_on() -> None:
    trace = Trace("sc")
    trace.observe(Failing())
    node = trace.add(0, "sample", "call")
    trace.update(node, status="ok")
    assert trace.nodes[node]["status"] == "ok"
    assert trace.observer is None
