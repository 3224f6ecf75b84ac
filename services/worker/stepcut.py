"""Where a step ends, decided on decoded text, shared by every backend.

A step ends at the token whose decoded text completes the boundary ("\n\n"),
including merged tokens such as ".\n\n"; matching token ids against an encoded
"\n\n" would miss those. A boundary only counts once the step has some non-blank
text, so a step never comes back empty.
"""
from __future__ import annotations

import codecs
from typing import Callable, Iterable, Sequence

from services.worker.types import FinishReason


class StepCutter:
    """Feed generated tokens one at a time; says when the step or a stop string ends."""

    def __init__(self, token_bytes: Callable[[int], bytes], boundary: str, stops: Sequence[str] = ()) -> None:
        self._token_bytes = token_bytes
        self._boundary = boundary
        self._stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.done: FinishReason | None = None
        self.matched_stop = ""
        self._content_start = -1  # index of the first non-blank character

    def feed(self, token_id: int) -> str:
        """Returns the text this token completes (possibly empty)."""
        delta = self._decoder.decode(self._token_bytes(token_id))
        if not delta:
            return ""
        search_from = max(0, len(self.text) - max([len(self._boundary)] + [len(s) for s in self._stops]) + 1)
        self.text += delta
        if self._content_start < 0:
            stripped = len(self.text) - len(self.text.lstrip())
            if stripped < len(self.text):
                self._content_start = stripped
        for s in self._stops:
            if self.text.find(s, search_from) >= 0:
                self.done, self.matched_stop = FinishReason.STOP, s
                return delta
        if self._boundary and self._content_start >= 0:
            if self.text.find(self._boundary, max(search_from, self._content_start)) >= 0:
                self.done = FinishReason.STEP_END
        return delta

    def flush(self) -> str:
        """Text held back for an incomplete UTF-8 sequence, at the end of a generation."""
        tail = self._decoder.decode(b"", final=True)
        self.text += tail
        return tail


def boundary_token_ids(vocab: Iterable[tuple[int, bytes]], boundary: str) -> list[int]:
    """Every token whose text contains the boundary: stop ids for engines that match on ids."""
    needle = boundary.encode("utf-8")
    return [tid for tid, piece in vocab if needle and needle in piece]
