"""The system an evaluation runs against: an existing router, or one started here.

A started stack is a private `redis-server` on a free port (or --redis-url), one
worker per model and a router, all child processes stopped on exit. Knowing the
workers' addresses lets the run measure what only they can tell: per-token decode
speed (calibration), their Prometheus counters around each problem (prefill
tokens, glimpse time) and the step-level analysis.

Layouts (StackOptions.layout): where the two workers run.
  default  both workers on every core this process may use (llama.cpp --threads 0
           by default): they compete for the cores whenever both work at once, as
           eager catch-up makes them.
  pinned   the small worker on the first CPU of os.sched_getaffinity(0), the large
           on the second (`taskset -c`), one llama.cpp thread each: two separate
           nodes of one core. Only the workers are pinned: the router, Redis and the
           client are not, and share both cores with them.
  sim      `--backend sim` workers with no model: per-token decode and per-prefill-
           token latencies (sleeps) modelled on a GPU pair (SimPair below says which
           figures and where they come from), and a scripted chain of thought whose
           hard steps (high first-token entropy) come at a chosen rate.
"""
from __future__ import annotations

import os
import shlex
import shutil
import urllib.request
import uuid
from dataclasses import dataclass, field

from services.common import procs, redis_local
from services.worker import models


LAYOUTS = ("default", "pinned", "sim")


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class SimModelSpeed:
    token_latency_s: float  # one decode step (batch 1)
    prefill_latency_s: float  # per prompt token


# The paper's own pair, Qwen3-4B (small) and Qwen3-32B (large), each on one GPU, from
# Qwen's published speed benchmark for Qwen3 (qwen.readthedocs.io, "Speed Benchmark";
# docs/source/getting_started/speed_benchmark.md of the QwenLM repositories): SGLang
# 0.4.6.post1 on one NVIDIA H20 96GB, BF16, batch size 1, 2048 tokens generated after
# an input of 1 or 6144 tokens, speed = (input + generated tokens) / time:
#   Qwen3-4B:  133.13 tokens/s (input 1), 466.19 (input 6144)
#   Qwen3-32B:  20.72 tokens/s (input 1),  77.82 (input 6144)
# Decode per token = time(input 1) / 2048 = 2049 / 133.13 / 2048 (4B: 7.5 ms; 32B: 48.3 ms).
# Prefill per token = (time(6144) - time(1)) / 6143 (4B: 0.355 ms; 32B: 1.04 ms): an upper
# bound, as it also holds the slower decode over a 6k-token context. (The paper ran vLLM
# on A100-80GB; no batch-1 figures per token are published for that setting.)
QWEN3_4B_H20 = SimModelSpeed(token_latency_s=2049 / 133.13 / 2048,
                             prefill_latency_s=(8192 / 466.19 - 2049 / 133.13) / 6143)
QWEN3_32B_H20 = SimModelSpeed(token_latency_s=2049 / 20.72 / 2048,
                              prefill_latency_s=(8192 / 77.82 - 2049 / 20.72) / 6143)


# The sim layout's model ids: what the sim workers report and results record.
SIM_MODELS = {"small": "sim-qwen3-4b-h20", "large": "sim-qwen3-32b-h20"}


@dataclass(frozen=True)
class SimPair:
    """The sim layout's two workers: speeds, and one script both follow (same seed)."""

    small: SimModelSpeed = QWEN3_4B_H20
    large: SimModelSpeed = QWEN3_32B_H20
    step_tokens: int = 32  # tokens per step (the "\n\n" included)
    steps: int = 10  # steps before the </think> step
    # Each step is hard (first-token entropy ~3 nats, above any tau we use) with this
    # probability, drawn from (seed, step): the script is the same for every problem.
    # Seed 8 makes steps 1, 3, 4 and 8 hard: 4 of the 11 steps (the </think> step is
    # easy) go to the large model under glimpse, 36%, as on the real pair (25-50%).
    hard_fraction: float = 0.3
    seed: int = 8

    def worker_args(self, role: str) -> list[str]:
        speed = self.small if role == "small" else self.large
        return ["--sim-token-latency-s", f"{speed.token_latency_s:.6g}",
                "--sim-prefill-latency-s", f"{speed.prefill_latency_s:.6g}",
                "--sim-step-tokens", str(self.step_tokens), "--sim-steps", str(self.steps),
                "--sim-hard-fraction", f"{self.hard_fraction:g}", "--sim-seed", str(self.seed)]


@dataclass
class StackOptions:
    small: str = "qwen2.5-coder-0.5b"
    large: str = "qwen2.5-coder-1.5b"
    backend: str = "llamacpp"
    threads: int = 0
    context_length: int = 4096
    redis_url: str = ""  # empty: a private redis-server
    small_args: str = ""  # extra worker flags, e.g. sim knobs
    large_args: str = ""
    echo: bool = False
    layout: str = "default"  # one of LAYOUTS (see the module's docstring)
    sim: SimPair = field(default_factory=SimPair)  # the sim layout's workers


@dataclass
class Stack:
    router: str  # host:port
    workers: dict[str, str] = field(default_factory=dict)  # role -> host:port (may be empty)
    metrics: dict[str, str] = field(default_factory=dict)  # role -> http://.../metrics
    models: dict[str, str] = field(default_factory=dict)  # role -> model id (as configured)
    _services: list[procs.Service] = field(default_factory=list)
    _redis: redis_local.PrivateRedis | None = None

    def close(self) -> None:
        for svc in reversed(self._services):
            svc.stop()
        self._services.clear()
        if self._redis is not None:
            self._redis.stop()
            self._redis = None

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _private_redis(stack: Stack) -> str:
    try:
        stack._redis = redis_local.start_private()
    except RuntimeError as exc:
        raise StackError(f"{exc}; or give --redis-url") from None
    return stack._redis.url


