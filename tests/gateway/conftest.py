"""Fixtures of the gateway tests.

- `fake_router`: a scripted Router gRPC server in this process; what it does is
  chosen by the last message's content, so every path (errors, mid-stream
  failures, slow calls, cancellation) is reached in milliseconds, without models.
- `real_stack`: a private redis-server, two llama.cpp workers on SmolLM2, the real
  router and a gateway, as child processes (shared by the session).
"""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import router_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import redis_local
from services.common import procs

STEPS = [
    pb.StepEvent(index=0, role=pb.ROLE_SMALL, decision=pb.DECISION_SMALL, entropy=0.31, threshold=0.9,
                 text="Two plus three.\n\n", tokens=4, model_id="small-m", latency_ms=5.0),
    pb.StepEvent(index=1, role=pb.ROLE_LARGE, decision=pb.DECISION_LARGE, entropy=1.42, threshold=0.9,
                 text="Wait, count: 2 + 3 = 5.\n\n", tokens=9, model_id="large-m", latency_ms=9.0),
    pb.StepEvent(index=2, role=pb.ROLE_SMALL, decision=pb.DECISION_SMALL, entropy=0.05, threshold=0.9,
                 text="So 5.</think>", tokens=3, model_id="small-m", latency_ms=4.0),
]
ANSWER = ["\n\nThe answer", " is **5**.", "\n"]
STATS = pb.Stats(latency_ms=20.0, steps=3, intervention_rate=1 / 3, small=pb.RoleStats(steps=2, generated_tokens=7),
                 large=pb.RoleStats(steps=1, generated_tokens=9 + 6), thinking_tokens=16, answer_tokens=6,
                 thinking_end="think_end", answer_end="eos")


def step_events(s: pb.StepEvent):
    """A step as the router streams it: its start (the decision), its text in two deltas, the stored step."""
    yield pb.ReasonEvent(step_start=pb.StepStart(index=s.index, turn=s.turn, role=s.role, model_id=s.model_id,
                                                 decision=s.decision, entropy=s.entropy, threshold=s.threshold, attempt=1))
    half = len(s.text) // 2
    for piece in (s.text[:half], s.text[half:]):
        yield pb.ReasonEvent(step_delta=pb.StepDelta(index=s.index, text=piece, tokens=1))
    yield pb.ReasonEvent(step=s)


class FakeRouter(router_pb2_grpc.RouterServicer):
    def __init__(self) -> None:
        self.requests: list[pb.ReasonRequest] = []
        self.ended = threading.Event()  # a "slow" call ended (cancelled or deadline)

    def ReasonStream(self, request, context):
        # Each event in a message of its own, as a router that is never behind sends them.
        for ev in self._events(request, context):
            yield pb.ReasonEvents(events=[ev])

    def _events(self, request, context):
        self.requests.append(request)
        prompt = request.messages[-1].content if request.messages else ""
        if request.session_id == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "session 'missing' not found")
        if prompt.startswith("abort:"):
            code = getattr(grpc.StatusCode, prompt.split(":", 1)[1])
            context.abort(code, f"scripted {code.name}")
        sid = request.session_id or "sess-1"
        yield pb.ReasonEvent(started=pb.SessionStarted(session_id=sid, turn=1 if request.session_id else 0,
                                                        small_model="small-m", large_model="large-m",
                                                        prefix_mode=pb.PREFIX_MODE_TOKENS, thinking=True))
        if prompt == "slow":
            deadline = time.monotonic() + 30
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.02)
            self.ended.set()
            return
        if prompt == "midfail":
            yield from step_events(STEPS[0])
            context.abort(grpc.StatusCode.INTERNAL, "a worker crashed")
        for s in STEPS:
            yield from step_events(s)
        for d in ANSWER:
            yield pb.ReasonEvent(answer=pb.AnswerDelta(text=d, role=pb.ROLE_LARGE))
        yield pb.ReasonEvent(done=pb.Done(session_id=sid, answer="".join(ANSWER).strip(), stats=STATS))

    def GetSession(self, request, context):
        if request.session_id != "sess-1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"session {request.session_id!r} not found")
        return pb.Session(session_id="sess-1", status="done", small_model="small-m", large_model="large-m",
                          steps=STEPS, answer="The answer is **5**.", stats=STATS, options_json='{"routing": {}}')

    def CancelSession(self, request, context):
        return pb.CancelSessionResponse(cancelled=False, status="done")


def serve_fake() -> tuple[grpc.Server, FakeRouter, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    fake = FakeRouter()
    router_pb2_grpc.add_RouterServicer_to_server(fake, server)
    h = health.HealthServicer()
    h.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, fake, port


def start_gateway(router: str, *extra: str) -> procs.Service:
    return procs.start("gateway", ["gateway", "--port", "0", "--router", router, "--log-level", "warning", *extra],
                       timeout=60)


@pytest.fixture(scope="module")
def fake_router():
    server, fake, port = serve_fake()
    fake.address = f"127.0.0.1:{port}"
    yield fake
    server.stop(0)


@pytest.fixture(scope="session")
def private_redis():
    # Never the shared 127.0.0.1:6379: a redis-server of our own, gone after the session.
    r = redis_local.start_private()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def real_stack(smollm2_path, private_redis):
    """Two SmolLM2 workers, the router and a gateway; yields the gateway's base URL."""
    started: list[procs.Service] = []
    try:
        for name in ("small", "large"):
            started.append(procs.start(name, ["services.worker", "--backend", "llamacpp", "--model", str(smollm2_path),
                                              "--port", "0", "--threads", "1", "--context-length", "2048"], timeout=180))
        started.append(procs.start("router", ["services.router", "--port", "0", "--small", started[0].address,
                                              "--large", started[1].address, "--redis-url", private_redis.url,
                                              "--key-prefix", "glimprouter-gateway-test:"], timeout=120))
        started.append(start_gateway(started[2].address))
        yield {"gateway": f"http://{started[3].address}", "router": started[2].address, "services": started}
    finally:
        for svc in reversed(started):
            svc.stop()


@pytest.fixture(scope="module")
def gateways():
    """Starts gateway processes (`start(router, *flags)` -> base URL); stops them after the module."""
    started: list[procs.Service] = []

    def start(router: str, *extra: str) -> str:
        svc = start_gateway(router, *extra)
        started.append(svc)
        return f"http://{svc.address}"

    start.services = started
    yield start
    for svc in started:
        svc.stop()
