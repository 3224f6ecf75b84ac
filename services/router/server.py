"""The router process: a thin gRPC servicer over RouterCore, with health and reflection.

Readiness ("" and the Router service name on grpc.health.v1) is SERVING only
while Redis answers and each pool has a worker that would take a call now (up, and
its channel connected); it follows the pools as their endpoints go up and down,
not a poll behind them. "liveness" is SERVING as soon as the process answers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import grpc
from redis.exceptions import RedisError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import router_pb2_grpc as pb_grpc
from services.common import grpc_input, telemetry, tls
from services.common import owner as owners
from services.router import convert, observe
from services.router.config import RouterSettings
from services.router.core import RouterCore
from services.router.store import SessionStore, redact_url
from services.router.types import AnswerDelta, Finished, RouterError, Started, StepDone
from services.router.workers import DEADLINE, WorkerPool

log = logging.getLogger("glimprouter.router")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Router"].full_name
LIVENESS = "liveness"


@contextlib.asynccontextmanager
async def _errors(context: grpc.aio.ServicerContext):
    """Router errors become their status codes with their message; anything else is INTERNAL."""
    try:
        yield
    except RouterError as exc:
        await context.abort(grpc.StatusCode[exc.code], str(exc))
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:
        if "redis" in type(exc).__module__:
            log.warning("redis error: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}")
        log.exception("router call failed")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error in the router (see its log)")


def _owner(context: grpc.aio.ServicerContext) -> str:
    owner = owners.from_metadata(context.invocation_metadata())
    if owner is None:
        raise RouterError(f"{owners.METADATA_KEY} metadata must be 64 lowercase hex characters", "INVALID_ARGUMENT")
    return owner


def _set_deadline(context: grpc.aio.ServicerContext, default_s: float) -> None:
    left = context.time_remaining()
    DEADLINE.set(time.monotonic() + (left if left is not None else default_s))


class RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, core: RouterCore | None, settings: RouterSettings) -> None:
        self._core = core  # None while the server starts: calls get UNAVAILABLE
        self.settings = settings

    @property
    def core(self) -> RouterCore:
        if self._core is None:
            raise RouterError("the router is starting: its worker pools are not connected yet", "UNAVAILABLE")
        return self._core

    async def _events(self, request: pb.ReasonRequest, context):
        _set_deadline(context, self.settings.request_timeout_s)
        req = convert.reason_request(request)
        req.owner = _owner(context)
        async for ev in self.core.reason(req):
            yield ev

    async def ReasonStream(self, request, context):
        async with _errors(context):
            async for ev in self._events(request, context):
                if isinstance(ev, Started):
                    yield pb.ReasonEvent(started=pb.SessionStarted(
                        session_id=ev.session_id, turn=ev.turn, prefix_mode=convert.PREFIX_MODE[ev.prefix_mode],
                        resumed_steps=ev.resumed_steps, small_model=ev.small_model, large_model=ev.large_model,
                    ))
                elif isinstance(ev, StepDone):
                    yield pb.ReasonEvent(step=convert.step_event(ev.record, ev.token_ids))
                elif isinstance(ev, AnswerDelta):
                    yield pb.ReasonEvent(answer=pb.AnswerDelta(text=ev.text, role=convert.ROLE[ev.role]))
                elif isinstance(ev, Finished):
                    yield pb.ReasonEvent(done=pb.Done(session_id=ev.session_id, answer=ev.answer, stats=convert.stats(ev.stats)))

    async def Reason(self, request, context):
        out = pb.ReasonResponse()
        async with _errors(context):
            async for ev in self._events(request, context):
                if isinstance(ev, Started):
                    out.session_id, out.turn, out.prefix_mode = ev.session_id, ev.turn, convert.PREFIX_MODE[ev.prefix_mode]
                elif isinstance(ev, StepDone):
                    out.steps.append(convert.step_event(ev.record, ev.token_ids))
                elif isinstance(ev, Finished):
                    out.answer = ev.answer
                    out.stats.CopyFrom(convert.stats(ev.stats))
        return out

    async def GetSession(self, request, context):
        async with _errors(context):
            view = await self.core.get_session(request.session_id, owner=_owner(context))
            return convert.session(view, request.include_prefix)

    async def CancelSession(self, request, context):
        async with _errors(context):
            cancelled, status = await self.core.cancel(request.session_id, owner=_owner(context))
            return pb.CancelSessionResponse(cancelled=cancelled, status=status)


class RouterServer:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.store = SessionStore.from_url(
            settings.redis_url, settings.key_prefix, settings.session_ttl_s, settings.lease_ms, settings.max_sessions,
            settings.redis_max_connections, settings.redis_timeout_s,
            settings.redis_tls_ca, settings.redis_tls_cert, settings.redis_tls_key,
        )
        self.worker_tls = tls.ClientTLS(
            settings.worker_tls_ca, settings.worker_tls_cert, settings.worker_tls_key, settings.worker_tls_server_name
        )
        common = dict(
            retries=settings.worker_retries,
            health_interval_s=settings.health_interval_s,
            max_message_bytes=settings.max_message_bytes,
            default_timeout_s=settings.request_timeout_s,
            tls=self.worker_tls,
        )
        self.pools = {
            "small": WorkerPool("small", list(settings.small), **common),
            "large": WorkerPool("large", list(settings.large), **common),
        }
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[observe.RequestMetrics()],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.core: RouterCore | None = None
        self.port = 0
        self._ready_task: asyncio.Task | None = None
        self._redis_ok = False  # the last readiness ping
        self._publish_lock = asyncio.Lock()
        self._publish_pending = False
        self._publisher: asyncio.Task | None = None

    async def start(self) -> int:
        s = self.settings
        self.port = tls.add_port(self.server, f"{s.host}:{s.port}", tls.ServerTLS(s.tls_cert, s.tls_key, s.tls_client_ca), "router")
        log.log(logging.INFO if self.worker_tls.enabled else logging.WARNING, "%s", tls.describe_client(self.worker_tls, "workers"))
        if self.port == 0:
            raise RuntimeError(f"could not listen on {self.settings.host}:{self.settings.port}")
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        # Serve before the pools are connected, so liveness answers while workers
        # load their models (minutes on GPUs); Router calls get UNAVAILABLE until then
        # and readiness stays NOT_SERVING.
        servicer = RouterServicer(None, self.settings)
        grpc_input.add_servicer(pb_grpc.add_RouterServicer_to_server, servicer, self.server)
        await self.server.start()
        try:
            await self._connect()
        except BaseException:
            await self.server.stop(0)
            raise
        servicer._core = self.core
        await self._update_readiness()
        for pool in self.pools.values():
            pool.on_change(self._pools_changed)
        self._ready_task = asyncio.create_task(self._readiness_loop())
        return self.port

    async def _connect(self) -> None:
        with observe.untraced():  # startup probes, and the pools' health loops started here, make no spans
            await asyncio.gather(*(p.start(self.settings.connect_timeout_s) for p in self.pools.values()))
            try:
                await self.store.r.ping()
            except RedisError as exc:  # one clear line, not a traceback (and never the URL's password)
                raise RouterError(f"Redis at {redact_url(self.settings.redis_url)} did not answer: {exc}", "UNAVAILABLE") from None
        self.core = RouterCore(self.settings, self.store, self.pools["small"], self.pools["large"])

    async def _update_readiness(self) -> None:
        """Pings Redis, then publishes readiness."""
        try:
            with observe.untraced():  # a ping every few seconds is not worth a trace
                self._redis_ok = bool(await self.store.r.ping())
        except Exception:
            self._redis_ok = False
        await self._publish()

    async def _publish(self) -> None:
        async with self._publish_lock:  # the last to publish read the latest state
            ok = self._redis_ok and all(pool.serving() for pool in self.pools.values())
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)

    def _pools_changed(self) -> None:
        """An endpoint went up or down, or a channel connected or lost its connection:
        publish readiness now, not at the next tick (a client that was just refused must
        not be told SERVING for another health interval)."""
        if not self._publish_pending:
            self._publish_pending = True
            self._publisher = asyncio.get_running_loop().create_task(self._publish_changes())

    async def _publish_changes(self) -> None:
        self._publish_pending = False
        await self._publish()

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            await self._update_readiness()

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.shutdown_grace_s if grace is None else grace
        end = time.monotonic() + grace
        if self._ready_task is not None:
            self._ready_task.cancel()
        # NOT_SERVING first (load balancers and gateways stop sending), while health
        # still answers; new Reason calls get UNAVAILABLE; sessions in flight finish
        # their current step and release their leases; then the server stops.
        await self.health.enter_graceful_shutdown()
        if self.core is not None:
            left = await self.core.drain(grace)
            if left:
                log.warning("%d session(s) still running after %.0fs of draining: cancelling them", left, grace)
        await self.server.stop(max(0.0, end - time.monotonic()))
        for pool in self.pools.values():
            await pool.close()
        await self.store.close()


async def serve(settings: RouterSettings) -> None:
    observe.setup()  # before the server and channels exist: it patches grpc.aio.server and channels
    metrics_port = telemetry.start_metrics_server(settings.metrics_port, settings.host)
    server = RouterServer(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    port = await server.start()
    assert server.core is not None
    # Parents (the CLI, tests) read this line to learn the port when --port 0.
    print(f"glimprouter-router ready mode={server.core.mode} port={port} metrics_port={metrics_port}", flush=True)
    await stopping.wait()
    log.info("shutting down: draining for up to %.0fs", settings.shutdown_grace_s)
    await server.stop()
    telemetry.shutdown()  # the last sessions' spans
