"""The router process: a thin gRPC servicer over RouterCore, with health and reflection.

Readiness ("" and the Router service name on grpc.health.v1) is SERVING only
while Redis answers and each pool has a worker that would take a call now (up, and
its channel connected); it follows the pools as their endpoints go up and down,
not a poll behind them. "liveness" is SERVING as soon as the process answers.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
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
from services.router import metrics, spans
from services.router.api import protomap
from services.router.api.types import AnswerDelta, Done, Event, Started, Step, StepDelta
from services.router.config import RouterSettings
from services.router.core import RouterCore
from services.router.errors import InvalidArgument, RouterError
from services.router.store import SessionStore, redact_url
from services.router.workers import DEADLINE, WorkerPool

log = logging.getLogger("glimprouter.router")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Router"].full_name
LIVENESS = "liveness"


@contextlib.asynccontextmanager
async def _call(context: grpc.aio.ServicerContext, method: str):
    """One call to the router, in its server span: router errors become their status
    codes with their message; anything else is INTERNAL. Counts the call by its code,
    before a failed call's status is sent: a client that reads the metrics once it has
    its answer finds the call counted."""
    code = "OK"
    counted = False

    async def fail(status: grpc.StatusCode, details: str) -> None:
        nonlocal code, counted
        code, counted = status.name, True
        metrics.request(method, code)
        await context.abort(status, details)

    with spans.server_call(SERVICE_NAME, method, context.invocation_metadata()) as span:
        try:
            try:
                yield
            except RouterError as exc:
                await fail(grpc.StatusCode[exc.code], str(exc))
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                if not counted:
                    c = context.code()
                    code = c.name if isinstance(c, grpc.StatusCode) else "UNKNOWN"
                raise
            except RedisError as exc:
                log.warning("redis error: %s", exc)
                await fail(grpc.StatusCode.UNAVAILABLE, f"session store unavailable: {exc}")
            except Exception:
                log.exception("router call failed")
                await fail(grpc.StatusCode.INTERNAL, "internal error in the router (see its log)")
        finally:
            if not counted:
                metrics.request(method, code)
            spans.call_ended(span, code)


def _owner(context: grpc.aio.ServicerContext) -> str:
    owner = owners.from_metadata(context.invocation_metadata())
    if owner is None:
        raise InvalidArgument(f"{owners.METADATA_KEY} metadata must be 64 lowercase hex characters")
    return owner


def _request(request: pb.ReasonRequest, context: grpc.aio.ServicerContext, default_timeout_s: float):
    left = context.time_remaining()
    DEADLINE.set(time.monotonic() + (left if left is not None else default_timeout_s))
    try:
        return protomap.request_from_pb(request)
    except ValueError as exc:  # an enum value this router does not know
        raise InvalidArgument(str(exc)) from None


class _Outbox:
    """The events of one ReasonStream, sent as they pile up.

    The call's work runs as its own task and hands events here; the handler writes
    what piled up as one message, consecutive deltas of a step merged. A message
    costs the router far more CPU than an event in it, so:
    - the call's first text and Done go out at once, Started with the first text or
      an interval after it came, whichever is first;
    - other text goes once an interval has passed since the previous message:
      --stream-interval-ms, or longer when many streams are open, so that all of
      them together send at most --stream-messages-per-s;
    - a step's start and its stored step carry no text: they go with the next
      message, or on their own after ten intervals.
    So the messages of a call follow its duration over the interval, not its
    tokens, and the step loop waits for the client only when it falls far behind."""

    LIMIT = 1024  # events queued before the loop waits for the client
    open = 0  # streams being served by this process

    def __init__(self, interval_s: float, budget_per_s: float) -> None:
        self.base_s = interval_s
        self.budget = budget_per_s
        self.events: list[pb.ReasonEvent] = []
        self.ready = asyncio.Event()
        self.space = asyncio.Event()
        self.texted = False  # the call's first text was queued
        self.last = -math.inf  # loop time of the last write
        self.due = math.inf  # loop time by which what is queued must go out
        self.timer: asyncio.TimerHandle | None = None
        self._delta: tuple[int, pb.StepDelta] | None = None  # the last queued event, when a delta

    async def put(self, ev: Event) -> None:
        if isinstance(ev, StepDelta) and self._delta is not None and self._delta[0] == ev.index:
            d = self._delta[1]
            d.text += ev.text
            d.tokens += ev.tokens
            d.token_ids.extend(ev.token_ids)
            return
        msg = protomap.event_to_pb(ev)
        self.events.append(msg)
        self._delta = (ev.index, msg.step_delta) if isinstance(ev, StepDelta) else None
        if isinstance(ev, (StepDelta, AnswerDelta)) and ev.text:
            due = self.last + self.interval_s if self.texted else -math.inf
            self.texted = True
        elif isinstance(ev, Done):
            due = -math.inf
        elif isinstance(ev, Started):  # with the first text when it comes within an interval: a message fewer a call
            due = asyncio.get_running_loop().time() + self.interval_s
        else:  # no text: rides with the next message, or goes ten intervals after it came
            due = asyncio.get_running_loop().time() + 10 * self.interval_s
        if due < self.due:
            self.due = due
            self.ready.set()
        if len(self.events) >= self.LIMIT:
            self.space.clear()
            await self.space.wait()

    @property
    def interval_s(self) -> float:
        return max(self.base_s, _Outbox.open / self.budget if self.budget > 0 else 0.0)

    async def send(self, context: grpc.aio.ServicerContext, producer: asyncio.Task) -> None:
        """Writes until `producer` has ended and everything it put is sent."""
        _Outbox.open += 1
        try:
            await self._send(context, producer)
        finally:
            _Outbox.open -= 1

    async def _send(self, context: grpc.aio.ServicerContext, producer: asyncio.Task) -> None:
        loop = asyncio.get_running_loop()
        producer.add_done_callback(lambda _: self.ready.set())
        while True:
            if not self.events:
                if producer.done():
                    return
            else:
                wait = self.due - loop.time()
                if wait <= 0 or producer.done():
                    if self.timer is not None:
                        self.timer.cancel()
                        self.timer = None
                    batch, self.events, self._delta, self.due = self.events, [], None, math.inf
                    self.space.set()
                    await context.write(pb.ReasonEvents(events=batch))
                    metrics.message("reason", "sent")
                    self.last = loop.time()
                    continue
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = loop.call_later(wait, self.ready.set)
            await self.ready.wait()
            self.ready.clear()


class RouterServicer(pb_grpc.RouterServicer):
    """Protobuf in, events out: the core does the work (core.py)."""

    def __init__(self, core: RouterCore | None, settings: RouterSettings) -> None:
        self._core = core  # None while the server starts: calls get UNAVAILABLE
        self.settings = settings

    @property
    def core(self) -> RouterCore:
        if self._core is None:
            raise RouterError("the router is starting: its worker pools are not connected yet", "UNAVAILABLE")
        return self._core

    async def ReasonStream(self, request, context):
        async with _call(context, "ReasonStream"):
            req = _request(request, context, self.settings.request_timeout_s)
            owner = _owner(context)
            outbox = _Outbox(self.settings.stream_interval_ms / 1000, self.settings.stream_messages_per_s)
            # The work in a task of its own (it inherits this call's deadline and span), so
            # events pile up in the outbox while a message is being written.
            work = asyncio.get_running_loop().create_task(self.core.reason(req, outbox.put, owner))
            try:
                await outbox.send(context, work)
            finally:
                if not work.done():  # the client went away (or the write failed): stop the work
                    work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            work.result()  # its error, after every event before it was sent

    async def Reason(self, request, context):
        out = pb.ReasonResponse()
        async with _call(context, "Reason"):
            req = _request(request, context, self.settings.request_timeout_s)

            async def collect(ev: Event) -> None:
                if isinstance(ev, Step):
                    out.steps.append(protomap.step_to_pb(ev))
                elif isinstance(ev, Started):
                    out.session_id, out.turn = ev.session_id, ev.turn
                    out.prefix_mode = pb.PrefixMode.Value(f"PREFIX_MODE_{ev.prefix_mode.name}")
                elif isinstance(ev, Done):
                    out.answer = ev.answer
                    out.stats.CopyFrom(protomap.stats_to_pb(ev.stats))

            await self.core.reason(req, collect, _owner(context))
        return out

    async def GetSession(self, request, context):
        async with _call(context, "GetSession"):
            info = await self.core.get_session(request.session_id, request.include_prefix, owner=_owner(context))
            return protomap.session_to_pb(info)

    async def CancelSession(self, request, context):
        async with _call(context, "CancelSession"):
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
            coalesce_ms=settings.stream_interval_ms,
        )
        self.pools = {
            "small": WorkerPool("small", list(settings.small), **common),
            "large": WorkerPool("large", list(settings.large), **common),
        }
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
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
        with spans.untraced():  # startup probes, and the pools' health loops started here, make no spans
            await asyncio.gather(*(p.start(self.settings.connect_timeout_s) for p in self.pools.values()))
            try:
                await self.store.r.ping()
            except RedisError as exc:  # one clear line, not a traceback (and never the URL's password)
                raise RouterError(f"Redis at {redact_url(self.settings.redis_url)} did not answer: {exc}", "UNAVAILABLE") from None
        self.core = RouterCore(self.settings, self.store, self.pools["small"], self.pools["large"])

    async def _update_readiness(self) -> None:
        """Pings Redis, then publishes readiness."""
        try:
            with spans.untraced():  # a ping every few seconds is not worth a trace
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
        if self.core is not None:
            self.core.leases.close()
        for pool in self.pools.values():
            await pool.close()
        await self.store.close()


async def serve(settings: RouterSettings) -> None:
    spans.setup()  # before the server and channels exist: it patches grpc.aio.server and channels
    metrics_port = telemetry.start_metrics_server(settings.metrics_port, settings.host)
    server = RouterServer(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    port = await server.start()
    assert server.core is not None
    # What exists now (modules, stubs, pools) lives as long as the process: keep it out
    # of the collector's scans, and collect the young generation less often (a step
    # allocates hundreds of short-lived objects, none of them in cycles it relies on).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    # Parents (the CLI, tests) read this line to learn the port when --port 0.
    print(f"glimprouter-router ready mode={server.core.mode.value} port={port} metrics_port={metrics_port}", flush=True)
    await stopping.wait()
    log.info("shutting down: draining for up to %.0fs", settings.shutdown_grace_s)
    await server.stop()
    telemetry.shutdown()  # the last sessions' spans
