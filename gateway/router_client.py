"""The router as the gateway and the CLI see it: an asyncio gRPC client that speaks
dataclasses (events.py) and raises grpc.RpcError unchanged for the caller to map."""
from __future__ import annotations

from typing import AsyncIterator

import grpc
from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import router_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import protomap
from services.common import owner as owners
from services.common.tls import ClientTLS, aio_channel
from gateway.chat import ChatRequest
from gateway.events import Event, SessionInfo


class RouterClient:
    def __init__(self, target: str, max_message_bytes: int = 16 * 1024 * 1024, tls: ClientTLS | None = None) -> None:
        self.target = target
        self.channel = aio_channel(
            target,
            tls or ClientTLS(),
            [
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # A router restart should not leave the gateway backing off for long.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self.stub = router_pb2_grpc.RouterStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def reason_stream(self, req: ChatRequest, timeout: float | None = None, owner: str = "") -> grpc.aio.UnaryStreamCall:
        """The call itself, so the caller can cancel it (client gone, Ctrl-C). `owner`: the
        caller's owner id (services/common/owner.py), which the router stores and checks."""
        return self.stub.ReasonStream(protomap.reason_request(req), timeout=timeout, metadata=_owner_md(owner))

    @staticmethod
    async def events(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[Event]:
        async for raw in call:
            ev = protomap.event(raw)
            if ev is not None:
                yield ev

    async def get_session(self, session_id: str, timeout: float = 10.0, owner: str = "") -> SessionInfo:
        req = pb.GetSessionRequest(session_id=session_id)
        return protomap.session(await self.stub.GetSession(req, timeout=timeout, metadata=_owner_md(owner)))

    async def cancel_session(self, session_id: str, timeout: float = 10.0, owner: str = "") -> tuple[bool, str]:
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


def _owner_md(owner: str) -> tuple[tuple[str, str], ...] | None:
    return ((owners.METADATA_KEY, owner),) if owner else None
