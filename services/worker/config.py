"""Worker settings: every field is a flag (--model) and an env var (GLIMPROUTER_MODEL)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import setting


@dataclass
class WorkerSettings:
    backend: str = setting("llamacpp", "model backend", choices=["llamacpp", "trtllm", "sim"])
    model: str = setting("smollm2-135m", "model id from the manifest (see `make models`) or a path to a model file/dir")
    model_id: str = setting("", "model id reported to routers (default: derived from --model)")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(50061, "gRPC port (0 = pick a free one and print it)")
    metrics_port: int = setting(0, "Prometheus metrics HTTP port (0 = a free one, announced at start; -1 = off)")
    context_length: int = setting(4096, "context window in tokens (llama.cpp n_ctx)")
    threads: int = setting(0, "CPU threads for llama.cpp (0 = every core this process may run on)")
    parallel: int = setting(4, "requests decoded together in one batch (llama.cpp sequences; more wait in a queue)")
    batch_size: int = setting(512, "tokens one batch may carry (llama.cpp n_batch)")
    prefill_chunk: int = setting(128, "prompt tokens a batch takes while other requests decode (a long prompt does not stall them)")
    kv_cache_bytes: int = setting(2 * 1024**3, "bytes of saved per-session KV state kept in memory (llama.cpp)")
    kv_reuse: bool = setting(True, "reuse KV state across requests (off only to measure what reuse saves)")
    max_message_bytes: int = setting(16 * 1024 * 1024, "largest gRPC request accepted")
    shutdown_grace_s: float = setting(30.0, "seconds to finish in-flight calls on SIGTERM")
    # TLS (services/common/tls.py): plaintext unless a certificate is configured.
    tls_cert: str = setting("", "PEM certificate (chain) this worker serves gRPC with; with --tls-key turns TLS on")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = setting("", "PEM CA bundle: when set, callers must present a client certificate it signed (mutual TLS)")
    # Simulator knobs (backend=sim only: load tests of the router, never a default).
    sim_seed: int = setting(0, "sim: seed of the scripted token streams")
    sim_token_latency_s: float = setting(0.0, "sim: seconds per decoded token")
    sim_prefill_latency_s: float = setting(0.0, "sim: seconds per prefilled token")
    sim_step_tokens: int = setting(8, "sim: tokens per step")
    sim_steps: int = setting(6, "sim: steps before </think>")
    sim_hard_steps: str = setting("", "sim: comma-separated step indices with high first-token entropy")
    sim_hard_fraction: float = setting(0.0, "sim: probability that a step is hard (seeded)")
    # TensorRT-LLM knobs (backend=trtllm only).
    trtllm_exact_entropy: bool = setting(
        False, "trtllm: gather generation logits for full-vocabulary entropy (GPU: ~max batch x vocab x 4 bytes)"
    )
    trtllm_kv_free_fraction: float = setting(0.85, "trtllm: share of free GPU memory for the KV cache")
    trtllm_tensor_parallel_size: int = setting(1, "trtllm: GPUs one model is split over (tensor parallelism)")
    trtllm_max_seq_len: int = setting(0, "trtllm: max sequence length (0 = the model's own; --context-length is llama.cpp's)")
    trtllm_chunked_prefill: bool = setting(
        True, "trtllm: prefill long prompts in chunks; off, no prompt may exceed --trtllm-max-num-tokens"
    )
    trtllm_max_num_tokens: int = setting(0, "trtllm: most tokens in one forward pass (0 = TensorRT-LLM's 8192)")
    trtllm_max_batch_size: int = setting(
        0, "trtllm: most requests batched at once (0 = TensorRT-LLM's 2048); exact-entropy buffers grow with it"
    )
