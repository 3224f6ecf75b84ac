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
written. Every call carries the request's remaining deadline; cancelling the
calling task cancels the RPC, and the worker stops decoding.
"""
from __future__ import annotations

import asyncio
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
from services.router import observe
from services.router.types import InvalidArgument, RouterError, WorkersUnavailable
from services.router.worker_client import WorkerClient
from services.worker.types import (
    Chunk,
    Decision,
    EntropyMethod,
    FinishReason,
    Generation,
    Glimpse,
    ModelInfo,
    SamplingParams,
    StepResult,
    StopParams,
    Timings,
    TokenLogprob,
    Usage,
)

log = logging.getLogger("glimprouter.router.workers")

# Absolute time.monotonic() by which the current request must finish; set by the
# servicer per request and inherited by every task the request starts.
DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("glimprouter_deadline", default=None)

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class DeadlineExceeded(RouterError):
    code = "DEADLINE_EXCEEDED"


# ---- protobuf -> dataclasses ------------------------------------------------------------
_FINISH = {
    pb.FINISH_REASON_STEP_END: FinishReason.STEP_END,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    pb.FINISH_REASON_CONTEXT: FinishReason.CONTEXT,
}


def _usage(u: pb.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.cached_tokens, u.prefilled_tokens, u.generated_tokens)


def _timings(t: pb.Timings) -> Timings:
    return Timings(t.queue_ms, t.prefill_ms, t.decode_ms, t.total_ms)


def model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        m.model_id, m.backend, m.vocab_size, m.context_length, tuple(m.eos_token_ids), m.bos_token_id,
        m.has_chat_template, m.tokenizer_fingerprint, m.think_start, m.think_end,
    )


def glimpse(g: pb.GlimpseResponse) -> Glimpse:
    top = [TokenLogprob(t.token_id, t.text, t.logprob) for t in g.top]
    return Glimpse(g.token_id, g.token_text, g.entropy_full, g.entropy_top_k, top, _usage(g.usage), _timings(g.timings))


def generation(g: pb.GenerateResponse) -> Generation:
    return Generation(
        list(g.token_ids), g.text, _FINISH.get(g.finish_reason, FinishReason.LENGTH), _usage(g.usage),
        _timings(g.timings), list(g.entropies), g.matched_stop,
    )


def _sampling(s: SamplingParams) -> pb.Sampling:
    out = pb.Sampling(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
    if s.top_k:
        out.top_k = s.top_k
    if s.seed is not None:
        out.seed = s.seed
    return out


def _stop(s: StopParams) -> pb.StopCondition:
    return pb.StopCondition(step_boundary=s.step_boundary, stop=list(s.stop), stop_on_eos=s.stop_on_eos)


def _prompt(ids: Sequence[int]) -> pb.Prompt:
    return pb.Prompt(token_ids=pb.TokenIds(ids=ids))


# ---- endpoints and pools ------------------------------------------------------------------
_READY = grpc.ChannelConnectivity.READY
_IDLE = grpc.ChannelConnectivity.IDLE
# A channel in TRANSIENT_FAILURE could not connect and waits out its reconnect backoff: a
# call sent now fails at once. SHUTDOWN: the channel is closed.
_UNREACHABLE = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)


class Endpoint:
    """One worker replica: its channel, and the pool's view of it.

    `healthy` ("up") is what calls, retries and the router's readiness go by. Only a
    health check answered SERVING over this channel sets it, so an endpoint is up
    only once its channel is connected; a failed connection attempt (the channel
    enters TRANSIENT_FAILURE), an UNAVAILABLE call or a failed health check clear it.
    """

    def __init__(self, address: str, max_message_bytes: int, tls: ClientTLS | None = None) -> None:
        self.address = address
        opts = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC's default reconnect backoff grows to 120 s: a worker that comes back
            # after an outage would sit unused that long. Health checks probe often anyway.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.channel = aio_channel(address, tls or ClientTLS(), opts, interceptors=[_TrackCalls()])
        self.stub = pb_grpc.ModelWorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.healthy = False
        self.info: ModelInfo | None = None
        # Bumped whenever the endpoint is marked down: a health check that was answered
        # before (its SERVING is older news) does not mark it up again.
        self.downs = 0
        self.last_ok = float("-inf")  # time.monotonic() of the last worker call that succeeded
        self.probe: asyncio.Task | None = None  # a health check under way

    def state(self) -> grpc.ChannelConnectivity:
        return self.channel.get_state(try_to_connect=False)


# The RPCs under way in one `_cancel_with_caller`, recorded by `_TrackCalls`.
_LIVE_CALLS: contextvars.ContextVar[list | None] = contextvars.ContextVar("glimprouter_live_calls", default=None)


class _TrackCalls(grpc.aio.UnaryUnaryClientInterceptor):
    """The innermost interceptor of a worker channel: it sees the real RPC object."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        call = await continuation(client_call_details, request)
        live = _LIVE_CALLS.get()
        if live is not None:
            live.append(call)
        return call


