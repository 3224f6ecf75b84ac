"""The system an evaluation runs against: an existing router, or one started here.

A started stack is a private `redis-server` on a free port (or --redis-url), one
worker per model and a router, all child processes stopped on exit. Knowing the
workers' addresses lets the run measure what only they can tell: per-token decode
speed (calibration), their Prometheus counters around each problem (prefill
tokens, glimpse time) and the step-level analysis.
"""
from __future__ import annotations

import shlex
import urllib.request
import uuid
from dataclasses import dataclass, field

from services.common import procs, redis_local
from services.worker import models


class StackError(RuntimeError):
    pass


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


def _worker_args(role: str, model: str, opts: StackOptions) -> list[str]:
    extra = shlex.split(opts.small_args if role == "small" else opts.large_args)
    if opts.backend == "sim":
        return ["services.worker", "--backend", "sim", "--model", "sim", "--model-id", model or f"sim-{role}",
                "--port", "0", *extra]
    try:
        path = models.resolve(model)
    except models.ModelError as exc:
        raise StackError(str(exc)) from None
    return ["services.worker", "--backend", opts.backend, "--model", str(path), "--model-id", model, "--port", "0",
            "--threads", str(opts.threads), "--context-length", str(opts.context_length), *extra]


def start(opts: StackOptions) -> Stack:
    stack = Stack(router="")
    try:
        url = opts.redis_url or _private_redis(stack)
        for role, model in (("small", opts.small), ("large", opts.large)):
            svc = procs.start(f"{role}-worker", _worker_args(role, model, opts), timeout=300, echo=opts.echo)
            stack._services.append(svc)
            stack.workers[role] = svc.address
            stack.models[role] = model
            mport = svc.ready_fields.get("metrics_port")
            if mport and mport not in ("0", "-1"):
                stack.metrics[role] = f"http://127.0.0.1:{mport}/metrics"
        router = procs.start(
            "router",
            ["services.router", "--port", "0", "--small", stack.workers["small"], "--large", stack.workers["large"],
             "--redis-url", url, "--key-prefix", f"eval-{uuid.uuid4().hex[:8]}:", "--request-timeout-s", "3600"],
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
