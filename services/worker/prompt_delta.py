"""Prompt deltas on Multiplex: a session's prompt sent as what it adds to its previous one.

Every call of a session carries the session's whole prefix (its prompt, then
every step), so sent whole a call costs the router, the wire and the worker's
parser work that grows with the session: at a few thousand tokens, more router
CPU than the rest of a step. On a Multiplex stream (worker.proto, PromptDelta)
a call's prompt is instead the first `keep` tokens of the same session's
previous prompt on that stream, followed by the new `ids`: what the session
stored since (a step, or a chunk of one), not its length.

Both ends keep the last `SESSIONS` sessions that sent a prompt on a stream, in
the order the calls were sent (the stream keeps that order), least recent
dropped first: so the sender knows what the worker holds without asking. The
worker still checks, and fails a delta it cannot resolve (FAILED_PRECONDITION);
the sender then sends that prompt whole (see router/mux.py).

The sender tells that a prompt extends the previous one without comparing
tokens: the router's prefixes are append-only lists (TurnState.prefixes), and a
prompt is one of them, or `Continued(base, tail)`: such a list followed by more
tokens. The sender remembers which list it last sent and how much of it.
"""
from __future__ import annotations

import array
import collections
import itertools
from typing import Iterator, Sequence

from glimprouter.v1 import worker_pb2 as pb

SESSIONS = 1024  # per stream, at both ends (worker.proto promises it)


class Continued(Sequence[int]):
    """`base` as it is now, followed by `tail`, without copying `base`: the session's
    prefix (an append-only list, which the sender recognises) and tokens that are not
    stored (a catch-up chunk, the answer's join). Reads as the tokens for anyone else."""

    __slots__ = ("base", "base_len", "tail")

    def __init__(self, base: list[int], tail: Sequence[int]) -> None:
        self.base, self.base_len, self.tail = base, len(base), list(tail)

    def __len__(self) -> int:
        return self.base_len + len(self.tail)

    def __iter__(self) -> Iterator[int]:
        yield from itertools.islice(self.base, self.base_len)
        yield from self.tail

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("Continued index out of range")
        i %= n
        return self.base[i] if i < self.base_len else self.tail[i - self.base_len]


class Sender:
    """The router's end of one stream."""

    def __init__(self, sessions: int = SESSIONS) -> None:
        self.sessions = sessions
        # session id -> (the base list last sent, how many of its tokens)
        self._sent: collections.OrderedDict[str, tuple[list[int], int]] = collections.OrderedDict()

    def encode(self, session_id: str, prompt: Sequence[int], out: pb.Prompt) -> bool:
        """Fills `out` with `prompt` as this stream sends it now; True when as a delta.
        Call it in the order the calls go out."""
        out.Clear()
        if isinstance(prompt, Continued):
            base, n, tail = prompt.base, prompt.base_len, prompt.tail
        else:
            base, n, tail = prompt, len(prompt), ()
        if not session_id:
            out.token_ids.ids.extend(prompt)
            return False
        prev = self._sent.pop(session_id, None)
        delta = prev is not None and prev[0] is base and n >= prev[1]
        if delta:
            keep = prev[1]
            d = out.delta
            d.keep = keep
            d.ids.extend(base[keep:n])
            d.ids.extend(tail)
        else:
            out.token_ids.ids.extend(prompt)
        self._sent[session_id] = (base, n)
        if len(self._sent) > self.sessions:
            self._sent.popitem(last=False)
        return delta

    def forget(self, session_id: str) -> None:
        """Its next prompt goes whole (the session's turn ended here, or the worker
        refused a delta): and the router no longer holds on to its prefix."""
        self._sent.pop(session_id, None)


class Receiver:
    """The worker's end of one stream."""

    def __init__(self, sessions: int = SESSIONS) -> None:
        self.sessions = sessions
        self._last: collections.OrderedDict[str, array.array] = collections.OrderedDict()

    def resolve(self, session_id: str, prompt: pb.Prompt) -> str:
        """Makes `prompt` whole in place and remembers it for the session's next call on
        this stream. Returns why not ("" when resolved or nothing to do)."""
        kind = prompt.WhichOneof("kind")
        if kind == "delta":
            prev = self._last.pop(session_id, None) if session_id else None
            keep, ids = prompt.delta.keep, prompt.delta.ids
            if prev is None or not 0 <= keep <= len(prev):
                held = "none" if prev is None else f"{len(prev)} tokens"
                return (f"prompt.delta: keeps {keep} tokens of session {session_id!r}'s previous prompt on this "
                        f"stream, which holds {held}: send the prompt whole")
            full = prev[:keep]
            full.extend(ids)
            prompt.token_ids.ids.extend(full)  # (replaces the delta: one of a oneof)
        elif kind == "token_ids" and session_id:
            full = array.array("i", prompt.token_ids.ids)
        else:
            return ""
        self._last[session_id] = full
        self._last.move_to_end(session_id)
        if len(self._last) > self.sessions:
            self._last.popitem(last=False)
        return ""
