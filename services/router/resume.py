"""Resume: a stored session back into a TurnState, and the options of its next turn.

A session is its log: the records since the last prompt/turn record are the turn
in progress, and the steps in it are what a resumed turn continues from (nothing
a client saw is repeated, nothing stored is lost). The stored prefix must end
where the log says it does; anything else is refused rather than continued.
"""
from __future__ import annotations

import dataclasses

from services.router.errors import FailedPrecondition
from services.router.session import Kind, SessionOptions, TurnState
from services.router.store import StoredSession


def turn_state(stored: StoredSession) -> TurnState:
    meta, records = stored.meta, stored.records
    if not records:
        raise FailedPrecondition(f"session {stored.session_id!r} is inconsistent: its log is empty")
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
        turn=meta.turn,
        mode=meta.mode,
        seed=meta.seed,
        think=meta.think,
        think_end=meta.think_end,
        prefixes=stored.prefixes,
        log_len=len(records),
        session_steps=[r for r in records if r.kind is Kind.STEP],
        turn_records=records[start:],
    )


def merge_options(stored: SessionOptions, new: SessionOptions, given: frozenset[str]) -> SessionOptions:
    """A new turn keeps the session's options except the groups the request sets."""
    out = dataclasses.replace(stored)
    for group in given:
        setattr(out, group, getattr(new, group))
    if out.sampling.seed is None:
        out.sampling = dataclasses.replace(out.sampling, seed=stored.sampling.seed)
    return out
