"""Fixtures of the observability tests: a real OTLP trace receiver in this process,
a private Redis, and sim workers, routers and a gateway as child processes that
export their spans to the receiver over OTLP/gRPC."""
from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from types import SimpleNamespace

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.common import procs, redis_local
from services.common.redis_local import free_port


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict = field(default_factory=dict)
    status_code: int = 0


def _value(v):
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which) if which else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP TraceService: what an OpenTelemetry Collector or Jaeger would receive."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.server: grpc.Server | None = None
        self.port = 0

    def Export(self, request, context):
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self, port: int = 0) -> "Receiver":
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on 127.0.0.1:{port}")
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[Span]:
        with self.lock:
            reqs = list(self.requests)
        out = []
        for req in reqs:
            for rs in req.resource_spans:
                res = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append(Span(
                            res.get("service.name", ""), s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                            s.kind, {kv.key: _value(kv.value) for kv in s.attributes}, s.status.code,
                        ))
        return out

    def wait_for(self, check, timeout: float = 20.0):
        """Poll until check(spans) returns something truthy; return it (or fail with the last spans)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            got = check(spans)
            if got:
                return got
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                pytest.fail(f"spans did not arrive in {timeout:.0f}s; received {len(spans)}: {names[:60]}")
            time.sleep(0.1)


def otel_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the receiver quickly
        "GLIMPROUTER_TRACE_CONTENT": "false",
        **extra,
    }


def start_sim(model_id: str, env: dict[str, str], *extra: str) -> procs.Service:
    return procs.start(
        "worker",
        ["services.worker", "--backend", "sim", "--model", "sim", "--model-id", model_id, "--port", "0",
         "--sim-hard-steps", "1,3", "--sim-steps", "5", "--sim-step-tokens", "6", *extra],
        env=env, timeout=60,
    )


def start_router(small: list[procs.Service], large: procs.Service, redis_url: str, prefix: str, env: dict[str, str],
                 health_interval_s: float = 0.5) -> procs.Service:
    return procs.start(
        "router",
        ["services.router", "--port", "0", "--metrics-port", "0", "--small", ",".join(w.address for w in small),
         "--large", large.address, "--redis-url", redis_url, "--key-prefix", prefix,
         "--health-interval-s", str(health_interval_s)],
        env=env, timeout=60,
    )


def start_gateway(router: procs.Service, env: dict[str, str]) -> procs.Service:
    return procs.start("gateway", ["gateway", "--port", "0", "--router", router.address], env=env, timeout=60)


@pytest.fixture(scope="session")
def spawn():
    # Test modules cannot import conftest (importlib mode): helpers travel as a fixture.
    return SimpleNamespace(sim=start_sim, router=start_router, gateway=start_gateway, env=otel_env,
                           receiver=Receiver, free_port=free_port)


@pytest.fixture(scope="module")
def private_redis():
    try:
        r = redis_local.start_private()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced(receiver, private_redis):
    """Sim workers, a router without content in spans, one with, and a gateway, all exporting to `receiver`."""
    env = otel_env(receiver)
    started: list[procs.Service] = []
    try:
        small = start_sim("sim-small", env)
        started.append(small)
        large = start_sim("sim-large", env)
        started.append(large)
        router = start_router([small], large, private_redis.url, "obs-a:", env)
        started.append(router)
        content = start_router([small], large, private_redis.url, "obs-b:", otel_env(receiver, GLIMPROUTER_TRACE_CONTENT="true"))
        started.append(content)
        gateway = start_gateway(router, env)
        started.append(gateway)
        yield SimpleNamespace(small=small, large=large, router=router, content_router=content, gateway=gateway)
    finally:
        for svc in reversed(started):
            svc.stop()
