"""The router without its transport: sessions, leases and the step loop.

`RouterCore.reason` validates a request, creates, resumes or continues the
session in Redis under a lease, and runs the step loop, yielding events. The gRPC
servicer only converts protobuf to these dataclasses and errors to status codes;
tests drive this class directly over in-process engines.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import re
import secrets
import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from redis.exceptions import RedisError

from services.router import observe
from services.router.config import RouterSettings
from services.router.loop import TEXT_MODE, TOKEN_MODE, StepLoop, TurnState, turn_stats, views_for
from services.router.policies import make_policy
from services.router.store import SessionStore, StoredSession, default_holder
from services.router.types import (
    ChatTurn,
    FailedPrecondition,
    Finished,
    InvalidArgument,
    Kind,
    LeaseLost,
    LimitExceeded,
    NotFound,
    ReasonRequest,
    Record,
    Role,
    RouterError,
    SessionCancelled,
    SessionOptions,
    ShuttingDown,
    Started,
    Stats,
    StepDone,
    StoreUnavailable,
)
from services.router.worker_client import WorkerClient
from services.worker.types import ChatMessage, ModelInfo

log = logging.getLogger("glimprouter.router")

_SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_ROLES = ("system", "user", "assistant")
# Rendered as the previous assistant reply so the text after it is exactly what the
# chat template puts between that reply and the new turn's generation prompt.
_SENTINEL = "GLIMPROUTER_TURN_SENTINEL_5f0c"


class Pool(Protocol):
    info: ModelInfo

    def bind(self, session_id: str, affinity: dict[str, str]) -> WorkerClient: ...


@dataclass
class SessionView:
    """GetSession's answer."""

    stored: StoredSession
    options: SessionOptions
    steps: list[Record]
    stats: Stats


def validate(req: ReasonRequest, settings: RouterSettings) -> None:
    o = req.options
    make_policy(o.routing)  # unknown names and bad parameters
    if o.routing.glimpse_mode not in ("fused", "separate"):
        raise InvalidArgument(f"glimpse_mode must be fused or separate, got {o.routing.glimpse_mode!r}")
    if o.routing.entropy not in ("top_k", "full"):
        raise InvalidArgument(f"entropy must be top_k or full, got {o.routing.entropy!r}")
    if not 1 <= o.routing.top_k <= 100:
        raise InvalidArgument(f"top_k must be in [1, 100], got {o.routing.top_k}")
    b = o.budgets
    for name in ("step_tokens", "thinking_tokens", "answer_tokens"):
        if getattr(b, name) <= 0:
            raise InvalidArgument(f"budgets.{name} must be positive, got {getattr(b, name)}")
    if b.max_steps < 0:
        raise InvalidArgument(f"budgets.max_steps must be >= 0 (0: no limit), got {b.max_steps}")
    s = o.sampling
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument(f"sampling.temperature must be a finite number >= 0, got {s.temperature}")
    if not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    if req.session_id and not _SESSION_ID.match(req.session_id):
        raise InvalidArgument("session_id must be 1-128 characters of letters, digits, '_', '.', ':' or '-'")
    for i, m in enumerate(req.messages):
        if m.role not in _ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {m.role!r}")
    if req.messages and not any(m.content.strip() for m in req.messages):
        raise InvalidArgument("every message is empty: send some text to reason about")