def pinned_cpus() -> tuple[int, int]:
    """The two CPUs the pinned layout puts the small and the large worker on: the first
    two this process may run on."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise StackError(f"the pinned layout needs 2 CPUs, one per worker; this process may use only {cpus}")
    return cpus[0], cpus[1]


def _worker_command(role: str, model: str, opts: StackOptions) -> tuple[list[str], list[str]]:
    """The worker's command prefix (pinning) and its `python -m` arguments, per layout."""
    if opts.layout not in LAYOUTS:
        raise StackError(f"unknown layout {opts.layout!r}; choose from {', '.join(LAYOUTS)}")
    extra = shlex.split(opts.small_args if role == "small" else opts.large_args)
    prefix: list[str] = []
    threads = opts.threads
    if opts.layout == "pinned":
        if shutil.which("taskset") is None:
            raise StackError("the pinned layout runs the workers under `taskset` (util-linux), which is not on PATH")
        prefix = ["taskset", "-c", str(pinned_cpus()[0 if role == "small" else 1])]
        threads = 1
    if opts.layout == "sim" or opts.backend == "sim":
        sim = opts.sim.worker_args(role) if opts.layout == "sim" else []
        return prefix, ["services.worker", "--backend", "sim", "--model", "sim", "--model-id", model or f"sim-{role}",
                        "--port", "0", *sim, *extra]
    try:
        path = models.resolve(model)
    except models.ModelError as exc:
        raise StackError(str(exc)) from None
    return prefix, ["services.worker", "--backend", opts.backend, "--model", str(path), "--model-id", model,
                    "--port", "0", "--threads", str(threads), "--context-length", str(opts.context_length), *extra]


CPU_CATCH_UP_TOKENS = 4


def router_args(opts: StackOptions) -> list[str]:
    """The router's flags beyond the stack's wiring. On CPU workers (llama.cpp) a prefill
    is slow, and a switch waits for the catch-up chunk in flight on the other worker:
    chunks of 4 tokens rather than the router's default 16, which suits GPU workers
    (measured in docs/benchmarks.md, "End to end": pinned layout)."""
    if opts.layout == "sim" or opts.backend in ("sim", "trtllm"):
        return []
    return ["--catch-up-tokens", str(CPU_CATCH_UP_TOKENS)]


def start(opts: StackOptions) -> Stack:
    # Checked before anything starts: a layout this machine cannot run fails at once.
    commands = {role: _worker_command(role, model, opts) for role, model in (("small", opts.small), ("large", opts.large))}
    stack = Stack(router="")
    try:
        url = opts.redis_url or _private_redis(stack)
        for role, model in (("small", opts.small), ("large", opts.large)):
            prefix, args = commands[role]
            svc = procs.start(f"{role}-worker", args, timeout=300, echo=opts.echo, prefix=prefix)
            stack._services.append(svc)
            stack.workers[role] = svc.address
            stack.models[role] = model
            mport = svc.ready_fields.get("metrics_port")
            if mport and mport not in ("0", "-1"):
                stack.metrics[role] = f"http://127.0.0.1:{mport}/metrics"
        router = procs.start(
            "router",
            ["services.router", "--port", "0", "--small", stack.workers["small"], "--large", stack.workers["large"],
             "--redis-url", url, "--key-prefix", f"eval-{uuid.uuid4().hex[:8]}:", "--request-timeout-s", "3600",
             *router_args(opts)],
            timeout=120, echo=opts.echo,
        )
        stack._services.append(router)
        stack.router = router.address
        return stack
    except BaseException:
        stack.close()
        raise


# ---- worker counters -------------------------------------------------------------------
def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A worker's Prometheus samples: (metric name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        pairs = []
        for item in labels.rstrip("}").split(","):
            if "=" in item:
                k, _, v = item.partition("=")
                pairs.append((k.strip(), v.strip().strip('"')))
        try:
            out[(name, tuple(sorted(pairs)))] = float(value)
        except ValueError:
            continue
    return out


def usage_delta(before: dict, after: dict) -> dict[str, float]:
    """What one worker did between two scrapes: prompt tokens prefilled and reused by
    its calls, prompt tokens prefilled ahead by eager catch-up (Extend: caught_up),
    tokens generated, and seconds spent per call method."""
    def total(name: str, **match: str) -> float:
        s = 0.0
        for (n, labels), v in after.items():
            if n == name and all(dict(labels).get(k) == val for k, val in match.items()):
                s += v - before.get((n, labels), 0.0)
        return s

    out = {
        "prefilled": total("glimprouter_worker_prompt_tokens_total", kind="prefilled"),
        "cached": total("glimprouter_worker_prompt_tokens_total", kind="cached"),
        "caught_up": total("glimprouter_worker_prompt_tokens_total", kind="caught_up"),
        "generated": total("glimprouter_worker_generated_tokens_total"),
    }
    for method in ("Glimpse", "Step", "StepStream", "Generate", "GenerateStream", "Tokenize", "RenderPrompt", "Extend"):
        out[f"{method}_s"] = total("glimprouter_worker_request_duration_seconds_sum", method=method)
        out[f"{method}_calls"] = total("glimprouter_worker_request_duration_seconds_count", method=method)
    return out
