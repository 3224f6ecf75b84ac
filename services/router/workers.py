"""Worker pools over gRPC: session affinity, health, retries within the deadline.

A pool holds every endpoint of one role. A session sticks to one replica per role
while that replica is healthy, because its KV cache is there; the choice is kept
in the session's Redis hash (the `affinity` dict the core persists with each
step), so another router replica that picks the session up goes to the same
replica. A new session's replica is chosen by rendezvous hashing, so replicas
agree even before anything is stored.

An endpoint is up only once a health check answered SERVING over its channel; a
failed connection attempt, an UNAVAILABLE call or a failed check marks it down at
once, and neither a session nor a retry is sent to an endpoint that is down (a
session whose home is down moves to a replica that is up before its first attempt).
A failed call (UNAVAILABLE, RESOURCE_EXHAUSTED) is retried on another healthy
replica: nothing is stored until a step completes, so a step is idempotent until
written. A stream that fails after its first message cannot be retried as it was
(its beginning already reached the caller): it raises WorkerFault, and the step
loop writes the step again from its start. Every call carries the request's
remaining deadline; cancelling the calling task cancels the RPC, and the worker
stops decoding.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import time
from typing import AsyncIterator, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glimprouter.v1 import worker_pb2 as pb
from glimprouter.v1 import worker_pb2_grpc as pb_grpc
from services.common.tls import ClientTLS, aio_channel
from services.router import metrics, spans
from services.router.errors import DeadlineExceeded, InvalidArgument, RouterError, WorkerFault, WorkersUnavailable
from services.router.mux import MuxChannel
from services.router.worker_client import WorkerClient
from services.worker import protomap
from services.worker.types import Chunk, ModelInfo

log = logging.getLogger("glimprouter.router.workers")

# Absolute time.monotonic() by which the current request must finish; set by the
# servicer per request and inherited by every task the request starts.
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("glimprouter_deadline", default=None)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


# ---- endpoints and pools ------------------------------------------------------------------
_READY = grpc.ChannelConnectivity.READY
_IDLE = grpc.ChannelConnectivity.IDLE
# A channel in TRANSIENT_FAILURE could not connect and waits out its reconnect backoff: a
# call sent now fails at once. SHUTDOWN: the channel is closed.
_UNREACHABLE = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


class Endpoint:
    """One worker replica: its channel, the Multiplex stream its calls share, and the
    pool's view of it.

    `healthy` ("up") is what calls, retries and the router's readiness go by. Only a
    health check answered SERVING over this channel sets it, so an endpoint is up
    only once its channel is connected; a failed connection attempt (the channel
    enters TRANSIENT_FAILURE), an UNAVAILABLE call or a failed health check clear it.
    """

    def __init__(self, address: str, max_message_bytes: int, tls: ClientTLS | None = None, coalesce_ms: int = 0) -> None:
        self.address = address
        opts = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC's default reconnect backoff grows to 120 s: a worker that comes back
            # after an outage would sit unused that long. Health checks probe often anyway.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.channel = aio_channel(address, tls or ClientTLS(), opts)
        self.stub = pb_grpc.ModelWorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.mux = MuxChannel(self.stub, address, coalesce_ms)  # every session's calls to this worker, on one stream
        self.healthy = False
        self.info: ModelInfo | None = None
        # Bumped whenever the endpoint is marked down: a health check that was answered
        # before (its SERVING is older news) does not mark it up again.
        self.downs = 0
        self.last_ok = float("-inf")  # time.monotonic() of the last worker call that succeeded
        self.probe: asyncio.Task | None = None  # a health check under way

    def state(self) -> grpc.ChannelConnectivity:
        return self.channel.get_state(try_to_connect=False)


def _rendezvous(session_id: str, address: str) -> bytes:
    return hashlib.blake2b(f"{session_id}\x00{address}".encode(), digest_size=8).digest()


class WorkerPool:
    def __init__(
        self,
        role: str,
        addresses: Sequence[str],
        *,
        retries: int = 2,
        health_interval_s: float = 2.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        default_timeout_s: float = 600.0,
        tls: ClientTLS | None = None,
        coalesce_ms: int = 0,
    ) -> None:
        if not addresses:
            raise ValueError(f"the {role} pool has no endpoints")
        self.role = role
        self.endpoints = [Endpoint(a, max_message_bytes, tls, coalesce_ms) for a in addresses]
        self.retries = retries
        self.health_interval_s = health_interval_s
        self.default_timeout_s = default_timeout_s
        self.info: ModelInfo | None = None
        self._tasks: list[asyncio.Task] = []  # the health loop and one watcher per channel
        self._listeners: list[Callable[[], None]] = []

    async def start(self, connect_timeout_s: float, straggler_s: float = 2.0) -> None:
        """Learn the model from the endpoints that answer: wait for the first (up to the
        timeout), give the rest `straggler_s` more, and leave later ones to the health loop."""

        async def probe(ep: Endpoint) -> bool:
            try:
                m = await ep.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=connect_timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                log.warning("%s worker %s did not answer: %s", self.role, ep.address, exc.details())
                return False
            ep.info = protomap.model_info_from_pb(m)
            return True

        pending = {asyncio.create_task(probe(ep)) for ep in self.endpoints}
        while pending and not any(ep.info for ep in self.endpoints):
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=straggler_s)
            for task in pending:
                task.cancel()
        up = [ep for ep in self.endpoints if ep.info is not None]
        if not up:
            raise WorkersUnavailable(f"no {self.role} worker answered within {connect_timeout_s:.0f}s")
        self.info = up[0].info
        # Up only once health says SERVING (a draining worker still answers GetModelInfo).
        await asyncio.gather(*(self._probe(ep, timeout_s=5.0) for ep in up))
        self._tasks = [asyncio.create_task(self._health_loop())]
        self._tasks += [asyncio.create_task(self._watch(ep)) for ep in self.endpoints]

    def _compatible(self, ep: Endpoint) -> bool:
        assert self.info is not None and ep.info is not None
        if ep.info.tokenizer_fingerprint != self.info.tokenizer_fingerprint:
            log.error("%s worker %s serves a different tokenizer than the pool; not using it", self.role, ep.address)
            return False
        return True

    # ---- the pool's view of each endpoint -------------------------------------------------
    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (no arguments, from the event loop) whenever `serving()` may
        have changed: an endpoint went up or down, or a channel connected or lost its
        connection. The router's readiness follows the pools this way, not a poll behind."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def serving(self) -> bool:
        """Whether a call sent now would be taken: some endpoint is up and its channel is
        connected (READY), or a call on it has just succeeded."""
        now = time.monotonic()
        return any(
            ep.healthy and (ep.state() is _READY or now - ep.last_ok < self.health_interval_s) for ep in self.endpoints
        )

    def _up(self, ep: Endpoint) -> bool:
        """Whether a call may go to `ep`: up, and its channel not known to be unable to connect."""
        if ep.healthy and ep.state() in _UNREACHABLE:
            self._down(ep, "its channel cannot connect")
        return ep.healthy

    def _down(self, ep: Endpoint, why: str) -> None:
        ep.downs += 1
        if ep.healthy:
            ep.healthy = False
            log.info("%s worker %s is now unhealthy: %s", self.role, ep.address, why)
            self._changed()

    def _mark_up(self, ep: Endpoint) -> None:
        if not ep.healthy:
            ep.healthy = True
            log.info("%s worker %s is now healthy", self.role, ep.address)
            self._changed()

    async def _watch(self, ep: Endpoint) -> None:
        """Follows one channel's connectivity, so the pool's view of the endpoint agrees
        with its channel. A channel that lost its connection (IDLE) is told to reconnect at
        once: a worker that died is then known to be down (the attempt fails: TRANSIENT_FAILURE
        marks it down) before any call is sent to it, and gRPC keeps trying, with its backoff
        (at most 2 s), until it is back. A channel that connects while its endpoint is down
        gets a health check at once, so the endpoint is up as soon as it can take a call,
        not a health interval later."""
        state = ep.state()
        while state is not grpc.ChannelConnectivity.SHUTDOWN:
            if state in _UNREACHABLE:
                self._down(ep, "its channel cannot connect")
            elif state is _READY and not ep.healthy:
                self._probe(ep)
            elif state is _IDLE:
                state = ep.channel.get_state(try_to_connect=True)
            self._changed()
            try:
                await ep.channel.wait_for_state_change(state)
            except RuntimeError:  # the watch failed (gRPC says it should not): the health loop carries on
                log.warning("%s worker %s: lost track of its channel", self.role, ep.address, exc_info=True)
                return
            state = ep.state()

    def _probe(self, ep: Endpoint, timeout_s: float | None = None) -> asyncio.Task:
        """One health check of `ep` (the one under way, if any)."""
        if ep.probe is None or ep.probe.done():
            ep.probe = asyncio.create_task(self._check(ep, timeout_s))
        return ep.probe

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await asyncio.gather(*(self._probe(ep) for ep in self.endpoints), return_exceptions=True)

    async def _check(self, ep: Endpoint, timeout_s: float | None = None) -> None:
        downs = ep.downs
        # A worker that is slow to answer is not down: up to a health interval (1 s at least).
        timeout_s = timeout_s or max(1.0, self.health_interval_s)
        try:
            r = await ep.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            serving = r.status == health_pb2.HealthCheckResponse.SERVING
            if serving and ep.info is None:
                ep.info = protomap.model_info_from_pb(await ep.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5))
            if not serving:
                why = f"it answers {health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)}"
            elif not self._compatible(ep):
                why = "it serves another tokenizer"
            else:
                why = ""
        except grpc.aio.AioRpcError as exc:
            why = f"health check failed: {exc.code().name}"
        except Exception as exc:  # noqa: BLE001 - a check that cannot tell says down, and says why
            log.warning("%s worker %s: health check failed", self.role, ep.address, exc_info=True)
            why = f"health check failed: {exc!r}"
        if why:
            self._down(ep, why)
        elif ep.downs == downs:
            self._mark_up(ep)
        # else: marked down while this check was under way (a call failed, the channel lost
        # its connection); the SERVING answered before that is stale, the next check decides.

    async def close(self) -> None:
        for task in self._tasks + [ep.probe for ep in self.endpoints if ep.probe is not None]:
            task.cancel()
        await asyncio.gather(*(ep.mux.close() for ep in self.endpoints), return_exceptions=True)
        await asyncio.gather(*(ep.channel.close() for ep in self.endpoints), return_exceptions=True)

    # ---- choosing a replica ----------------------------------------------------------------
    def pick(self, session_id: str, affinity: dict[str, str], exclude: set[str]) -> Endpoint:
        """The replica for the next attempt: the session's home while it is up, else (a new
        session, or its home is down) the rendezvous choice among the endpoints up, which
        becomes the home in `affinity` (the core writes it to Redis with the next step).
        Endpoints that are down or already failed in this call are never chosen."""
        current = affinity.get(self.role)
        candidates = [ep for ep in self.endpoints if ep.address not in exclude and self._up(ep)]
        for ep in candidates:
            if ep.address == current:
                return ep
        if not candidates:
            down = sorted(ep.address for ep in self.endpoints if ep.address not in exclude)
            why = "; ".join(
                part for part in (f"tried {', '.join(sorted(exclude))}" if exclude else "",
                                  f"down: {', '.join(down)}" if down else "") if part
            )
            raise WorkersUnavailable(f"no healthy {self.role} worker ({why})")
        chosen = max(candidates, key=lambda ep: _rendezvous(session_id, ep.address))
        if current is not None and current != chosen.address:
            log.debug("session %s: %s worker %s is unavailable; moving to %s", session_id, self.role, current, chosen.address)
        affinity[self.role] = chosen.address
        return chosen

    async def extend(self, session_id: str, affinity: dict[str, str], request, prompt: Sequence[int]):
        """A catch-up call: to the session's home only, once. Never retried elsewhere and
        never a reason to re-home the session (another replica holds none of its state);
        a session without a home yet gets the one its first real call would get."""
        current = affinity.get(self.role)
        if current is None:
            ep = self.pick(session_id, affinity, set())
        else:
            ep = next((e for e in self.endpoints if e.address == current), None)
            if ep is None or not self._up(ep):
                raise WorkersUnavailable(f"the session's {self.role} worker {current} is down; no catch-up")
        t0 = time.perf_counter()
        try:
            out = await ep.mux.call("Extend", request, self._timeout(), prompt)
        except grpc.aio.AioRpcError as exc:
            self._ended(ep, "Extend", exc.code().name, t0)
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                self._down(ep, f"Extend failed: {exc.details()}")
            raise WorkerFault(f"Extend on {self.role} worker {ep.address} failed: {exc.code().name}") from None
        except asyncio.CancelledError:
            self._ended(ep, "Extend", "CANCELLED", t0)
            raise
        ep.last_ok = time.monotonic()
        self._ended(ep, "Extend", "OK", t0, _usage(out))
        return out

    def _timeout(self) -> float:
        deadline = DEADLINE.get()
        if deadline is None:
            return self.default_timeout_s
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed before the step finished")
        return left

    async def _connected(self, ep: Endpoint) -> None:
        """Waits, within the call's deadline, until `ep`'s channel is connected, so a call to
        an endpoint that is up does not fail on a channel still (re)connecting. Stops waiting
        when `ep` goes down (its channel could not connect): the call then fails at once with
        the channel's error and is retried elsewhere."""
        state = ep.channel.get_state(try_to_connect=True)
        if state is _READY:
            return
        end = time.monotonic() + self._timeout()
        while state is not _READY and state not in _UNREACHABLE and ep.healthy:
            left = end - time.monotonic()
            if left <= 0:
                return  # the call below raises DeadlineExceeded
            try:
                await asyncio.wait_for(ep.channel.wait_for_state_change(state), left)
            except asyncio.TimeoutError:
                return
            state = ep.channel.get_state(try_to_connect=True)

    async def call(self, session_id: str, affinity: dict[str, str], method: str, request,
                   prompt: Sequence[int] | None = None):
        tried: set[str] = set()
        for attempt in range(self.retries + 1):
            ep = self.pick(session_id, affinity, tried)
            t0 = time.perf_counter()
            try:
                await self._connected(ep)
                out = await ep.mux.call(method, request, self._timeout(), prompt)
            except grpc.aio.AioRpcError as exc:
                self._ended(ep, method, exc.code().name, t0)
                self._raise_unless_retryable(ep, exc, method)
                tried.add(ep.address)
                self._retrying(attempt, method)
                log.warning("%s worker %s failed %s (%s: %s)", self.role, ep.address, method, exc.code().name, exc.details())
            else:
                ep.last_ok = time.monotonic()
                self._ended(ep, method, "OK", t0, _usage(out))
                return out
        raise WorkersUnavailable(f"{method} failed on every {self.role} worker tried ({', '.join(sorted(tried))})")

    async def stream(self, session_id: str, affinity: dict[str, str], method: str, request,
                     prompt: Sequence[int] | None = None) -> AsyncIterator:
        """A streaming call; retried elsewhere only while nothing of it has been read.
        `prompt`: the request's prompt, left to each attempt's stream to encode."""
        tried: set[str] = set()
        for attempt in range(self.retries + 1):
            ep = self.pick(session_id, affinity, tried)
            started = False
            t0 = time.perf_counter()
            last = None
            try:
                await self._connected(ep)
                # A caller that stops reading (cancelled, gone) closes the call: the worker stops.
                async with contextlib.aclosing(ep.mux.results(method, request, self._timeout(), prompt)) as results:
                    async for r in results:
                        msg = r.step if r.HasField("step") else r.chunk
                        started = True
                        last = msg
                        yield msg
            except GeneratorExit:  # the caller stopped reading: it had what it needed
                self._ended(ep, method, "OK", t0, _usage(last))
                raise
            except asyncio.CancelledError:
                self._ended(ep, method, "CANCELLED", t0)
                raise
            except grpc.aio.AioRpcError as exc:
                self._ended(ep, method, exc.code().name, t0)
                if started and exc.code() in _RETRYABLE:
                    # Its beginning reached the caller: not retried as it was, but the step
                    # can be written again from its start, away from this replica.
                    self._down(ep, f"{method} failed mid-stream: {exc.details()}")
                    raise WorkerFault(f"{self.role} worker {ep.address} failed mid-stream: {exc.details()}") from None
                self._raise_unless_retryable(ep, exc, method)
                tried.add(ep.address)
                self._retrying(attempt, method)
                log.warning("%s worker %s failed %s (%s: %s)", self.role, ep.address, method, exc.code().name, exc.details())
            else:
                ep.last_ok = time.monotonic()
                self._ended(ep, method, "OK", t0, _usage(last))
                return
        raise WorkersUnavailable(f"{method} failed on every {self.role} worker tried ({', '.join(sorted(tried))})")

    def _ended(self, ep: Endpoint, method: str, code: str, t0: float, usage=None) -> None:
        metrics.worker_call(self.role, ep.address, method, code, time.perf_counter() - t0, usage)
        spans.note_call(self.role, ep.address, code == "OK")

    def _retrying(self, attempt: int, method: str) -> None:
        if attempt < self.retries:
            metrics.worker_retry(self.role, method)
            spans.note_retry()

    def _raise_unless_retryable(self, ep: Endpoint, exc: grpc.aio.AioRpcError, method: str) -> None:
        code = exc.code()
        if code in _RETRYABLE:
            if code is grpc.StatusCode.UNAVAILABLE:
                self._down(ep, f"{method} failed: {exc.details()}")
            return
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(f"the request's deadline passed during {method} on the {self.role} worker") from None
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            raise InvalidArgument(f"the {self.role} worker refused {method}: {exc.details()}") from None
        if code is grpc.StatusCode.CANCELLED:
            raise asyncio.CancelledError()
        raise RouterError(f"{method} on {self.role} worker {ep.address} failed: {code.name}: {exc.details()}") from None

    def forget(self, session_id: str) -> None:
        """The session's turn is over here: its next call's prompt goes whole (to whichever
        router takes it), and the streams hold no reference to its prefix."""
        for ep in self.endpoints:
            ep.mux.forget(session_id)

    def bind(self, session_id: str, affinity: dict[str, str]) -> "BoundWorker":
        return BoundWorker(self, session_id, affinity)


