"""What a logits-level backend provides to the scheduler: one context holding
several sequences, evaluated one batch at a time (llama.cpp's `llama_decode`
over a `llama_batch`; the simulator's scripted logits).

The scheduler (scheduler.py) owns the context: it decides which sequence serves
which request, which tokens go into each batch and what each sequence holds. A
backend only evaluates batches, cuts or clears a sequence, saves and restores a
sequence's state, and knows its vocabulary. It is used from the scheduler's
thread only, except for the vocabulary calls (tokenize, token_bytes, chat
template), which must be safe from any thread.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from services.worker.types import ChatMessage
from services.worker.vocab import tokenizer_fingerprint


@dataclass
class Batch:
    """Tokens to evaluate in one pass; entry i puts `tokens[i]` at position
    `positions[i]` of sequence `seqs[i]`. Logits are produced for the entries
    whose `wants[i]` is set, in batch order."""

    tokens: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    wants: list[bool] = field(default_factory=list)

    def add(self, token: int, seq: int, pos: int, want: bool) -> None:
        self.tokens.append(token)
        self.seqs.append(seq)
        self.positions.append(pos)
        self.wants.append(want)

    def __len__(self) -> int:
        return len(self.tokens)


class BatchModel(abc.ABC):
    model_id: str
    backend: str
    vocab_size: int
    context_length: int  # tokens one sequence may hold
    n_seq: int  # sequences the context holds: requests decoded together (--parallel)
    n_batch: int  # tokens one decode() may carry
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    think_start: str = ""
    think_end: str = ""

    @abc.abstractmethod
    def decode(self, batch: Batch) -> np.ndarray:
        """Evaluate the batch. Returns float32 logits, one row per wanted entry in batch
        order; the array may be a view of the backend's buffer, valid until the next call."""

    @abc.abstractmethod
    def keep(self, seq: int, n: int) -> int:
        """Drop positions >= n of `seq`; returns how many it kept (0 when the cache
        cannot be cut there, e.g. sliding-window attention: then it is cleared)."""

    @abc.abstractmethod
    def save(self, seq: int) -> np.ndarray | None:
        """`seq`'s state as bytes (uint8), or None when it cannot be saved."""

    @abc.abstractmethod
    def load(self, seq: int, state: np.ndarray) -> bool:
        """Replace `seq`'s state by a saved one; False leaves it empty."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token decodes to (special tokens: their text)."""

    @abc.abstractmethod
    def tokenize(self, text: str, add_bos: bool) -> list[int]: ...

    @abc.abstractmethod
    def chat_template_text(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str | None:
        """The chat template applied to messages, or None when the model has none."""

    def describe(self) -> str:
        return f"parallel={self.n_seq} batch={self.n_batch} context={self.context_length}"

    def close(self) -> None: ...

    def tokenizer_fingerprint(self) -> str:
        pieces = (self.token_bytes(t) for t in range(self.vocab_size))
        return tokenizer_fingerprint(pieces, self.eos_token_ids, self.bos_token_id)
