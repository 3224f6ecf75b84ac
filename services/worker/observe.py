"""Worker metrics (Prometheus) and span attributes (OpenTelemetry gen_ai.* names
where they fit). The servicer calls `record` once per call with its response."""
from __future__ import annotations

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from glimprouter.v1 import worker_pb2 as pb

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("glimprouter_worker_requests_total", "Worker calls by method and gRPC code", ["model", "method", "code"])
DURATION = Histogram("glimprouter_worker_request_duration_seconds", "Worker call time", ["model", "method"], buckets=_LATENCY_BUCKETS)
QUEUE = Histogram("glimprouter_worker_queue_seconds", "Time a call waited for the model", ["model"], buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter(
    "glimprouter_worker_prompt_tokens_total",
    "Prompt tokens by whether their KV state was reused (prefilled, cached), and tokens prefilled ahead for catch-up (Extend: caught_up)",
    ["model", "kind"],
)
GENERATED = Counter("glimprouter_worker_generated_tokens_total", "Tokens generated", ["model", "method"])
DECISIONS = Counter("glimprouter_worker_step_decisions_total", "Fused Step outcomes", ["model", "decision"])
READY = Gauge("glimprouter_worker_ready", "1 once the model is loaded and warm", ["model"])

_DECISION = {pb.STEP_DECISION_KEEP: "keep", pb.STEP_DECISION_ESCALATE: "escalate"}


def _usage_and_timings(response) -> tuple[pb.Usage | None, pb.Timings | None]:
    if isinstance(response, pb.StepResponse):
        src = response.generation if response.HasField("generation") else response.glimpse
        return src.usage, src.timings
    if isinstance(response, (pb.GlimpseResponse, pb.GenerateResponse, pb.GenerateChunk, pb.ExtendResponse)):
        return response.usage, response.timings
    return None, None


def record(model: str, method: str, code: str, seconds: float, response=None) -> None:
    REQUESTS.labels(model, method, code).inc()
    DURATION.labels(model, method).observe(seconds)
    usage, timings = _usage_and_timings(response) if response is not None else (None, None)
    span = trace.get_current_span()
    attrs: dict = {"gen_ai.request.model": model, "glimprouter.worker.method": method}
    if usage is not None and timings is not None and method == "Extend":
        PROMPT_TOKENS.labels(model, "caught_up").inc(usage.prefilled_tokens)
    elif usage is not None and timings is not None:
        PROMPT_TOKENS.labels(model, "prefilled").inc(usage.prefilled_tokens)
        PROMPT_TOKENS.labels(model, "cached").inc(usage.cached_tokens)
        GENERATED.labels(model, method).inc(usage.generated_tokens)
        QUEUE.labels(model).observe(timings.queue_ms / 1e3)
        attrs.update(
            {
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.generated_tokens,
                "glimprouter.prefill_tokens": usage.prefilled_tokens,
                "glimprouter.cached_tokens": usage.cached_tokens,
                "glimprouter.queue_ms": timings.queue_ms,
                "glimprouter.prefill_ms": timings.prefill_ms,
                "glimprouter.decode_ms": timings.decode_ms,
            }
        )
    if isinstance(response, (pb.StepResponse, pb.StepChunk)):
        decision = _DECISION.get(response.decision, "unknown")
        DECISIONS.labels(model, decision).inc()
        attrs.update({"glimprouter.decision": decision, "glimprouter.entropy": response.entropy})
    if isinstance(response, pb.GlimpseResponse):
        attrs.update({"glimprouter.entropy_top_k": response.entropy_top_k, "glimprouter.entropy_full": response.entropy_full})
    if span.is_recording():
        span.set_attributes(attrs)

# Work cut short: a call whose caller went away (client cancel, deadline) stops
# decoding at the next token; these say how often, and how many tokens it had made.
CANCELLED = Counter("glimprouter_worker_cancelled_generations_total", "Generations stopped because their call was cancelled", ["model"])
CANCELLED_TOKENS = Counter(
    "glimprouter_worker_cancelled_tokens_total", "Tokens decoded by generations stopped because their call was cancelled", ["model"]
)


def generation_cancelled(model: str, tokens: int) -> None:
    CANCELLED.labels(model).inc()
    CANCELLED_TOKENS.labels(model).inc(tokens)

# The scheduler (scheduler.py): how full its batches are and how much waits.
BATCH_SEQUENCES = Histogram(
    "glimprouter_worker_batch_sequences", "Requests one batch carried (continuous batching)", ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128, 256),
)
BATCH_TOKENS = Histogram(
    "glimprouter_worker_batch_tokens", "Tokens one batch evaluated (decode tokens plus prompt chunks)", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
WAITING = Gauge("glimprouter_worker_requests_waiting", "Requests waiting for a free sequence (--parallel)", ["model"])
ACTIVE = Gauge("glimprouter_worker_requests_active", "Requests holding a sequence of the batch (at most --parallel)", ["model"])
SNAPSHOT_BYTES = Gauge("glimprouter_worker_kv_snapshot_bytes", "Bytes of saved session KV state (--kv-cache-bytes)", ["model"])


class SchedulerMetrics:
    """Bound to one model's label once: the scheduler reports every batch."""

    def __init__(self, model: str) -> None:
        self._seqs, self._tokens = BATCH_SEQUENCES.labels(model), BATCH_TOKENS.labels(model)
        self._waiting, self._snap = WAITING.labels(model), SNAPSHOT_BYTES.labels(model)
        self._active = ACTIVE.labels(model)

    def batch(self, sequences: int, tokens: int, snapshot_bytes: int) -> None:
        self._seqs.observe(sequences)
        self._tokens.observe(tokens)
        self._snap.set(snapshot_bytes)

    def load(self, active: int, waiting: int) -> None:
        """After every iteration, also the ones that evaluate nothing (a request ending)."""
        self._active.set(active)
        self._waiting.set(waiting)
