"""The router's Prometheus metrics.

Per session, step and token, they are fed from the events a Reason call emits
(`SessionMetrics.observe` sits between the loop and the transport), so the loop
itself knows nothing of them. Worker calls are counted by the pools (`worker_call`),
and the router's own calls by the servicer (`request`).

Label children are cached: `Metric.labels(...)` costs more than the increment.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

from services.router.api.types import AnswerDelta, Done, Event, Role, Started, Step, StepDelta, StepStart

if TYPE_CHECKING:
    from services.router.policies import Policy

_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SESSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
# Nats. ln 2 = 0.69, ln 20 = 3.0 (the top-20 maximum); the paper's tau sits near 1.
_ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)

REQUESTS = Counter("glimprouter_router_requests_total", "Router calls by method and gRPC status code", ["method", "code"])
DECISIONS = Counter(
    "glimprouter_router_decisions_total",
    "Routing decisions by policy and decision (small/large; accept/reject for verify)",
    ["policy", "decision"],
)
GLIMPSE_ENTROPY = Histogram(
    "glimprouter_router_glimpse_entropy_nats",
    "First-token entropy of the small model's glimpse at each step, by policy and method (top_k or full)",
    ["policy", "method"],
    buckets=_ENTROPY_BUCKETS,
)
STEP_DURATION = Histogram(
    "glimprouter_router_step_duration_seconds",
    "Time of one step (routing, writing and storing it) by the model that wrote it",
    ["model", "role"],
    buckets=_STEP_BUCKETS,
)
SESSION_DURATION = Histogram(
    "glimprouter_router_session_duration_seconds",
    "Time of one Reason call (a session's turn) by policy and gRPC status code",
    ["policy", "code"],
    buckets=_SESSION_BUCKETS,
)
TTFT = Histogram(
    "glimprouter_router_time_to_first_token_seconds",
    "From the start of a Reason call to its first text (a step's or the answer's), by policy",
    ["policy"],
    buckets=_SESSION_BUCKETS,
)
ITL = Histogram(
    "glimprouter_router_inter_token_latency_seconds",
    "Between consecutive text deltas of a Reason call, per token (the gap divided by the tokens the later delta carries), by policy",
    ["policy"],
    buckets=_TOKEN_BUCKETS,
)
TTFAT = Histogram(
    "glimprouter_router_time_to_first_answer_token_seconds",
    "From the start of a Reason call to the first answer text, by the model writing the answer",
    ["model"],
    buckets=_SESSION_BUCKETS,
)
TOKENS = Counter(
    "glimprouter_router_tokens_total",
    "Tokens by model and phase: glimpse (one per glimpse), step, answer, discarded (drafts thrown away)",
    ["model", "phase"],
)
CATCH_UPS = Counter(
    "glimprouter_router_catch_ups_total",
    "Eager catch-up calls (Extend) to the model not writing the step, by role and outcome (ok, error)",
    ["role", "outcome"],
)
CATCH_UP_TOKENS = Counter(
    "glimprouter_router_catch_up_prefilled_tokens_total",
    "Prompt tokens workers prefilled for eager catch-up, off the critical path, by role",
    ["role"],
)
RESTARTS = Counter("glimprouter_router_step_restarts_total", "Steps written again after a worker fault mid-step, by policy", ["policy"])
ACTIVE = Gauge("glimprouter_router_active_sessions", "Sessions this router is working on now")
WORKER_CALLS = Counter(
    "glimprouter_router_worker_calls_total", "Calls to workers by role, endpoint, method and gRPC status code",
    ["role", "endpoint", "method", "code"],
)
WORKER_CALL_DURATION = Histogram(
    "glimprouter_router_worker_call_duration_seconds", "Time of one worker call as the router sees it",
    ["role", "method"], buckets=_STEP_BUCKETS,
)
WORKER_PROMPT_TOKENS = Counter(
    "glimprouter_router_worker_prompt_tokens_total",
    "Prompt tokens the router's calls had each worker prefill, or found in its KV cache (kind=cached), or prefill off the critical path for eager catch-up (kind=caught_up)",
    ["role", "endpoint", "kind"],
)
RETRIES = Counter(
    "glimprouter_router_worker_retries_total", "Worker calls retried on another replica, by role and method", ["role", "method"]
)

MESSAGES = Counter(
    "glimprouter_router_grpc_messages_total",
    "gRPC messages the router sent and received on its streams: to clients (ReasonStream) and on the workers' Multiplex streams",
    ["stream", "direction"],
)
REDIS_ROUND_TRIPS = Counter(
    "glimprouter_router_redis_round_trips_total", "Round trips to Redis that carried the store's scripts (each carries one or more)")
REDIS_SCRIPTS = Counter("glimprouter_router_redis_scripts_total", "Store scripts run (step writes, lease renewals, ...)")

_children: dict[tuple, object] = {}


def child(metric, *labels: str):
    key = (metric, labels)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*labels)
    return c


def request(method: str, code: str) -> None:
    child(REQUESTS, method, code).inc()


def worker_call(role: str, endpoint: str, method: str, code: str, seconds: float, usage=None) -> None:
    """A worker call ended (workers.py): OK with the usage the worker reported, or a gRPC code name."""
    child(WORKER_CALLS, role, endpoint, method, code).inc()
    child(WORKER_CALL_DURATION, role, method).observe(seconds)
    if usage is None:
        return
    if method == "Extend":  # a catch-up reads no prompt: what it prefilled is counted apart
        child(WORKER_PROMPT_TOKENS, role, endpoint, "caught_up").inc(usage.prefilled_tokens)
        return
    child(WORKER_PROMPT_TOKENS, role, endpoint, "prefilled").inc(usage.prefilled_tokens)
    child(WORKER_PROMPT_TOKENS, role, endpoint, "cached").inc(usage.cached_tokens)


def message(stream: str, direction: str) -> None:
    child(MESSAGES, stream, direction).inc()


def redis_round_trip(scripts: int) -> None:
    REDIS_ROUND_TRIPS.inc()
    REDIS_SCRIPTS.inc(scripts)


def worker_retry(role: str, method: str) -> None:
    child(RETRIES, role, method).inc()


class SessionMetrics:
    """One Reason call's metrics, from its events."""

    def __init__(self, policy_name: str = "unknown") -> None:
        self.t0 = time.perf_counter()
        self.policy: "Policy | None" = None
        self.policy_name = policy_name  # a known name only: requests can send anything
        self.method = "top_k"
        self.small_model = self.large_model = ""
        self.answer_model: str | None = None
        self.active = False
        self.last_text: float | None = None

    def turn(self, policy: "Policy", method: str) -> None:
        self.policy, self.policy_name, self.method = policy, policy.name, method

    def event(self, ev: Event) -> bool:
        """Counts one event; True when it carried the call's first text."""
        if isinstance(ev, StepDelta):
            return self._text(ev.tokens)
        if isinstance(ev, StepStart):
            if ev.attempt > 1:
                child(RESTARTS, self.policy_name).inc()
            elif self.policy is not None and ev.role is not None:
                child(DECISIONS, self.policy_name, self.policy.label(ev.role)).inc()
                if self.policy.signal == "glimpse_entropy" and not math.isnan(ev.entropy):
                    child(GLIMPSE_ENTROPY, self.policy_name, self.method).observe(ev.entropy)
        elif isinstance(ev, Step):
            child(STEP_DURATION, ev.model_id, ev.role.value if ev.role else "").observe(ev.latency_ms / 1e3)
            child(TOKENS, ev.model_id, "step").inc(ev.tokens)
            # Glimpses and discarded drafts are the small model's work whoever wrote the step.
            if self.policy is not None and self.policy.signal == "glimpse_entropy":
                child(TOKENS, self.small_model, "glimpse").inc()
            if ev.discarded_tokens:
                child(TOKENS, self.small_model, "discarded").inc(ev.discarded_tokens)
        elif isinstance(ev, AnswerDelta):
            if ev.text and self.answer_model is None:
                self.answer_model = self.large_model if ev.role is Role.LARGE else self.small_model
                child(TTFAT, self.answer_model).observe(time.perf_counter() - self.t0)
            return self._text(ev.tokens) if ev.text else False
        elif isinstance(ev, Started):
            self.small_model, self.large_model = ev.small_model, ev.large_model
            self.active = True
            ACTIVE.inc()
        elif isinstance(ev, Done) and ev.stats.answer_tokens and self.answer_model is not None:
            child(TOKENS, self.answer_model, "answer").inc(ev.stats.answer_tokens)
        return False

    def _text(self, tokens: int) -> bool:
        now = time.perf_counter()
        last, self.last_text = self.last_text, now
        if last is None:
            child(TTFT, self.policy_name).observe(now - self.t0)
            return True
        child(ITL, self.policy_name).observe((now - last) / max(1, tokens))
        return False

    def finish(self, code: str) -> None:
        if self.active:
            ACTIVE.dec()
            self.active = False
        child(SESSION_DURATION, self.policy_name, code).observe(time.perf_counter() - self.t0)


def catch_up(role: str, outcome: str, prefilled: int) -> None:
    child(CATCH_UPS, role, outcome).inc()
    if prefilled:
        child(CATCH_UP_TOKENS, role).inc(prefilled)
