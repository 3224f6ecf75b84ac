"""A server span per HTTP request (ASGI middleware), continuing the caller's trace.

An incoming W3C `traceparent` (and `tracestate`) header makes the request's span
a child of the caller's; otherwise a new trace starts. The router call made while
serving the request carries the span's context in its gRPC metadata (the gRPC
client instrumentation of services/common/telemetry.py), so the router's session
and step spans, and the workers' spans, land in the same trace.

When spans are exported, the response carries the trace in a `traceresponse`
header (W3C Trace Context Level 2), so a client can open the request in Jaeger.
Health, readiness and metrics endpoints are not traced. Request bodies are never
put in spans.
"""
from __future__ import annotations

from typing import Callable

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

_tracer = trace.get_tracer("glimprouter.gateway")
UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
SESSION_HEADER = b"x-glimprouter-session"


class TracingMiddleware:
    def __init__(self, app, route_label: Callable[[str], str]) -> None:
        self.app, self.route_label = app, route_label

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED:
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        parent = propagate.extract(carrier)
        route = self.route_label(scope["path"])
        attrs = {
            "http.request.method": scope["method"],
            "http.route": route,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if scope.get("client"):
            attrs["client.address"] = scope["client"][0]
        if "user-agent" in carrier:
            attrs["user_agent.original"] = carrier["user-agent"][:256]
        with _tracer.start_as_current_span(
            f"{scope['method']} {route}", context=parent, kind=SpanKind.SERVER, attributes=attrs,
            record_exception=True, set_status_on_exception=True,
        ) as span:
            recording = span.is_recording()

            async def traced_send(message) -> None:
                if message["type"] == "http.response.start" and recording:
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                    headers = list(message.get("headers") or [])
                    for k, v in headers:
                        if k.lower() == SESSION_HEADER:
                            span.set_attribute("gen_ai.conversation.id", v.decode("latin-1"))
                            span.set_attribute("glimprouter.session.id", v.decode("latin-1"))
                    sc = span.get_span_context()
                    headers.append((b"traceresponse", f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}".encode()))
                    message = {**message, "headers": headers}
                await send(message)

            await self.app(scope, receive, traced_send)
