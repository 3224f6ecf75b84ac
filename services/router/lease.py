"""Session leases, held while a request works on a session.

`async with leases.hold(sid, token, views):` keeps the session this router's for the
block. One task renews every lease this router holds each --lease-renew-ms, all in
one Redis round trip (store.py batches them); a renewal also keeps the session's
keys alive (see store.py on TTLs). When a lease is lost (it expired, another
router took it over) or the session's cancel flag is set (CancelSession on any
replica), the request's task is cancelled with the reason in `lease.stop_reason`,
which the core turns into the request's error. The lease is released when the
block ends, unless the turn's last write already let it go.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from services.router import spans
from services.router.config import RouterSettings
from services.router.errors import LeaseLost, RouterError, SessionCancelled, StoreUnavailable
from services.router.store import SessionStore

log = logging.getLogger("glimprouter.router")


class Lease:
    def __init__(self, session_id: str, token: str, task: asyncio.Task, views: tuple[str, ...]) -> None:
        self.session_id, self.token, self.task, self.views = session_id, token, task, views
        self.stop_reason: RouterError | None = None
        self.releasing = False  # the turn's last write is on its way, and gives it up
        self.released = False  # the turn's last write gave it up
        self.store_down = False  # nothing to release with: Redis is away (the lease expires by itself)
        self.failures = 0

    def stop(self, reason: RouterError) -> None:
        """Stop the request working under this lease, with `reason` as its error."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.task.cancel()


class Leases:
    def __init__(self, store: SessionStore, settings: RouterSettings) -> None:
        self.store = store
        self.renew_s = settings.lease_renew_ms / 1000
        self.lease_ms = settings.lease_ms
        self.held: dict[str, Lease] = {}
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self.held)

    def get(self, session_id: str) -> Lease | None:
        return self.held.get(session_id)

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str, token: str, views: tuple[str, ...]):
        task = asyncio.current_task()
        assert task is not None
        lease = Lease(session_id, token, task, views)
        self.held[session_id] = lease
        if self._task is None or self._task.done():
            # Renewals every second would bury a session's trace: they run untraced.
            self._task = asyncio.get_running_loop().create_task(self._renew_all(), context=spans.untraced_context())
        try:
            yield lease
        finally:
            if self.held.get(session_id) is lease:
                del self.held[session_id]
            if not lease.released and not lease.store_down:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(session_id, token))

    async def _renew_all(self) -> None:
        while self.held:
            await asyncio.sleep(self.renew_s)
            leases = list(self.held.values())
            results = await asyncio.gather(*(self.store.renew(x.session_id, x.token, x.views) for x in leases),
                                           return_exceptions=True)
            for lease, rc in zip(leases, results):
                self._renewed(lease, rc)

    def _renewed(self, lease: Lease, rc) -> None:
        if lease.releasing or lease.released:
            return  # the turn's last write let the lease go: a renewal finding it gone is no loss
        if isinstance(rc, BaseException):  # Redis briefly away: the lease outlives a few misses
            lease.failures += 1
            log.warning("session %s: lease renewal failed (%s)", lease.session_id, rc)
            if lease.failures * self.renew_s * 1000 < self.lease_ms / 2:
                return
            # Stop before the lease can expire under us: another router may take over.
            lease.store_down = True
            lease.stop(StoreUnavailable(
                f"session store unavailable: the lease of session {lease.session_id!r} could not be renewed ({rc})"))
            return
        lease.failures = 0
        if rc == 2:
            lease.stop(SessionCancelled(f"session {lease.session_id!r} was cancelled"))
        elif rc != 1:
            lease.released = True  # not ours to release any more
            lease.stop(LeaseLost(f"session {lease.session_id!r}: this router lost its lease (it expired or was taken over)"))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
