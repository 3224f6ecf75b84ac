"""One request's generation, one token at a time: sampling, step cutting, stop
rules. Shared by every logits-level backend through the scheduler, which feeds
each request the logits row of its sequence after every batch."""
from __future__ import annotations

import numpy as np

from services.worker import entropy as ent
from services.worker.sampling import sample
from services.worker.stepcut import StepCutter
from services.worker.types import Chunk, FinishReason, GenerateRequest
from typing import Callable


class Decoding:
    def __init__(self, req: GenerateRequest, token_bytes: Callable[[int], bytes], eos_ids, room: int) -> None:
        self.req = req
        self.rng = np.random.default_rng(req.sampling.seed)
        self.cutter = StepCutter(token_bytes, req.stop.step_boundary, req.stop.stop)
        self.eos = frozenset(eos_ids) if req.stop.stop_on_eos else frozenset()
        self.room = room  # tokens that still fit in the context after the prompt
        self.produced: list[int] = []
        self.entropies: list[float] = []
        self.finish: FinishReason | None = None

    def take(self, logits: np.ndarray) -> Chunk:
        """Sample the next token from `logits`; its chunk. Sets `finish` when this token ends it."""
        token = sample(logits, self.req.sampling, self.rng)
        self.produced.append(token)
        h: list[float] = []
        if self.req.return_entropies:
            h = [ent.top_k_entropy(logits[ent.top_k_ids(logits, self.req.top_k)])]
            self.entropies.extend(h)
        if token in self.eos:
            self.finish = FinishReason.EOS
            return Chunk([token], self.cutter.flush(), h)
        text = self.cutter.feed(token)
        if self.cutter.done is not None:
            self.finish = self.cutter.done
            return Chunk([token], text + self.cutter.flush(), h)
        if len(self.produced) >= self.req.sampling.max_tokens:
            self.finish = FinishReason.LENGTH
        elif len(self.produced) >= self.room:
            self.finish = FinishReason.CONTEXT
        return Chunk([token], text, h)

    def stop(self, reason: FinishReason) -> str:
        """End early (cancelled); returns text held back for an incomplete UTF-8 sequence."""
        self.finish = reason
        return self.tail()

    def tail(self) -> str:
        # EOS, a step end and a stop string flushed already with their token.
        if self.finish in (FinishReason.EOS, FinishReason.STEP_END, FinishReason.STOP):
            return ""
        return self.cutter.flush()
