"""Saved KV state of sessions that are not in a sequence right now.

A worker's context holds `--parallel` sequences; a router talks to many more
sessions than that. When a sequence is handed to another session, the state of
the session leaving it is saved here (llama.cpp's per-sequence state, a few KB
per token) and restored when that session comes back, instead of prefilling its
whole prefix again. Bounded in bytes (`--kv-cache-bytes`), least recently used
out first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class Snapshot:
    tokens: list[int]  # the token ids whose KV the state holds, positions 0..n-1
    state: np.ndarray  # uint8, from BatchModel.save

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + 4 * len(self.tokens)


class SnapshotCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._snaps: OrderedDict[str, Snapshot] = OrderedDict()
        self.bytes = 0
        self.saved = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._snaps)

    def get(self, session_id: str) -> Snapshot | None:
        return self._snaps.get(session_id)

    def holds(self, session_id: str, tokens: list[int]) -> bool:
        """The session's saved state is exactly these tokens (nothing to save again)."""
        snap = self._snaps.get(session_id)
        return snap is not None and snap.tokens == tokens

    def touch(self, session_id: str) -> None:
        if session_id in self._snaps:
            self._snaps.move_to_end(session_id)

    def put(self, session_id: str, snap: Snapshot) -> bool:
        self.drop(session_id)
        if snap.nbytes > self.max_bytes:
            return False
        self._snaps[session_id] = snap
        self.bytes += snap.nbytes
        self.saved += 1
        while self.bytes > self.max_bytes:
            self.drop(next(iter(self._snaps)))
            self.evicted += 1
        return True

    def drop(self, session_id: str) -> None:
        snap = self._snaps.pop(session_id, None)
        if snap is not None:
            self.bytes -= snap.nbytes

    def clear(self) -> None:
        self._snaps.clear()
        self.bytes = 0
