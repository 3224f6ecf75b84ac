"""TokenModel on llama.cpp (llama-cpp-python), for CPU workers and real-model tests.

One llama.cpp context holds one sequence. Interleaved sessions (the router talks
to many problems at once) would each re-prefill their whole prefix, so the
sequence's KV state is snapshotted per session into an LRU bounded in bytes and
restored when that session comes back. The low-level per-sequence state calls
are used because `Llama.save_state` also copies the n_batch x vocab logits array
and is two orders of magnitude slower.
"""
from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.worker.logits_engine import Prefill, TokenModel
from services.worker.types import ChatMessage

_SEQ = 0  # the only sequence the wrapper's eval() ever writes


@dataclass
class Stats:
    """Counters the tests (and metrics) read instead of timing."""

    evaluated_tokens: int = 0
    snapshots: int = 0
    restores: int = 0
    evictions: int = 0


@dataclass
class _Snapshot:
    tokens: np.ndarray  # the token ids whose KV the snapshot holds, positions 0..n-1
    data: np.ndarray  # uint8 blob from llama_state_seq_get_data

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.tokens.nbytes


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _u8_ptr(buf: np.ndarray):
    return buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


class LlamaCppModel(TokenModel):
    backend = "llamacpp"

    def __init__(
        self,
        model_path: str,
        model_id: str | None = None,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        kv_cache_bytes: int = 2 * 1024**3,
        n_batch: int = 512,
        kv_reuse: bool = True,
    ) -> None:
        self._llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=False,
            verbose=False,
        )
        self._ctx = self._llm.ctx
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.model_id = model_id or Path(model_path).stem
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        # The wrapper sizes input_ids by the requested n_ctx, so never claim more.
        self.context_length = min(n_ctx, self._llm.n_ctx())
        self.kv_cache_bytes = kv_cache_bytes
        # Off only to measure what reuse saves (make bench-worker): every prefill starts empty.
        self.kv_reuse = kv_reuse
        self._last_logits: np.ndarray | None = None
        self._last_logits_at = -1  # context length the stored logits belong to
        self.stats = Stats()

        self.bos_token_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        eog = {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        eog |= {int(llama_cpp.llama_vocab_eos(self._vocab)), int(llama_cpp.llama_vocab_eot(self._vocab))}
        self.eos_token_ids = tuple(sorted(t for t in eog if 0 <= t < self.vocab_size))

        self._pieces: list[bytes | None] = [None] * self.vocab_size
        self._piece_buf = ctypes.create_string_buffer(256)
        if self._single_token("<think>") is not None and self._single_token("</think>") is not None:
            self.think_start, self.think_end = "<think>", "</think>"

        self._template = self._llm.metadata.get("tokenizer.chat_template")
        self._formatters: dict[bool, Jinja2ChatFormatter] = {}

        self._snaps: OrderedDict[str, _Snapshot] = OrderedDict()
        self._snap_bytes = 0
        self._owner: str | None = None  # the session whose state the context holds
        self._closed = False

    # ---- context ------------------------------------------------------------------
    @property
    def cached_bytes(self) -> int:
        """Bytes held by the per-session KV snapshots (bounded by kv_cache_bytes)."""
        return self._snap_bytes

    @property
    def context_tokens(self) -> np.ndarray:
        return self._llm.input_ids[: self._llm.n_tokens]

    def prefill(self, session_id: str, tokens: Sequence[int]) -> Prefill:
        want = np.asarray(tokens, dtype=np.intc)
        n = len(want)
        if n == 0:
            raise ValueError("prefill needs at least one token")
        if n > self.context_length:
            raise ValueError(f"prompt of {n} tokens exceeds the context of {self.context_length} tokens")
        if want.min() < 0 or want.max() >= self.vocab_size:
            raise ValueError(f"prompt has token ids outside the vocabulary of {self.vocab_size}")

        current = self.context_tokens
        reuse = _common_prefix(current, want) if self.kv_reuse else 0
        if reuse == n == len(current) and self._last_logits_at == n:
            # The context ends exactly at this prompt and still has its logits
            # (Generate right after a Glimpse of the same prompt): nothing to evaluate.
            return Prefill(self._last_logits, n)
        snap = self._snaps.get(session_id) if session_id and self.kv_reuse else None
        snap_reuse = _common_prefix(snap.tokens, want) if snap is not None else -1
        restoring = snap_reuse > reuse
        truncating = restoring or reuse < len(current)

        # Save the owner's work before it leaves the context: always when another
        # session takes over, and when an anonymous request would overwrite it.
        if self.kv_reuse and self._owner is not None and self._owner != session_id and (session_id or truncating):
            self._snapshot(self._owner)

        if restoring:
            reuse = snap_reuse if self._restore(session_id, snap) else 0
        if session_id:
            self._owner = session_id
        elif truncating:
            self._owner = None

        # Logits exist only for the last evaluated position, so a fully cached
        # prompt still re-evaluates its last token.
        reuse = min(reuse, n - 1)
        self._trim(reuse)
        reuse = self._llm.n_tokens
        self._eval(want[reuse:].tolist())
        return Prefill(self._logits(), reuse)

    def decode(self, token_id: int) -> np.ndarray:
        if self._llm.n_tokens >= self.context_length:
            raise ValueError(f"context of {self.context_length} tokens is full")
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        self._eval([int(token_id)])
        return self._logits()

    def _eval(self, tokens: list[int]) -> None:
        self._llm.eval(tokens)
        self.stats.evaluated_tokens += len(tokens)

    def _logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        self._last_logits = np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).astype(np.float32, copy=True)
        self._last_logits_at = self._llm.n_tokens
        return self._last_logits

    def _trim(self, keep: int) -> None:
        """Drop KV positions >= keep; models whose cache cannot be cut partially
        (sliding-window attention) start over from an empty context."""
        if keep < self._llm.n_tokens:
            self._last_logits_at = -1
        if not llama_cpp.llama_memory_seq_rm(self._mem, _SEQ, keep, -1):
            llama_cpp.llama_memory_seq_rm(self._mem, _SEQ, -1, -1)
            keep = 0
        self._llm.n_tokens = keep

    # ---- per-session KV snapshots ------------------------------------------------------
    def _snapshot(self, session_id: str) -> None:
        tokens = self.context_tokens
        old = self._snaps.get(session_id)
        if old is not None and np.array_equal(old.tokens, tokens):
            self._snaps.move_to_end(session_id)
            return  # unchanged since its last snapshot
        self._drop(session_id)
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, _SEQ))
        if len(tokens) == 0 or size + tokens.nbytes > self.kv_cache_bytes:
            return
        data = np.empty(size, dtype=np.uint8)
        written = int(llama_cpp.llama_state_seq_get_data(self._ctx, _u8_ptr(data), size, _SEQ))
        if written == 0:
            return
        snap = _Snapshot(tokens.copy(), data[:written])
        self._snaps[session_id] = snap
        self._snap_bytes += snap.nbytes
        self.stats.snapshots += 1
        while self._snap_bytes > self.kv_cache_bytes:
            victim = next(iter(self._snaps))
            self._drop(victim)
            self.stats.evictions += 1

    def _restore(self, session_id: str, snap: _Snapshot) -> bool:
        self._last_logits_at = -1  # the stored logits belong to the context being replaced
        llama_cpp.llama_memory_seq_rm(self._mem, _SEQ, -1, -1)
        ok = llama_cpp.llama_state_seq_set_data(self._ctx, _u8_ptr(snap.data), snap.data.size, _SEQ) > 0
        if not ok:
            # A failed restore leaves the sequence in an unknown state: start empty.
            llama_cpp.llama_memory_seq_rm(self._mem, _SEQ, -1, -1)
            self._llm.n_tokens = 0
            self._drop(session_id)
            return False
        n = len(snap.tokens)
        self._llm.input_ids[:n] = snap.tokens
        self._llm.n_tokens = n
        self._snaps.move_to_end(session_id)
        self.stats.restores += 1
        return True

    def _drop(self, session_id: str) -> None:
        snap = self._snaps.pop(session_id, None)
        if snap is not None:
            self._snap_bytes -= snap.nbytes

    # ---- vocabulary -------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        piece = self._pieces[token_id]
        if piece is None:
            buf = self._piece_buf
            # special=True so control tokens render as their text (<|im_end|>).
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, len(buf), 0, True)
            piece = buf.raw[:n]
            self._pieces[token_id] = piece
        return piece

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (llama_cpp.llama_token * cap)()
        # add_special=False: BOS is added below under our own rule, and llama.cpp
        # would also append EOS for models that ask for it.
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, False, True)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, False, True)
            if n < 0:
                raise RuntimeError(f"tokenization failed ({n}) for {len(raw)} bytes")
        ids = list(buf[:n])
        # Chat templates often emit the BOS text themselves: never double it.
        if add_bos and self._add_bos and self.bos_token_id >= 0 and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def _single_token(self, text: str) -> int | None:
        ids = self.tokenize(text, add_bos=False)
        return ids[0] if len(ids) == 1 and self.token_bytes(ids[0]) == text.encode() else None

    def chat_template_text(self, messages: Sequence[ChatMessage], add_generation_prompt: bool) -> str | None:
        if not self._template:
            return None
        fmt = self._formatters.get(add_generation_prompt)
        if fmt is None:
            fmt = Jinja2ChatFormatter(
                template=self._template,
                eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)),
                bos_token=self._special_text(self.bos_token_id),
                add_generation_prompt=add_generation_prompt,
            )
            self._formatters[add_generation_prompt] = fmt
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        return fmt(messages=msgs).prompt

    def _special_text(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            return ""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # ---- lifecycle ----------------------------------------------------------------------
    def warmup(self) -> None:
        # Anonymous, so no session snapshot is left behind.
        self.prefill("", self.tokenize("Hello", add_bos=True))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._snaps.clear()
        self._snap_bytes = 0
        self._owner = None
        self._llm.close()