async def _cancel_with_caller(make_call):
    """Make and await a unary call; when the awaiting task is cancelled (client gone,
    CancelSession, deadline), cancel the RPC so the worker stops decoding.

    A bare grpc.aio call does that by itself, but not one wrapped by an interceptor
    that awaits `call.code()` in the interceptors' own task, as OpenTelemetry's
    client interceptor does once tracing is set up: the cancellation stops there and
    the worker writes the whole step for nobody. `_TrackCalls` hands us the RPC
    underneath, which we cancel ourselves."""
    live: list = []
    token = _LIVE_CALLS.set(live)
    try:
        call = make_call()  # the interceptors' task copies the context here: it sees `live`
    finally:
        _LIVE_CALLS.reset(token)
    try:
        return await call
    except asyncio.CancelledError:
        call.cancel()
        for rpc in live:
            rpc.cancel()
        raise


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
    ) -> None:
        if not addresses:
            raise ValueError(f"the {role} pool has no endpoints")
        self.role = role
        self.endpoints = [Endpoint(a, max_message_bytes, tls) for a in addresses]
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
            ep.info = model_info(m)
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
                ep.info = model_info(await ep.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5))
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

    async def call(self, session_id: str, affinity: dict[str, str], method: str, request):
        tried: set[str] = set()
        for attempt in range(self.retries + 1):
            ep = self.pick(session_id, affinity, tried)
            if attempt:
                observe.worker_retry(self.role, method)
            t0 = time.perf_counter()
            try:
                await self._connected(ep)
                out = await _cancel_with_caller(lambda: getattr(ep.stub, method)(request, timeout=self._timeout()))
            except grpc.aio.AioRpcError as exc:
                observe.worker_call(self.role, ep.address, method, exc.code().name, time.perf_counter() - t0)
                self._raise_unless_retryable(ep, exc, method)
                tried.add(ep.address)
                log.warning("%s worker %s failed %s (%s: %s)", self.role, ep.address, method, exc.code().name, exc.details())
            else:
                ep.last_ok = time.monotonic()
                observe.worker_call(self.role, ep.address, method, "OK", time.perf_counter() - t0, out)
                return out
        raise WorkersUnavailable(f"{method} failed on every {self.role} worker tried ({', '.join(sorted(tried))})")

    async def stream(self, session_id: str, affinity: dict[str, str], request) -> AsyncIterator[pb.GenerateChunk]:
        tried: set[str] = set()
        for attempt in range(self.retries + 1):
            ep = self.pick(session_id, affinity, tried)
            if attempt:
                observe.worker_retry(self.role, "GenerateStream")
            started = False
            t0 = time.perf_counter()
            last = None
            try:
                await self._connected(ep)
                rpc = ep.stub.GenerateStream(request, timeout=self._timeout())
                try:
                    async for chunk in rpc:
                        started = True
                        last = chunk
                        yield chunk
                finally:
                    rpc.cancel()  # a caller that stops reading (cancelled, gone) stops the worker; no-op when done
                ep.last_ok = time.monotonic()
                observe.worker_call(self.role, ep.address, "GenerateStream", "OK", time.perf_counter() - t0, last)
                return
            except grpc.aio.AioRpcError as exc:
                observe.worker_call(self.role, ep.address, "GenerateStream", exc.code().name, time.perf_counter() - t0)
                if started:  # text already reached the caller: cannot replay elsewhere
                    if exc.code() is grpc.StatusCode.UNAVAILABLE:
                        self._down(ep, f"GenerateStream failed: {exc.details()}")
                    raise WorkersUnavailable(f"{self.role} worker {ep.address} failed mid-stream: {exc.details()}") from None
                self._raise_unless_retryable(ep, exc, "GenerateStream")
                tried.add(ep.address)
                log.warning("%s worker %s failed GenerateStream (%s: %s)", self.role, ep.address, exc.code().name, exc.details())
        raise WorkersUnavailable(f"GenerateStream failed on every {self.role} worker tried ({', '.join(sorted(tried))})")

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

    def bind(self, session_id: str, affinity: dict[str, str]) -> "BoundWorker":
        return BoundWorker(self, session_id, affinity)