class RouterCore:
    def __init__(self, settings: RouterSettings, store: SessionStore, small: Pool, large: Pool) -> None:
        self.settings = settings
        self.store = store
        self.pools = {Role.SMALL: small, Role.LARGE: large}
        fs, fl = small.info.tokenizer_fingerprint, large.info.tokenizer_fingerprint
        # Token ids can only travel between models that mean the same thing by them.
        self.mode = TOKEN_MODE if fs and fs == fl else TEXT_MODE
        self.holder = settings.router_id or default_holder()
        self._active: dict[str, asyncio.Task] = {}
        self._stop_reason: dict[str, RouterError] = {}
        self.draining = False

    # ---- Reason --------------------------------------------------------------------
    async def reason(self, req: ReasonRequest) -> AsyncIterator[object]:
        """The session's events, inside the call's session span (observe.py)."""
        with observe.session_span(req) as obs:
            async with contextlib.aclosing(self._reason(req)) as events:
                async for event in events:
                    if isinstance(event, Started):
                        obs.started(event)
                        await self._note_trace(event.session_id)
                    elif isinstance(event, Finished):
                        obs.finished(event.stats, event.answer)
                    yield event

    async def _note_trace(self, sid: str) -> None:
        trace_id = observe.current_trace_id()
        if not trace_id:
            return
        try:
            await self.store.add_trace(sid, trace_id)
        except RedisError as exc:  # only a pointer for people; the step writes will meet Redis's state anyway
            log.warning("session %s: could not note trace %s (%s)", sid, trace_id, exc)

    async def _reason(self, req: ReasonRequest) -> AsyncIterator[object]:
        validate(req, self.settings)
        if self.draining:
            raise ShuttingDown(f"router {self.holder} is shutting down; retry on another replica")
        if len(self._active) >= self.settings.max_concurrent:
            raise LimitExceeded(
                f"this router is working on {len(self._active)} sessions (limit {self.settings.max_concurrent},"
                " --max-concurrent); retry later or on another replica"
            )
        token = self.store.new_lease_token(self.holder)
        affinity: dict[str, str] = {}
        if not req.session_id:
            state, options = await self._create(req, token, affinity)
        else:
            state, options = await self._open(req, token, affinity)
        sid = state.session_id
        task = asyncio.current_task()
        assert task is not None
        self._active[sid] = task
        # Renewals every second would bury a session's trace: they run untraced.
        renewer = asyncio.create_task(self._renew(sid, token, task), context=observe.untraced_context())
        store_down = False
        try:
            small, large = (self.pools[r].bind(sid, affinity) for r in (Role.SMALL, Role.LARGE))
            yield Started(sid, state.turn, state.mode, state.resumed_steps, small.info.model_id, large.info.model_id)
            loop = StepLoop(
                state,
                options,
                make_policy(options.routing),
                small,
                large,
                _LeaseWriter(self.store, sid, token, state, affinity),
                include_token_ids=req.include_token_ids,
                max_session_steps=self.settings.max_session_steps,
            )
            async with contextlib.aclosing(loop.run()) as events:
                async for event in events:
                    yield event
                    if self.draining and isinstance(event, StepDone):
                        # SIGTERM: the step is stored and reported; stop here and hand the
                        # session back at once (lease released) rather than at the grace's end.
                        raise ShuttingDown(
                            f"router {self.holder} is shutting down: session {sid!r} stopped after step"
                            f" {event.record.index}; send its id again to resume it on another replica"
                        )
        except asyncio.CancelledError:
            reason = self._stop_reason.pop(sid, None)
            if reason is None:  # the caller went away: the turn can be resumed later
                await self._mark(sid, token, "interrupted", "the client cancelled the request")
                raise
            task.uncancel()
            if isinstance(reason, StoreUnavailable):
                store_down = True  # nothing to mark or release with: Redis is away
                raise reason from None
            await self._mark(sid, token, "cancelled" if isinstance(reason, SessionCancelled) else "interrupted", str(reason))
            raise reason from None
        except SessionCancelled as exc:
            await self._mark(sid, token, "cancelled", str(exc))
            raise
        except LeaseLost:
            raise  # someone else owns the session now: write nothing
        except RedisError as exc:
            # Redis is away: marking and releasing would only wait for it too. The
            # lease expires by itself; the session resumes from its last stored step.
            store_down = True
            raise StoreUnavailable(f"session store unavailable: {exc}; session {sid!r} resumes once it is back") from None
        except BaseException as exc:
            await self._mark(sid, token, "interrupted", str(exc) or type(exc).__name__)
            raise
        finally:
            renewer.cancel()
            self._active.pop(sid, None)
            self._stop_reason.pop(sid, None)
            if not store_down:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(sid, token))

    async def _renew(self, sid: str, token: str, task: asyncio.Task) -> None:
        """Keep the lease while working; stop the work when it is lost or cancelled."""
        interval = self.settings.lease_renew_ms / 1000
        failures = 0
        while True:
            await asyncio.sleep(interval)
            try:
                rc = await self.store.renew(sid, token)
                failures = 0
            except Exception as exc:  # Redis briefly away: the lease outlives a few misses
                failures += 1
                log.warning("session %s: lease renewal failed (%s)", sid, exc)
                if failures * self.settings.lease_renew_ms < self.settings.lease_ms / 2:
                    continue
                # Stop before the lease can expire under us: another router may take over.
                self._stop_reason[sid] = StoreUnavailable(
                    f"session store unavailable: the lease of session {sid!r} could not be renewed ({exc})"
                )
                task.cancel()
                return
            if rc == 1:
                continue
            self._stop_reason[sid] = (
                SessionCancelled(f"session {sid!r} was cancelled")
                if rc == 2
                else LeaseLost(f"session {sid!r}: this router lost its lease (it expired or was taken over)")
            )
            task.cancel()
            return

    async def _mark(self, sid: str, token: str, status: str, error: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(self.store.set_status(sid, token, status, error[:500]))

    def _think(self, options: SessionOptions) -> tuple[bool, str, str]:
        si, li = self.pools[Role.SMALL].info, self.pools[Role.LARGE].info
        think = options.think if options.think is not None else bool(si.think_end and li.think_end)
        return think, li.think_start or si.think_start or "<think>", li.think_end or si.think_end or "</think>"

    async def _render(self, role: Role, client: WorkerClient, messages: list[ChatTurn], think: bool, think_start: str):
        ids, text = await client.render_prompt([ChatMessage(m.role, m.content) for m in messages], True, False)
        if think and not text.rstrip().endswith(think_start):
            # The paper's framing: the reasoning starts right after "<think>".
            extra = await client.tokenize(think_start + "\n")
            ids, text = ids + extra, text + think_start + "\n"
        return ids, text

    def _check_prompt(self, ids: list[int], what: str) -> None:
        if len(ids) > self.settings.max_prompt_tokens:
            raise InvalidArgument(
                f"the {what} has {len(ids)} tokens; the limit is {self.settings.max_prompt_tokens} (--max-prompt-tokens)"
            )
        # Refused here, before anything is stored, rather than by the worker's first step.
        context = min(p.info.context_length for p in self.pools.values())
        if len(ids) >= context:
            raise InvalidArgument(
                f"the {what} has {len(ids)} tokens; the models' context holds {context} and a step needs room to be written"
            )

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
        while self._active and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return len(self._active)

    async def _create(self, req: ReasonRequest, token: str, affinity: dict[str, str]):
        if not req.messages:
            raise InvalidArgument("messages is empty: send at least one message (or a prompt) to start a session")
        # 128 bits from the OS's CSPRNG: ids cannot be guessed (ownership is checked too).
        sid = secrets.token_hex(16)
        options = dataclasses.replace(req.options)
        if options.sampling.seed is None:
            # Chosen once and stored: a resumed session samples as the first router would have.
            options.sampling = dataclasses.replace(options.sampling, seed=random.getrandbits(63))
        think, think_start, think_end = self._think(options)
        clients = {r: self.pools[r].bind(sid, affinity) for r in Role}
        views = views_for(self.mode)
        tokens: dict[str, list[int]] = {}
        text = ""
        # Token mode: one prefix, rendered by the large model's template (the
        # conversation is the large model's; the small one assists in it).
        for role in (Role.LARGE, Role.SMALL):
            if views[role] in tokens:
                continue
            ids, text_r = await self._render(role, clients[role], req.messages, think, think_start)
            self._check_prompt(ids, "rendered prompt")
            tokens[views[role]] = ids
            text = text or text_r
        record = Record(Kind.PROMPT, 0, text=text, tokens=len(next(iter(tokens.values()))))
        meta = {
            "status": "running",
            "mode": self.mode,
            "views": ",".join(sorted(tokens)),
            "options": options.to_json(),
            "seed": str(options.sampling.seed),
            "think": "1" if think else "0",
            "think_end": think_end,
            "turn": "0",
            "steps": "0",
            "small_model": self.pools[Role.SMALL].info.model_id,
            "large_model": self.pools[Role.LARGE].info.model_id,
            "owner": req.owner,
            **{f"aff:{k}": v for k, v in affinity.items()},
        }
        await self.store.create(sid, token, record, tokens, meta)
        state = TurnState(
            sid, 0, self.mode, options.sampling.seed, think, think_end,
            {v: list(ids) for v, ids in tokens.items()}, 1, [], [record],
        )
        return state, options

    async def _open(self, req: ReasonRequest, token: str, affinity: dict[str, str]):
        sid = req.session_id
        # Before the lease: another owner must not even learn that the session is busy.
        await self._check_owner(sid, req.owner)
        await self.store.acquire(sid, token)
        try:
            stored = await self.store.load(sid)
            if stored is None:
                raise NotFound(
                    f"session {sid!r} not found (it never existed, or expired {self.settings.session_ttl_s}s after its last write)"
                )
            meta = stored.meta
            if meta.get("mode") != self.mode:
                raise FailedPrecondition(
                    f"session {sid!r} runs in {meta.get('mode')} mode but this router's pools need {self.mode} mode"
                    " (the workers' tokenizers changed); start a new session"
                )
            affinity.update({k[4:]: v for k, v in meta.items() if k.startswith("aff:")})
            options = SessionOptions.from_json(meta["options"])
            status = meta.get("status", "running")
            if status == "cancelled":
                raise FailedPrecondition(f"session {sid!r} was cancelled; start a new session")
            if status == "done":
                if not req.messages:
                    raise InvalidArgument(
                        f"session {sid!r} has finished its turn: send messages to continue it with a new turn"
                    )
                options = merge_options(options, req.options, req.options_set)
                state = self._state(stored)
                await self._new_turn(state, options, req.messages, token, affinity)
                return state, options
            if req.messages:
                raise FailedPrecondition(
                    f"session {sid!r} has an unfinished turn ({status}); resume it by sending no messages, then add a turn"
                )
            state = self._state(stored)
            state.resumed_steps = len(state.turn_steps)
            await self.store.set_status(sid, token, "running", "")
            return state, options
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.release(sid, token)
            raise

    def _state(self, stored: StoredSession) -> TurnState:
        meta, records = stored.meta, stored.records
        start = max(i for i, r in enumerate(records) if r.kind in (Kind.PROMPT, Kind.TURN))
        last = records[-1]
        for view, ids in stored.prefixes.items():
            if last.prefix_end.get(view, len(ids)) != len(ids):
                raise FailedPrecondition(
                    f"session {stored.session_id!r} is inconsistent: its {view} prefix has {len(ids)} tokens, its log says"
                    f" {last.prefix_end[view]}"
                )
        return TurnState(
            session_id=stored.session_id,
            turn=int(meta.get("turn", "0")),
            mode=meta["mode"],
            seed=int(meta["seed"]),
            think=meta.get("think") == "1",
            think_end=meta.get("think_end", "</think>"),
            prefixes=stored.prefixes,
            log_len=len(records),
            session_steps=[r for r in records if r.kind is Kind.STEP],
            turn_records=records[start:],
        )

    async def _new_turn(self, state: TurnState, options: SessionOptions, messages: list[ChatTurn], token: str, affinity) -> None:
        if self.settings.max_session_steps and len(state.session_steps) >= self.settings.max_session_steps:
            raise LimitExceeded(
                f"session {state.session_id!r} holds {len(state.session_steps)} steps, the limit"
                f" (--max-session-steps {self.settings.max_session_steps}); start a new session"
            )
        think, think_start, _ = self._think(options)
        views = views_for(state.mode)
        tokens: dict[str, list[int]] = {}
        text = ""
        for role in (Role.LARGE, Role.SMALL):
            view = views[role]
            if view in tokens:
                continue
            client = self.pools[role].bind(state.session_id, affinity)
            ids, text_r = await self._turn_tokens(client, messages, state.prefixes[view], think, think_start)
            self._check_prompt(state.prefixes[view] + ids, "session prefix with the new turn")
            tokens[view] = ids
            text = text or text_r
        turn = state.turn + 1
        record = Record(Kind.TURN, turn, text=text, tokens=len(next(iter(tokens.values()))))
        meta = {"status": "running", "turn": str(turn), "options": options.to_json(), "think": "1" if think else "0"}
        await _LeaseWriter(self.store, state.session_id, token, state, affinity).append([(record, tokens)], meta)
        record.prefix_end = {v: len(state.prefixes[v]) + len(t) for v, t in tokens.items()}
        for v, t in tokens.items():
            state.prefixes[v].extend(t)
        state.turn, state.think = turn, think
        state.turn_records = [record]
        state.log_len += 1

    async def _turn_tokens(self, client: WorkerClient, messages: list[ChatTurn], prefix: list[int], think: bool, think_start: str):
        """The tokens that follow a finished turn's stored prefix to open a new one:
        the template's text after an assistant reply, through the new messages, to the
        generation prompt. The stored prefix stays as it is (never re-rendered)."""
        convo = [ChatMessage("user", "."), ChatMessage("assistant", _SENTINEL)] + [ChatMessage(m.role, m.content) for m in messages]
        _, text = await client.render_prompt(convo, True, False)
        if _SENTINEL in text:
            tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
        else:  # a template that drops assistant text: fall back to plain joining
            tail = "\n\n" + "\n\n".join(m.content for m in messages) + "\n\n"
        if think and not tail.rstrip().endswith(think_start):
            tail += think_start + "\n"
        ids = await client.tokenize(tail)
        # The reply already ended with the end-of-turn token the template writes next.
        if ids and prefix and ids[0] == prefix[-1] and prefix[-1] in client.info.eos_token_ids:
            ids = ids[1:]
        return ids, tail

    # ---- GetSession / CancelSession ------------------------------------------------------
    async def get_session(self, session_id: str, include_prefix: bool = False, owner: str = "") -> SessionView:
        if not _SESSION_ID.match(session_id or ""):
            raise InvalidArgument("session_id must be 1-128 characters of letters, digits, '_', '.', ':' or '-'")
        stored = await self.store.load(session_id, with_prefixes=True)
        if stored is None or stored.meta.get("owner", "") != owner:
            raise NotFound(f"session {session_id!r} not found (it never existed, or expired)")
        state = self._state(stored)
        answer_end = state.answer_record.finish_reason if state.answer_record else "none"
        return SessionView(stored, SessionOptions.from_json(stored.meta["options"]), state.session_steps, turn_stats(state, answer_end, 0.0))

    async def cancel(self, session_id: str, owner: str = "") -> tuple[bool, str]:
        if not _SESSION_ID.match(session_id or ""):
            raise InvalidArgument("session_id must be 1-128 characters of letters, digits, '_', '.', ':' or '-'")
        stored_owner = await self.store.owner(session_id)
        if stored_owner is not None and stored_owner != owner:
            raise NotFound(f"session {session_id!r} not found (it never existed, or expired)")
        rc = await self.store.request_cancel(session_id)
        if rc == 0:
            raise NotFound(f"session {session_id!r} not found (it never existed, or expired)")
        if rc == 2:
            stored = await self.store.load(session_id, with_prefixes=False)
            return False, stored.meta.get("status", "done") if stored else "done"
        task = self._active.get(session_id)
        if task is not None:  # served here: stop now rather than at the next renewal
            self._stop_reason[session_id] = SessionCancelled(f"session {session_id!r} was cancelled")
            task.cancel()
        return True, "cancelled"


def merge_options(stored: SessionOptions, new: SessionOptions, given: frozenset[str]) -> SessionOptions:
    """A new turn keeps the session's options except the groups the request sets."""
    out = dataclasses.replace(stored)
    for group in given:
        setattr(out, group, getattr(new, group))
    if out.sampling.seed is None:
        out.sampling = dataclasses.replace(out.sampling, seed=stored.sampling.seed)
    return out


class _LeaseWriter:
    """The loop's Writer: appends under this router's lease at the log position it expects."""

    def __init__(self, store: SessionStore, sid: str, token: str, state: TurnState, affinity: dict[str, str]) -> None:
        self.store, self.sid, self.token, self.state, self.affinity = store, sid, token, state, affinity
        self._written_affinity = dict(affinity)

    async def append(self, entries, meta):
        if self.affinity != self._written_affinity:
            # The session moved to another replica: later routers should follow it.
            meta = {**meta, **{f"aff:{k}": v for k, v in self.affinity.items()}}
        await self.store.append(self.sid, self.token, self.state.log_len, entries, meta)
        self._written_affinity = dict(self.affinity)
