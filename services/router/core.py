"""The router without its transport: one Reason call from request to last event.

    admission.admit     the request's options, checked; the router's own limits
    store.create / acquire + resume.turn_state
                        a new session (its first turn rendered by turns.py), or a
                        stored one, under a lease (lease.py: renewed in the
                        background, stops the call when lost or cancelled)
    turns.next          a new turn's messages on the stored prefix (when sent)
    loop.StepLoop.run   the steps, the answer, the Done event
    the status          a call that stops early leaves its session resumable

Events go out through `emit` (the gRPC servicer writes them to the stream; tests
collect them), passing metrics.SessionMetrics and the session span on the way.
`get_session` and `cancel` are the other two calls.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from typing import AsyncIterator

from redis.exceptions import RedisError

from services.router import admission, spans
from services.router.api.types import CatchUp, Done, Event, PrefixView, ReasonRequest, Role, SessionInfo, Started, Step
from services.router.config import RouterSettings
from services.router.errors import (
    FailedPrecondition,
    InvalidArgument,
    LeaseLost,
    LimitExceeded,
    NotFound,
    RouterError,
    SessionCancelled,
    ShuttingDown,
    StoreUnavailable,
)
from services.router.lease import Lease, Leases
from services.router.loop import Emit, Entries, StepLoop, turn_stats
from services.router.metrics import SessionMetrics
from services.router.policies import POLICIES, make_policy
from services.router.resume import merge_options, turn_state
from services.router.session import SessionMeta, SessionOptions, TurnState, affinity_fields
from services.router.store import SessionStore, default_holder
from services.router.turns import Pool, Turns

log = logging.getLogger("glimprouter.router")


def code_of(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    code = getattr(exc, "code", None)
    if isinstance(code, str):  # RouterError
        return code
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        return "CANCELLED"
    if isinstance(exc, RedisError):
        return "UNAVAILABLE"
    return "INTERNAL"


class _LeaseWriter:
    """The loop's Writer: appends under this router's lease at the log position it expects."""

    def __init__(self, store: SessionStore, lease: Lease, state: TurnState, affinity: dict[str, str]) -> None:
        self.store, self.lease, self.state, self.affinity = store, lease, state, affinity
        self._written_affinity = dict(affinity)

    async def append(self, entries: Entries, fields: dict[str, str], *, turn_end: bool = False,
                     turn_start: bool = False) -> None:
        if self.affinity != self._written_affinity:
            # The session moved to another replica: later routers should follow it.
            fields = {**fields, **affinity_fields(self.affinity)}
        if turn_end:
            self.lease.releasing = True  # a renewal that finds the lease gone now is not a loss
        await self.store.append(self.state.session_id, self.lease.token, self.state.log_len, entries, fields,
                                views=self.lease.views, turn_start=turn_start, turn_end=turn_end)
        self.lease.released = self.lease.released or turn_end
        self._written_affinity = dict(self.affinity)


class RouterCore:
    def __init__(self, settings: RouterSettings, store: SessionStore, small: Pool, large: Pool) -> None:
        self.settings = settings
        self.store = store
        self.pools = {Role.SMALL: small, Role.LARGE: large}
        self.turns = Turns(settings, self.pools)
        self.mode = self.turns.mode
        self.holder = settings.router_id or default_holder()
        self.leases = Leases(store, settings)
        self.draining = False

    # ---- Reason --------------------------------------------------------------------
    async def reason(self, req: ReasonRequest, emit: Emit, owner: str = "") -> None:
        """Runs one Reason call, handing each event to `emit` as it happens."""
        # A metric label only ever holds a known name: requests can send anything.
        name = (req.routing.policy if req.routing else "") or "glimpse"
        obs = SessionMetrics(name if name in POLICIES else "unknown")
        code = "OK"
        with spans.session(req) as span:
            t0 = time.perf_counter()

            async def observed(ev: Event) -> None:
                if obs.event(ev):
                    spans.first_token(span, time.perf_counter() - t0, type(ev).__name__)
                elif isinstance(ev, Done):
                    spans.finished(span, ev.stats, ev.answer)
                await emit(ev)
                if self.draining and isinstance(ev, Step):
                    # SIGTERM: the step is stored and reported; stop here and hand the
                    # session back at once (lease released) rather than at the grace's end.
                    raise ShuttingDown(
                        f"router {self.holder} is shutting down: session stopped after step {ev.index};"
                        " send its id again to resume it on another replica"
                    )

            try:
                await self._reason(req, observed, owner, obs, span)
            except BaseException as exc:
                code = code_of(exc)
                raise
            finally:
                obs.finish(code)
                spans.failed(span, code)

    async def events(self, req: ReasonRequest, owner: str = "") -> AsyncIterator[Event]:
        """The call's events as an iterator (tests, in-process tools): the call runs in a
        task; leaving the iteration early cancels it, as a client that goes away does."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def run() -> None:
            try:
                await self.reason(req, queue.put, owner)
            finally:
                queue.put_nowait(done)

        task = asyncio.create_task(run())
        try:
            while (ev := await queue.get()) is not done:
                yield ev
            await task  # its error, if any
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def _reason(self, req: ReasonRequest, emit: Emit, owner: str, obs: SessionMetrics, span) -> None:
        options, given = admission.admit(req, self.settings, draining=self.draining, active=len(self.leases),
                                         holder=self.holder)
        token = self.store.new_lease_token(self.holder)
        affinity: dict[str, str] = {}
        state: TurnState | None = None
        if req.session_id:
            admission.check_session_id(req.session_id)
            # Before the lease: another owner must not even learn that the session is busy.
            await self._check_owner(req.session_id, owner)
            await self.store.acquire(req.session_id, token)
            sid, views = req.session_id, ()
        else:
            state = await self._create(req, options, token, affinity, owner)
            sid, views = state.session_id, tuple(sorted(state.prefixes))
        async with self.leases.hold(sid, token, views) as lease:
            if state is None:
                state, options = await self._open(req, options, given, lease, affinity)
            await self._work(req, state, options, lease, affinity, emit, obs, span)

    async def _work(self, req, state: TurnState, options: SessionOptions, lease: Lease, affinity, emit: Emit,
                    obs: SessionMetrics, span) -> None:
        sid = state.session_id
        try:
            small, large = (self.pools[r].bind(sid, affinity) for r in (Role.SMALL, Role.LARGE))
            started = Started(sid, state.turn, state.mode, state.resumed_steps, small.info.model_id, large.info.model_id,
                              state.think)
            spans.started(span, started)
            await emit(started)
            await self._note_trace(sid)
            policy = make_policy(options.routing)
            obs.turn(policy, options.routing.entropy.value)
            spans.turn(span, options, policy)
            loop = StepLoop(state, options, policy, small, large, _LeaseWriter(self.store, lease, state, affinity), emit,
                            include_token_ids=req.include_token_ids, max_session_steps=self.settings.max_session_steps,
                            attempts=self.settings.worker_retries + 1, token_cache=self.turns.constants,
                            catch_up=CatchUp(self.settings.catch_up), catch_up_tokens=self.settings.catch_up_tokens)
            await loop.run()
        except asyncio.CancelledError:
            reason = lease.stop_reason
            if reason is None:  # the caller went away: the turn can be resumed later
                await self._mark(lease, "interrupted", "the client cancelled the request")
                raise
            asyncio.current_task().uncancel()
            if isinstance(reason, (StoreUnavailable, LeaseLost)):
                raise reason from None  # nothing to mark with: Redis is away, or the session is not ours
            await self._mark(lease, "cancelled" if isinstance(reason, SessionCancelled) else "interrupted", str(reason))
            raise reason from None
        except SessionCancelled as exc:
            await self._mark(lease, "cancelled", str(exc))
            raise
        except LeaseLost:
            lease.released = True  # someone else owns the session now: write nothing
            raise
        except RedisError as exc:
            # Redis is away: marking and releasing would only wait for it too. The
            # lease expires by itself; the session resumes from its last stored step.
            lease.store_down = True
            raise StoreUnavailable(f"session store unavailable: {exc}; session {sid!r} resumes once it is back") from None
        except BaseException as exc:
            await self._mark(lease, "interrupted", str(exc) or type(exc).__name__)
            raise
        finally:
            for pool in self.pools.values():
                pool.forget(sid)  # the workers' streams let go of the session's prefix

    async def _note_trace(self, sid: str) -> None:
        trace_id = spans.current_trace_id()
        if not trace_id:
            return
        try:
            await self.store.add_trace(sid, trace_id)
        except RedisError as exc:  # only a pointer for people; the step writes will meet Redis's state anyway
            log.warning("session %s: could not note trace %s (%s)", sid, trace_id, exc)

    async def _mark(self, lease: Lease, status: str, error: str) -> None:
        """The status a call leaves when it stops early; the lease goes with it."""
        if lease.released or lease.store_down:
            return
        with contextlib.suppress(Exception):
            await asyncio.shield(self.store.set_status(lease.session_id, lease.token, status, error[:500],
                                                       views=lease.views, release=True))
            lease.released = True

    async def _check_owner(self, session_id: str, owner: str) -> None:
        """NOT_FOUND, with the same words as for an unknown id, unless `owner` created the session."""
        stored_owner = await self.store.owner(session_id)
        if stored_owner is None or stored_owner != owner:
            raise NotFound(
                f"session {session_id!r} not found (it never existed, or expired {self.settings.session_ttl_s}s after its last write)"
            )

    async def drain(self, timeout_s: float) -> int:
        """SIGTERM: refuse new requests; sessions in flight stop after their current step
        (stored) and release their leases. Returns how many were still running at the end."""
        self.draining = True
        end = time.monotonic() + timeout_s
        while len(self.leases) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return len(self.leases)

    # ---- a new session ----------------------------------------------------------------
    async def _create(self, req: ReasonRequest, options: SessionOptions, token: str, affinity: dict[str, str],
                      owner: str) -> TurnState:
        if not req.messages:
            raise InvalidArgument("messages is empty: send at least one message (or a prompt) to start a session")
        # 128 bits from the OS's CSPRNG: ids cannot be guessed (ownership is checked too).
        sid = secrets.token_hex(16)
        if options.sampling.seed is None:
            # Chosen once and stored: a resumed session samples as the first router would have.
            options.sampling.seed = random.getrandbits(63)
        think, think_start, think_end = self.turns.think(options)
        clients = {r: self.pools[r].bind(sid, affinity) for r in Role}
        record, tokens = await self.turns.first(clients, req.messages, think, think_start)
        meta = SessionMeta(
            mode=self.mode, options=options, seed=options.sampling.seed, think=think, think_end=think_end,
            small_model=self.pools[Role.SMALL].info.model_id, large_model=self.pools[Role.LARGE].info.model_id,
            owner=owner, affinity=dict(affinity),
        )
        await self.store.create(sid, token, record, tokens, meta)
        return TurnState(sid, 0, self.mode, options.sampling.seed, think, think_end,
                         {v: list(ids) for v, ids in tokens.items()}, 1, [], [record])

    # ---- a stored session ----------------------------------------------------------------
    async def _open(self, req: ReasonRequest, options: SessionOptions, given: frozenset[str], lease: Lease,
                    affinity: dict[str, str]) -> tuple[TurnState, SessionOptions]:
        sid = req.session_id
        stored = await self.store.load(sid)
        if stored is None:
            raise NotFound(
                f"session {sid!r} not found (it never existed, or expired {self.settings.session_ttl_s}s after its last write)"
            )
        meta = stored.meta
        lease.views = meta.views
        if meta.mode is not self.mode:
            raise FailedPrecondition(
                f"session {sid!r} runs in {meta.mode.value} mode but this router's pools need {self.mode.value} mode"
                " (the workers' tokenizers changed); start a new session"
            )
        affinity.update(meta.affinity)
        if meta.status == "cancelled":
            raise FailedPrecondition(f"session {sid!r} was cancelled; start a new session")
        state = turn_state(stored)
        if meta.status == "done":
            if not req.messages:
                raise InvalidArgument(f"session {sid!r} has finished its turn: send messages to continue it with a new turn")
            options = merge_options(meta.options, options, given)
            await self._new_turn(state, options, req, lease, affinity)
            return state, options
        if req.messages:
            raise FailedPrecondition(
                f"session {sid!r} has an unfinished turn ({meta.status}); resume it by sending no messages, then add a turn"
            )
        state.resumed_steps = len(state.turn_steps)
        if not await self.store.set_status(sid, lease.token, "running", "", views=lease.views, keep_ms=self.store.keep_ms):
            raise LeaseLost(f"session {sid!r}: this router lost its lease before the turn resumed")
        return state, meta.options

    async def _new_turn(self, state: TurnState, options: SessionOptions, req: ReasonRequest, lease: Lease,
                        affinity: dict[str, str]) -> None:
        limit = self.settings.max_session_steps
        if limit and len(state.session_steps) >= limit:
            raise LimitExceeded(
                f"session {state.session_id!r} holds {len(state.session_steps)} steps, the limit"
                f" (--max-session-steps {limit}); start a new session"
            )
        think, think_start, _ = self.turns.think(options)
        clients = {r: self.pools[r].bind(state.session_id, affinity) for r in Role}
        record, tokens = await self.turns.next(clients, state, req.messages, think, think_start)
        fields = {"status": "running", "turn": str(record.turn), "options": options.to_json(), "think": "1" if think else "0"}
        record.prefix_end = {v: len(state.prefixes[v]) + len(t) for v, t in tokens.items()}
        await _LeaseWriter(self.store, lease, state, affinity).append([(record, tokens)], fields, turn_start=True)
        state.start_turn(record, tokens)
        state.think = think

    # ---- GetSession / CancelSession ------------------------------------------------------
    async def get_session(self, session_id: str, include_prefix: bool = False, owner: str = "") -> SessionInfo:
        admission.check_session_id(session_id)
        stored = await self.store.load(session_id, with_prefixes=True)
        if stored is None or stored.meta.owner != owner:
            raise NotFound(f"session {session_id!r} not found (it never existed, or expired)")
        state = turn_state(stored)
        meta = stored.meta
        answer_end = state.answer_record.finish_reason if state.answer_record else "none"
        return SessionInfo(
            session_id=session_id,
            status=meta.status,
            prefix_mode=meta.mode,
            turn=meta.turn,
            small_model=meta.small_model,
            large_model=meta.large_model,
            options_json=meta.options.to_json(),
            steps=[r.step() for r in state.session_steps],
            prefixes=[PrefixView(name, len(ids), ids if include_prefix else []) for name, ids in sorted(stored.prefixes.items())],
            lease_holder=stored.lease_holder,
            lease_ms_left=stored.lease_ms_left,
            answer=meta.answer,
            stats=turn_stats(state, answer_end, 0.0),
            affinity=dict(meta.affinity),
            created_unix_ms=meta.created_ms,
            updated_unix_ms=meta.updated_ms,
            error=meta.error,
            trace_ids=list(meta.trace_ids),
        )

    async def cancel(self, session_id: str, owner: str = "") -> tuple[bool, str]:
        admission.check_session_id(session_id)
        stored_owner = await self.store.owner(session_id)
        if stored_owner is not None and stored_owner != owner:
            raise NotFound(f"session {session_id!r} not found (it never existed, or expired)")
        rc = await self.store.request_cancel(session_id)
        if rc == 0:
            raise NotFound(f"session {session_id!r} not found (it never existed, or expired)")
        if rc == 2:
            stored = await self.store.load(session_id, with_prefixes=False)
            return False, stored.meta.status if stored else "done"
        lease = self.leases.get(session_id)
        if lease is not None:  # served here: stop now rather than at the next renewal
            lease.stop(SessionCancelled(f"session {session_id!r} was cancelled"))
        return True, "cancelled"


__all__ = ["RouterCore", "RouterError", "code_of"]
