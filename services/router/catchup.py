"""Eager catch-up: the model that is not writing a step reads it while it streams.

Without it, every switch between the models pays, on the critical path, the
prefill of everything the other model wrote since this one's last call (a
step of hundreds of tokens), while the model that just finished sits idle.
With it, the reader's worker extends the session's KV state (Extend) with the
step's tokens in chunks of `chunk_tokens` as the writer produces them, so that
when the step ends at most one chunk is left to prefill; and right after a step
is stored (and when a turn starts, with its prompt) the reader is sent the rest,
which it prefills while the next step's first call runs elsewhere.

Catch-up changes only *when* a worker prefills, never what anyone writes: the
real call always carries its whole prefix and the worker reuses whatever prefix
it holds. So a catch-up that fails, comes late or goes to a worker that lost
the state costs time at most; it never fails the request (failures are counted
and logged at debug level). One Extend is in flight per session at a time: the
next one, if any, carries everything that accumulated meanwhile.

In token mode both models read one prefix of token ids; in text mode the reader
catches up on its own tokenization of the step's text so far (Tokenize on its
worker), without the last token, which the rest of the text may still change.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Callable, Sequence

from services.router import metrics
from services.router.api.types import PrefixMode, Role
from services.router.worker_client import WorkerClient
from services.worker.prompt_delta import Continued

log = logging.getLogger("glimprouter.router.catchup")

DEFAULT_CHUNK_TOKENS = 16


def other(role: Role) -> Role:
    return Role.LARGE if role is Role.SMALL else Role.SMALL


class EagerCatchUp:
    """Eager catch-up for one session while its turn runs (one per StepLoop.run).

    The loop tells it what happens: `step_written_by(writer)` when a step's writer is
    announced, `tokens(ids, text)` for each piece of the step as it streams,
    `stored()` once the step (or the turn's prompt) is in the store. Everything it
    sends, it sends from one background task, which `close()` cancels (with the
    Extend in flight: the worker stops it)."""

    def __init__(
        self,
        workers: dict[Role, WorkerClient],
        roles: Callable[[], frozenset[Role]],
        stored_prefix: Callable[[Role], list[int]],
        mode: PrefixMode,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        first: Role | None = None,
    ) -> None:
        self.workers = workers
        self._roles_of = roles  # the roles the turn may still call: only those are worth catching up
        # They change only when something is stored: read once per stored() (the loop calls
        # tokens() per chunk and _due() per wake-up).
        self._roles: frozenset[Role] = frozenset(roles())
        self.stored_prefix = stored_prefix
        self.mode = mode
        self.chunk = max(1, chunk_tokens)
        # The model each step calls first: an Extend sent to it between steps would only
        # race its own call (and delay it by a batch), so it is never owed one.
        self.first = first
        self.writer: Role | None = None
        self.step_ids: list[int] = []
        self.step_text = ""
        # Per role, the length of the stored prefix plus step tokens it was last sent
        # (in the writer's tokens: what the chunk rule counts), and whether it is owed
        # the stored prefix in full.
        self._sent_step: dict[Role, int] = {r: 0 for r in Role}
        self._owed: set[Role] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.failed = 0

    # ---- what the loop tells it --------------------------------------------------------------
    def stored(self) -> None:
        """The store holds more than the readers were sent (a step, the prompt): a model
        that did not write it, and is not the one the next step calls first, is owed the
        stored prefix. (The writer holds its step but for its last token, which its next
        call evaluates anyway for its logits.)"""
        writer = self.writer
        self.writer = None
        self.step_ids = []
        self.step_text = ""
        self._roles = frozenset(self._roles_of())
        self._owed = set(self._roles) - {writer, self.first}
        for r in Role:
            self._sent_step[r] = 0
        self._poke()

    def step_written_by(self, writer: Role) -> None:
        """A new attempt at a step, by `writer`: its reader follows it from the start."""
        self.writer = writer
        self.step_ids = []
        self.step_text = ""
        self._owed.discard(writer)  # its own call reads the stored prefix now
        for r in Role:
            self._sent_step[r] = 0
        self._poke()

    def tokens(self, ids, text: str) -> None:
        if self.writer is None or not ids:
            return
        self.step_ids.extend(ids)
        self.step_text += text
        reader = other(self.writer)
        if reader in self._roles and len(self.step_ids) - self._sent_step[reader] >= self.chunk:
            self._poke()

    async def close(self) -> None:
        """No more catch-ups; the Extend in flight, if any, is cancelled on its worker (the
        turn is over, or stopped: nothing will read what it would add)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- the background task ----------------------------------------------------------------
    def _poke(self) -> None:
        if self._closed:
            return
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="catch-up")

    def _due(self) -> Role | None:
        """The role to extend now, if any: a reader a chunk behind the step, else a role
        owed the stored prefix (not the writer, whose own call is reading it)."""
        if self._closed:
            return None
        roles = self._roles
        if self.writer is not None:
            reader = other(self.writer)
            if reader in roles and len(self.step_ids) - self._sent_step[reader] >= self.chunk:
                return reader
        for r in sorted(self._owed, key=lambda r: r.value):
            if r is not self.writer and r in roles:
                return r
        return None

    async def _target(self, role: Role, covered: int) -> Sequence[int]:
        """The prefix to send `role`: the stored prefix, and the first `covered` tokens of
        the step being written when `role` is its reader."""
        base = self.stored_prefix(role)  # (the session's own list: a Multiplex stream sends what it added)
        if not covered:
            return base
        if self.mode is PrefixMode.TOKENS:
            return Continued(base, self.step_ids[:covered])
        text = self.step_text
        ids = await self.workers[role].tokenize(text) if text else []
        return Continued(base, ids[:-1])  # the last token may still merge with what follows

    async def _run(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while (role := self._due()) is not None:
                self._owed.discard(role)
                reading = self.writer is not None and role is other(self.writer)
                covered = len(self.step_ids) if reading else 0
                # Counted as sent before anything is awaited: a failure waits for the next
                # chunk (or the stored step) rather than trying again at once.
                self._sent_step[role] = max(self._sent_step[role], covered)
                try:
                    prompt = await self._target(role, covered)
                    ext = await self.workers[role].extend(prompt)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a catch-up never fails the request
                    self.failed += 1
                    metrics.catch_up(role.value, "error", 0)
                    # Not retried: the next chunk or stored step sends it all again.
                    log.debug("catch-up of the %s worker failed (the next call prefills instead): %s", role.value, exc)
                    continue
                metrics.catch_up(role.value, "ok", ext.usage.prefilled_tokens)
