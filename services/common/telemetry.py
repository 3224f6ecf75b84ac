"""Tracing and metrics set-up shared by every service.

Traces: exported over OTLP only when the standard OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; the exporter, sampler, service name and
resource attributes all honour the standard OTEL_* variables. Without an endpoint
the OpenTelemetry API stays a no-op and nothing is instrumented: nothing is
exported, nothing fails, and no call pays for wrappers. With one, gRPC servers and
clients are instrumented (W3C trace context travels in gRPC metadata), with health
checks left out of traces.

Prompt and step text go into spans only when GLIMPROUTER_TRACE_CONTENT is true.
"""
from __future__ import annotations

import logging
import os
import threading

from opentelemetry import trace

log = logging.getLogger(__name__)
_lock = threading.Lock()
_configured = False

CONTENT_ENV = "GLIMPROUTER_TRACE_CONTENT"


def exporting() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def trace_content() -> bool:
    return os.environ.get(CONTENT_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def setup(default_service_name: str, *, trace_servers: bool = True) -> bool:
    """Configure tracing once per process; returns whether spans are exported.
    `trace_servers=False`: the process makes its own gRPC server spans (the router
    does: OpenTelemetry's server wrapper cannot wrap a handler that writes its
    stream with context.write)."""
    global _configured
    with _lock:
        if _configured:
            return exporting()
        _configured = True
        if not exporting():
            # Nothing to export: skip the instrumentation too. Its wrappers cost CPU on
            # every gRPC call (the router's per-step cost doubled with them on) and
            # would only carry context nobody records.
            return False
        from opentelemetry.instrumentation.grpc import (
            GrpcAioInstrumentorClient,
            GrpcAioInstrumentorServer,
            GrpcInstrumentorClient,
            filters,
        )

        if exporting():
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES,
            # which win over our default name.
            attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
            provider = TracerProvider(resource=Resource.create(attrs))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(provider)
            log.info("exporting traces over OTLP")
        # Health checks make no spans; nor does a Multiplex stream, which lives as long as
        # its channel: its calls get spans of their own (services/router/mux.py, services/worker/mux.py).
        no_health = filters.negate(filters.any_of(filters.health_check(), filters.method_name("Multiplex")))
        if trace_servers:
            GrpcAioInstrumentorServer(filter_=no_health).instrument()
        GrpcAioInstrumentorClient(filter_=no_health).instrument()
        GrpcInstrumentorClient(filter_=no_health).instrument()
        return exporting()


def shutdown() -> None:
    """Flush spans still buffered (called on graceful shutdown)."""
    provider = trace.get_tracer_provider()
    flush = getattr(provider, "shutdown", None)
    if flush is not None:
        flush()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def start_metrics_server(port: int, host: str = "0.0.0.0") -> int:
    """Serve Prometheus metrics over HTTP on `port` (0: a free one); returns the port."""
    if port < 0:
        return -1
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr=host)
    return server.server_port
