"""The router as its callers (gateway, CLI, evaluation) see it: an asyncio gRPC
client that speaks the public types (types.py). gRPC errors reach the caller
unchanged (grpc.RpcError), for it to map to its own (HTTP statuses, exit codes)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import router_pb2_grpc
from services.common import owner as owners
from services.common.tls import ClientTLS, aio_channel
from services.router.api import protomap
from services.router.api.types import (
    AnswerDelta,
    Done,
    Event,
    ReasonRequest,
    SessionInfo,
    Started,
    Step,
    StepDelta,
    StepStart,
)


class ReasonCall:
    """One ReasonStream call: iterate it for the events; `cancel()` stops the session's
    work on the router (and its workers), e.g. when the caller's own client went away."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self.call = call

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for batch in self.call:  # the events that piled up at the router since its last message
            for raw in batch.events:
                ev = protomap.event_from_pb(raw)
                if ev is not None:  # an event kind newer than this client: skipped
                    yield ev

    def cancel(self) -> None:
        self.call.cancel()

    def done(self) -> bool:
        return self.call.done()


@dataclass
class Reply:
    """A whole Reason call read from its stream: the finished steps, the answer, and
    when text arrived (the caller's view of time to first token and inter-token latency)."""

    started: Started | None = None
    steps: list[Step] = field(default_factory=list)
    done: Done | None = None
    first_text_s: float | None = None  # from the call to the first step or answer text
    token_gaps_s: list[float] = field(default_factory=list)  # per delta: the gap since the last, over its tokens
    restarts: int = 0  # steps written again after a worker fault (StepStart attempt > 1)

    @property
    def answer(self) -> str:
        return self.done.answer if self.done else ""

    @property
    def session_id(self) -> str:
        return self.done.session_id if self.done else (self.started.session_id if self.started else "")


class ReplyReader:
    """Folds events into a Reply as they arrive (also for callers that show them too)."""

    def __init__(self, t0: float | None = None) -> None:
        self.reply = Reply()
        self.t0 = time.perf_counter() if t0 is None else t0
        self._last: float | None = None

    def feed(self, ev: Event) -> None:
        r = self.reply
        if isinstance(ev, (StepDelta, AnswerDelta)) and ev.text:
            now = time.perf_counter()
            if self._last is None:
                r.first_text_s = now - self.t0
            else:
                r.token_gaps_s.append((now - self._last) / max(1, ev.tokens))
            self._last = now
        elif isinstance(ev, Step):
            r.steps.append(ev)
        elif isinstance(ev, StepStart) and ev.attempt > 1:
            r.restarts += 1
        elif isinstance(ev, Started):
            r.started = ev
        elif isinstance(ev, Done):
            r.done = ev


class RouterClient:
    def __init__(self, target: str, max_message_bytes: int = 16 * 1024 * 1024, tls: ClientTLS | None = None) -> None:
        self.target = target
        self.channel = aio_channel(
            target,
            tls or ClientTLS(),
            [
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # A router restart should not leave the caller backing off for long.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def reason_stream(self, req: ReasonRequest, *, timeout: float | None = None, owner: str = "") -> ReasonCall:
        """`owner`: the caller's owner id (services/common/owner.py), stored with a new
        session and checked on every later call."""
        return ReasonCall(self.stub.ReasonStream(protomap.request_to_pb(req), timeout=timeout, metadata=_owner_md(owner)))

    async def reason(self, req: ReasonRequest, *, timeout: float | None = None, owner: str = "") -> Reply:
        """The whole call, streamed and folded into a Reply."""
        reader = ReplyReader()
        call = self.reason_stream(req, timeout=timeout, owner=owner)
        try:
            async for ev in call:
                reader.feed(ev)
        finally:
            call.cancel()  # a no-op when it finished; stops the session when we were interrupted
        return reader.reply

    async def get_session(self, session_id: str, *, include_prefix: bool = False, timeout: float = 10.0,
                          owner: str = "") -> SessionInfo:
        req = pb.GetSessionRequest(session_id=session_id, include_prefix=include_prefix)
        return protomap.session_from_pb(await self.stub.GetSession(req, timeout=timeout, metadata=_owner_md(owner)))

    async def cancel_session(self, session_id: str, *, timeout: float = 10.0, owner: str = "") -> tuple[bool, str]:
        req = pb.CancelSessionRequest(session_id=session_id)
        r = await self.stub.CancelSession(req, timeout=timeout, metadata=_owner_md(owner))
        return r.cancelled, r.status

    async def ready(self, timeout: float = 2.0) -> tuple[bool, str]:
        """Whether the router answers and says it serves; the reason when not."""
        try:
            r = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                return True, "router answers (no health service)"
            return False, f"{exc.code().name}: {exc.details()}"
        if r.status == health_pb2.HealthCheckResponse.SERVING:
            return True, "router serving"
        return False, f"router health {health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}"

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "RouterClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _owner_md(owner: str) -> tuple[tuple[str, str], ...] | None:
    return ((owners.METADATA_KEY, owner),) if owner else None