class BoundWorker(WorkerClient):
    """One session's view of a pool: the WorkerClient the step loop calls."""

    def __init__(self, pool: WorkerPool, session_id: str, affinity: dict[str, str]) -> None:
        assert pool.info is not None, "start() the pool first"
        self.pool, self.session_id, self.affinity = pool, session_id, affinity
        self.info = pool.info

    async def _call(self, method: str, request):
        return await self.pool.call(self.session_id, self.affinity, method, request)

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
        r = await self._call("Glimpse", pb.GlimpseRequest(prompt=_prompt(prompt), top_k=top_k, session_id=self.session_id))
        return glimpse(r)

    async def step(self, prompt, method, threshold, top_k, sampling, stop):
        req = pb.StepRequest(
            prompt=_prompt(prompt),
            entropy_method=pb.ENTROPY_METHOD_FULL if method is EntropyMethod.FULL else pb.ENTROPY_METHOD_TOP_K,
            threshold=threshold,
            top_k=top_k,
            sampling=_sampling(sampling),
            stop=_stop(stop),
            session_id=self.session_id,
        )
        r = await self._call("Step", req)
        keep = r.decision == pb.STEP_DECISION_KEEP
        return StepResult(
            Decision.KEEP if keep else Decision.ESCALATE,
            r.entropy,
            glimpse(r.glimpse),
            generation(r.generation) if keep else None,
        )

    def _gen_request(self, prompt, sampling, stop, return_entropies=False, top_k=20) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            prompt=_prompt(prompt), sampling=_sampling(sampling), stop=_stop(stop), session_id=self.session_id,
            return_entropies=return_entropies, top_k=top_k,
        )

    async def generate(self, prompt, sampling, stop, return_entropies=False, top_k=20):
        return generation(await self._call("Generate", self._gen_request(prompt, sampling, stop, return_entropies, top_k)))

    async def generate_stream(self, prompt, sampling, stop) -> AsyncIterator[Chunk]:
        ids: list[int] = []
        text: list[str] = []
        async for c in self.pool.stream(self.session_id, self.affinity, self._gen_request(prompt, sampling, stop)):
            ids.extend(c.token_ids)
            text.append(c.text)
            final = None
            if c.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                final = Generation(
                    ids, "".join(text), _FINISH.get(c.finish_reason, FinishReason.LENGTH), _usage(c.usage),
                    _timings(c.timings), [], c.matched_stop,
                )
            yield Chunk(list(c.token_ids), c.text, list(c.entropies), final)
