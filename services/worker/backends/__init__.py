"""Backends by name. Each is imported only when chosen, so a CPU machine never
imports tensorrt_llm and a GPU image need not load llama.cpp."""
from __future__ import annotations

import os
import pathlib

from services.worker.config import WorkerSettings
from services.worker.engine import Engine

BACKENDS = ("llamacpp", "trtllm", "sim")


def create_engine(s: WorkerSettings) -> Engine:
    if s.backend == "llamacpp":
        from services.worker import models
        from services.worker.backends.llamacpp import LlamaCppModel
        from services.worker.scheduler import Scheduler

        path = models.resolve(s.model)
        model_id = s.model_id or (s.model if os.path.sep not in s.model else pathlib.Path(s.model).stem)
        model = LlamaCppModel(
            str(path), model_id=model_id, n_ctx=s.context_length, n_threads=s.threads, n_seq=s.parallel, n_batch=s.batch_size
        )
        return Scheduler(model, kv_cache_bytes=s.kv_cache_bytes, kv_reuse=s.kv_reuse, prefill_chunk=s.prefill_chunk)
    if s.backend == "sim":
        from services.worker.backends.sim import SimModel
        from services.worker.scheduler import Scheduler

        hard = {int(x) for x in s.sim_hard_steps.split(",") if x.strip()}
        model = SimModel(
            model_id=s.model_id or "sim",
            seed=s.sim_seed,
            token_latency_s=s.sim_token_latency_s,
            prefill_latency_per_token_s=s.sim_prefill_latency_s,
            step_tokens=s.sim_step_tokens,
            steps=s.sim_steps,
            hard_steps=hard,
            hard_fraction=s.sim_hard_fraction,
            # --context-length bounds the sim too, so prompt-length limits can be tested without a model.
            context_length=s.context_length,
            n_seq=s.parallel,
            n_batch=s.batch_size,
        )
        return Scheduler(model, kv_cache_bytes=s.kv_cache_bytes, kv_reuse=s.kv_reuse, prefill_chunk=s.prefill_chunk)
    if s.backend == "trtllm":
        from services.worker.backends.trtllm import TrtLlmEngine

        return TrtLlmEngine(
            s.model,
            model_id=s.model_id or None,
            exact_entropy=s.trtllm_exact_entropy,
            kv_free_fraction=s.trtllm_kv_free_fraction,
            max_seq_len=s.trtllm_max_seq_len or None,
            max_batch_size=s.trtllm_max_batch_size or None,
            max_num_tokens=s.trtllm_max_num_tokens or None,
            chunked_prefill=s.trtllm_chunked_prefill,
            tensor_parallel_size=s.trtllm_tensor_parallel_size,
        )
    raise ValueError(f"unknown backend {s.backend!r} (choose from {', '.join(BACKENDS)})")
