"""BatchModel on llama.cpp (through llama-cpp-python's low-level bindings), for CPU
workers and real-model tests.

One context holds `n_seq` sequences (llama.cpp's `n_seq_max`), each with its own
`context_length` tokens of KV cache; the scheduler puts the tokens of every
request in flight into one `llama_batch` and calls `llama_decode` once per
iteration, as llama.cpp's own server does with its slots. The high-level `Llama`
wrapper is not used: it holds one sequence, and its `eval` copies every logits
row into a Python-side array. Here a decode fills the batch's arrays through
numpy views and hands back a view of llama.cpp's own logits buffer.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from services.worker.batch import Batch, BatchModel
from services.worker.types import ChatMessage


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, so `taskset` is honoured)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _u8_ptr(buf: np.ndarray):
    return buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def quiet() -> None:
    """llama.cpp's log lines (model loading, graph reserves) go nowhere: the worker
    logs what matters itself. llama-cpp-python forwards them to stderr unless its
    logger is above INFO."""
    from llama_cpp import _logger

    _logger.set_verbose(False)


class LlamaCppModel(BatchModel):
    backend = "llamacpp"

    def __init__(
        self,
        model_path: str,
        model_id: str | None = None,
        n_ctx: int = 4096,
        n_threads: int = 0,
        n_seq: int = 4,
        n_batch: int = 512,
    ) -> None:
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"model file {model_path} does not exist")
        if n_seq < 1:
            raise ValueError(f"parallel must be >= 1, got {n_seq}")
        quiet()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {model_path}")
        self.threads = n_threads if n_threads > 0 else usable_cores()
        cparams = llama_cpp.llama_context_default_params()
        # Every sequence gets the whole context length: KV cells for n_seq of them.
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = self.threads
        cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        # As llama-cpp-python's Llama does (flash_attn=False): the same logits as the reference.
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if hasattr(cparams, "kv_unified"):
            # One KV stream per sequence: a token attends over its own sequence's
            # cells only, not over every cell of the context.
            cparams.kv_unified = False
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ValueError(f"llama.cpp could not create a context of {n_ctx} x {n_seq} tokens for {model_path}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.model_id = model_id or Path(model_path).stem
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        per_seq = int(llama_cpp.llama_n_ctx(self._ctx)) // n_seq
        self.context_length = min(n_ctx, per_seq)
        self.n_seq = n_seq
        self.n_batch = n_batch

        # The batch's arrays are ours (numpy), allocated once: a decode fills them
        # with vectorised assignments. Each entry's seq_id pointer is aimed at one
        # element of one array, so a batch's sequence ids are one assignment too.
        self._tokens = np.zeros(n_batch, dtype=np.int32)
        self._pos = np.zeros(n_batch, dtype=np.int32)
        self._nseq = np.ones(n_batch, dtype=np.int32)
        self._seq_ids = np.zeros(n_batch, dtype=np.int32)
        self._want = np.zeros(n_batch, dtype=np.int8)
        seq_t = ctypes.POINTER(llama_cpp.llama_seq_id)
        base = self._seq_ids.ctypes.data
        self._seq_ptrs = (seq_t * n_batch)(*(ctypes.cast(base + 4 * i, seq_t) for i in range(n_batch)))
        self._batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._tokens.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token)),
            embd=None,
            pos=self._pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos)),
            n_seq_id=self._nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(seq_t)),
            logits=self._want.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

        self.bos_token_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        eog = {t for t in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        eog |= {int(llama_cpp.llama_vocab_eos(self._vocab)), int(llama_cpp.llama_vocab_eot(self._vocab))}
        self.eos_token_ids = tuple(sorted(t for t in eog if 0 <= t < self.vocab_size))

        self._pieces: list[bytes | None] = [None] * self.vocab_size
        if self._single_token("<think>") is not None and self._single_token("</think>") is not None:
            self.think_start, self.think_end = "<think>", "</think>"
        template = llama_cpp.llama_model_chat_template(self._model, None)
        self._template = template.decode("utf-8") if template else None
        self._formatters: dict[bool, Jinja2ChatFormatter] = {}
        self._closed = False

    def describe(self) -> str:
        return f"threads={self.threads} batch_threads={self.threads} " + super().describe()

    # ---- BatchModel ----------------------------------------------------------------------
    def decode(self, batch: Batch) -> np.ndarray:
        n = len(batch)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a batch holds 1 to {self.n_batch} tokens, got {n}")
        self._tokens[:n] = batch.tokens
        self._pos[:n] = batch.positions
        self._seq_ids[:n] = batch.seqs
        self._want[:n] = batch.wants
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc != 0:
            # 1: no room in the KV cache for the batch; negative: an invalid batch.
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {n} tokens")
        rows = sum(batch.wants)
        if rows == 0:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows, self.vocab_size))

    def keep(self, seq: int, n: int) -> int:
        if llama_cpp.llama_memory_seq_rm(self._mem, seq, n, -1):
            return n
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        return 0

    def save(self, seq: int) -> np.ndarray | None:
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, seq))
        if size <= 0:
            return None
        buf = np.empty(size, dtype=np.uint8)
        written = int(llama_cpp.llama_state_seq_get_data(self._ctx, _u8_ptr(buf), size, seq))
        return buf[:written] if written > 0 else None

    def load(self, seq: int, state: np.ndarray) -> bool:
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        if llama_cpp.llama_state_seq_set_data(self._ctx, _u8_ptr(state), state.size, seq) > 0:
            return True
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        return False

    # ---- vocabulary -------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        piece = self._pieces[token_id]
        if piece is None:
            buf = ctypes.create_string_buffer(256)
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

    # ---- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)
