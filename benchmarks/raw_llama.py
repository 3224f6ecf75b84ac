"""llama.cpp without the worker: the yardsticks `make bench-worker` compares with.

`single` is llama-cpp-python's own loop (`Llama.eval([token])` per token, greedy),
as a user of the library would write it. `batched` puts N sequences in one
context (n_seq_max = N) and decodes one token of each in one `llama_decode` per
iteration through the low-level bindings, with the least Python around it that
still reads each sequence's logits row: the most a batching worker can reach.
Neither shares code with the worker.
"""
from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp import _logger

_logger.set_verbose(False)


@dataclass
class Run:
    tokens: int  # generated, over all sequences
    seconds: float  # decode time (prefill excluded)

    @property
    def ms_per_token(self) -> float:
        return self.seconds * 1e3 / self.tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class Single:
    def __init__(self, path: str, threads: int, n_ctx: int = 4096) -> None:
        self.llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))))

    def run(self, prompt: list[int], n: int) -> Run:
        self.llm.reset()
        self.llm.eval(prompt)
        token = self._argmax()
        t0 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([token])
            token = self._argmax()
        return Run(n - 1, time.perf_counter() - t0)

    def close(self) -> None:
        self.llm.close()


class Batched:
    def __init__(self, path: str, threads: int, n_seq: int, n_ctx_per_seq: int = 1024) -> None:
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
        p = llama_cpp.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx_per_seq * n_seq, 512, 512, n_seq
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama-cpp-python's Llama
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_seq = n_seq
        self.batch = llama_cpp.llama_batch_init(512, 0, n_seq)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for i, (tok, seq, pos, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        if llama_cpp.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def run(self, prompts: list[list[int]], n: int) -> Run:
        """Prefill one prompt per sequence, then n greedy tokens each, all sequences per decode."""
        assert len(prompts) == self.n_seq
        llama_cpp.llama_memory_clear(self.mem, True)
        tokens, pos = [], []
        for s, p in enumerate(prompts):
            self._decode([(t, s, i, i == len(p) - 1) for i, t in enumerate(p)])
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            tokens.append(int(np.argmax(row)))
            pos.append(len(p))
        t0 = time.perf_counter()
        for _ in range(n - 1):
            self._decode([(tokens[s], s, pos[s], True) for s in range(self.n_seq)])
            rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(self.n_seq, self.n_vocab))
            tokens = [int(np.argmax(r)) for r in rows]
            pos = [x + 1 for x in pos]
        return Run((n - 1) * self.n_seq, time.perf_counter() - t0)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)