class BoundWorker(WorkerClient):
    """One session's view of a pool: the WorkerClient the step loop calls."""

    def __init__(self, pool: WorkerPool, session_id: str, affinity: dict[str, str]) -> None:
        assert pool.info is not None, "start() the pool first"
        self.pool, self.session_id, self.affinity = pool, session_id, affinity
        self.info = pool.info

    async def _call(self, method: str, request, prompt: Sequence[int] | None = None):
        return await self.pool.call(self.session_id, self.affinity, method, request, prompt)

    async def render_prompt(self, messages, add_generation_prompt=True, continue_final_message=False):
        req = pb.RenderPromptRequest(
            messages=[pb.ChatMessage(role=m.role, content=m.content) for m in messages],
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        r = await self._call("RenderPrompt", req)
        return list(r.token_ids), r.text

    async def tokenize(self, text: str) -> list[int]:
        return list((await self._call("Tokenize", pb.TokenizeRequest(text=text))).token_ids)

    async def glimpse(self, prompt, top_k):
        # The prompt is left out of the request: the stream encodes it (a delta when it can).
        r = await self._call("Glimpse", protomap.glimpse_request_to_pb(None, top_k, self.session_id), prompt)
        return protomap.glimpse_from_pb(r)

    async def step_stream(self, req, gate):
        reader = protomap.ChunkReader()
        request = protomap.step_request_to_pb(req, gate, with_prompt=False)
        async for c in self.pool.stream(self.session_id, self.affinity, "StepStream", request, req.prompt):
            if c.HasField("chunk"):
                yield reader.read(c.chunk)
            else:
                yield protomap.decided_from_pb(c, top=False)  # the loop reads the decision and entropy only

    async def generate(self, req):
        final = None
        async for chunk in self.generate_stream(req):
            final = chunk.final or final
        if final is None:
            raise WorkerFault(f"the {self.pool.role} worker's generation ended without its final chunk")
        return final

    async def generate_stream(self, req) -> AsyncIterator[Chunk]:
        reader = protomap.ChunkReader()
        request = protomap.generate_request_to_pb(req, with_prompt=False)
        async for c in self.pool.stream(self.session_id, self.affinity, "GenerateStream", request, req.prompt):
            yield reader.read(c)

    async def extend(self, prompt):
        r = await self.pool.extend(self.session_id, self.affinity, protomap.extend_request_to_pb(None, self.session_id), prompt)
        return protomap.extension_from_pb(r)


def _usage(response):
    """The usage a worker reported for a call (the worker's own metrics use the same rule)."""
    if response is None:
        return None
    if isinstance(response, pb.StepChunk):
        return response.chunk.usage if response.HasField("chunk") else response.glimpse.usage
    if isinstance(response, (pb.GlimpseResponse, pb.GenerateResponse, pb.GenerateChunk, pb.ExtendResponse)):
        return response.usage
    return None
