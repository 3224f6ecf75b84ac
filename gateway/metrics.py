"""Prometheus metrics of the gateway (a private registry, served at /metrics).

Requests by route and status, latency, time to first token and inter-token
latency of completions, requests in flight, steps by the model that wrote them,
tokens. Routing decisions, entropy, per-step and per-worker
numbers are the router's metrics (services/router/metrics.py); the gateway's
traces are in gateway/tracing.py. See docs/observability.md.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.router.api.types import Done

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "glimprouter_gateway_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "glimprouter_gateway_request_duration_seconds",
            "time from request to the last byte of the response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "glimprouter_gateway_time_to_first_token_seconds",
            "chat completions: from the request to the first text (reasoning or content) from the router, by streaming",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "glimprouter_gateway_inter_token_latency_seconds",
            "chat completions: between consecutive text deltas, per token (the gap over the tokens the later one carries)",
            ["stream"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("glimprouter_gateway_in_flight_requests", "chat completions being served", registry=r)
        self.steps = Counter("glimprouter_gateway_steps", "reasoning steps by the model that wrote them", ["model"], registry=r)
        self.tokens = Counter("glimprouter_gateway_tokens", "tokens by kind", ["kind"], registry=r)
        self.disconnects = Counter(
            "glimprouter_gateway_client_disconnects", "completions cancelled because the client went away", registry=r
        )

    def completed(self, done: Done) -> None:
        s = done.stats
        self.steps.labels("small").inc(s.small.steps)
        self.steps.labels("large").inc(s.large.steps)
        self.tokens.labels("thinking").inc(s.thinking_tokens)
        self.tokens.labels("answer").inc(s.answer_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
