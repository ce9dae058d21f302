"""OpenTelemetry traces sent over OTLP/HTTP: a span per request, a child per strategy run, span and backend call.

Off unless `telemetry.otlp_endpoint` or OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set;
the other OTEL_* variables (service name, resource attributes, sampler, batch processor, headers) are honoured by
the SDK. A client's W3C `traceparent` becomes the request span's parent, and every backend call carries the
traceparent of its own span, so an engine that traces (vLLM) joins the same trace.

A strategy run's spans mirror its trace tree (proxy/traces.py): `RunSpans` watches the tree as it grows and opens
a span per node under its parent's, ending it when the node gets its final status. Attributes follow the GenAI
semantic conventions (gen_ai.operation.name, gen_ai.request.model, gen_ai.usage.input_tokens, ...) plus `ttc.*`
for what the strategy recorded (scores, votes, decisions). Text (prompts, outputs, answers) goes into spans only
with `telemetry.capture_content: true`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from .config import TelemetrySettings

ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
MAX_ATTRIBUTE_CHARS = 4096
# Statuses a trace node ends with (a stream cut on purpose is `cut@<chars>`).
_FINAL = frozenset({"ok", "error", "timeout", "refused", "cancelled"})
# Trace attributes with GenAI semantic-convention names.
_GENAI_NAMES = {
    "prompt_tokens": "gen_ai.usage.input_tokens",
    "completion_tokens": "gen_ai.usage.output_tokens",
    "temperature": "gen_ai.request.temperature",
    "max_tokens": "gen_ai.request.max_tokens",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
    "finish_reason": "gen_ai.response.finish_reasons",
}
# String attributes that are the proxy's own words, never the conversation's: kept without capture_content.
_NOT_CONTENT = frozenset({"status", "decision", "endpoint", "backend", "model", "over", "reason", "route",
                          "select", "mode", "kind", "label", "verifier"})
_TREE_FIELDS = frozenset({"id", "parent", "label", "kind"})


def otlp_configured(settings: TelemetrySettings) -> bool:
    return bool(settings.otlp_endpoint) or any(os.environ.get(name) for name in ENDPOINT_ENV)


class Telemetry:
    """The proxy's tracer: its own provider (never the global one), exporting in batches."""

    def __init__(self, settings: TelemetrySettings, exporter: SpanExporter | None = None) -> None:
        self.capture_content = settings.capture_content
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = settings.otlp_endpoint
            exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None)
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the default name (Resource.create reads them).
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "ttc-proxy"}
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("ttc_proxy")

    def shutdown(self) -> None:
        """Send what is still buffered, then stop."""
        self.provider.shutdown()

    # ---- requests ----

    def request_started(self, headers: Mapping[str, str], method: str, path: str) -> tuple[Span, object]:
        """The request's span, its parent the client's traceparent if it sent one, made current."""
        parent = propagate.extract(headers)
        span = self.tracer.start_span(f"{method} {path}", context=parent, kind=SpanKind.SERVER,
                                      attributes={"http.request.method": method, "url.path": path})
        token = otel_context.attach(otel_trace.set_span_in_context(span, parent))
        return span, token

    def request_finished(self, span: Span, token: object, status: int, model: str | None,
                         strategy: str | None, operation: str | None,
                         tokens: Mapping[str, int] | None) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]
        span.set_attribute("http.response.status_code", status)
        if operation is not None:
            span.set_attribute("gen_ai.operation.name", operation)
            span.set_attribute("gen_ai.provider.name", "ttc-proxy")
            if model is not None:
                span.set_attribute("gen_ai.request.model", model[:MAX_ATTRIBUTE_CHARS])
                span.update_name(f"{operation} {model[:200]}")
        if strategy is not None:
            span.set_attribute("ttc.strategy", strategy[:MAX_ATTRIBUTE_CHARS])
        if tokens:
            span.set_attribute("gen_ai.usage.input_tokens", tokens.get("prompt", 0))
            span.set_attribute("gen_ai.usage.output_tokens", tokens.get("completion", 0))
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    @staticmethod
    def outgoing_headers() -> dict[str, str]:
        """The current span's trace context as headers for a backend call (traceparent, tracestate)."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    def run_spans(self, composition: str, messages: Sequence[Mapping[str, Any]]) -> RunSpans:
        return RunSpans(self.tracer, self.capture_content, composition, messages)


class RunSpans:
    """A strategy run's spans, opened and ended as its trace tree grows (a proxy/traces.py TraceObserver)."""

    def __init__(self, tracer: Tracer, capture_content: bool, composition: str,
                 messages: Sequence[Mapping[str, Any]]) -> None:
        self.tracer = tracer
        self.capture_content = capture_content
        self.composition = composition
        self.messages = messages
        self.spans: dict[int, Span] = {}
        self.model: str | None = None

    def started(self, trace_id: str, root: Mapping[str, Any]) -> None:
        span = self.tracer.start_span(f"strategy {root['label']}", attributes={
            "ttc.strategy": str(root["label"]), "ttc.composition": self.composition, "ttc.trace_id": trace_id,
            "gen_ai.operation.name": "chat"})
        self.model = root.get("model") if isinstance(root.get("model"), str) else None
        if self.capture_content:
            span.set_attribute("gen_ai.input.messages", _text(self.messages))
        self.spans[0] = span

    def added(self, node: Mapping[str, Any]) -> None:
        parent = self.spans.get(node["parent"]) or self.spans.get(0)
        if parent is None:
            return
        kind = node["kind"]
        context = otel_trace.set_span_in_context(parent)
        if kind in ("call", "stream"):
            operation = "chat" if node.get("endpoint") == "/chat/completions" else "text_completion"
            model = self.model or ""
            span = self.tracer.start_span(f"{operation} {model}".strip(), context=context, kind=SpanKind.CLIENT,
                                          attributes={"gen_ai.operation.name": operation,
                                                      "gen_ai.request.model": model, "ttc.label": node["label"]})
            # The backend call that follows, in this task, carries this span as its parent (Backend.trace_headers).
            otel_context.attach(otel_trace.set_span_in_context(span))
        else:
            name = f"strategy {node['label']}" if kind == "strategy" else str(node["label"])
            span = self.tracer.start_span(name, context=context, attributes={"ttc.kind": kind})
        self._set(span, node)
        self.spans[node["id"]] = span

    def updated(self, node: Mapping[str, Any]) -> None:
        span = self.spans.get(node["id"])
        if span is None:
            return
        self._set(span, node)
        status = str(node.get("status", ""))
        if status in _FINAL or status.startswith("cut@"):
            if status in ("error", "timeout"):
                span.set_status(Status(StatusCode.ERROR, str(node.get("error", status))[:200]))
            if node["id"] == 0:  # the run is over: spans no status closes (plain spans) end with it
                for node_id, open_span in list(self.spans.items()):
                    if node_id != 0 and open_span.is_recording():
                        open_span.end()
            span.end()

    def _set(self, span: Span, node: Mapping[str, Any]) -> None:
        if not span.is_recording():
            return
        for key, value in node.items():
            if key in _TREE_FIELDS:
                continue
            name = _GENAI_NAMES.get(key, f"ttc.{key}")
            converted = self._value(key, value)
            if converted is not None:
                span.set_attribute(name, converted)

    def _value(self, key: str, value: Any) -> Any:
        """A trace attribute as a span attribute value; None leaves it out (text without capture_content)."""
        if isinstance(value, bool) or isinstance(value, (int, float)):
            return value
        if isinstance(value, str):
            return value[:MAX_ATTRIBUTE_CHARS] if self.capture_content or key in _NOT_CONTENT else None
        if value is None:
            return None
        if not self.capture_content and _has_text(value):
            return None
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                             for v in value):
            return [float(v) for v in value]
        return _text(value)


def _has_text(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, Mapping):
        return any(_has_text(v) for k, v in value.items() if k not in _NOT_CONTENT)
    if isinstance(value, (list, tuple)):
        return any(_has_text(v) for v in value)
    return False


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)[:MAX_ATTRIBUTE_CHARS]
