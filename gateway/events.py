"""The router's events as plain dataclasses: the gateway's translation code and the
CLI read these, never protobuf objects (protomap.py converts at the edge)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# The router's own statistics types: the gateway reports them as they are.
from services.router.types import RoleStats, Stats  # noqa: F401  (re-exported)


def finite_or_none(value: float) -> float | None:
    # JSON has no NaN: a policy that reads no entropy reports null.
    return None if value is None or math.isnan(value) or math.isinf(value) else value


@dataclass
class Started:
    session_id: str
    turn: int = 0
    prefix_mode: str = ""  # tokens | text
    resumed_steps: int = 0
    small_model: str = ""
    large_model: str = ""


@dataclass
class Step:
    index: int
    turn: int = 0
    role: str = ""  # who wrote it: small | large
    model_id: str = ""
    decision: str = ""  # small | large
    entropy: float = math.nan  # the value the policy compared; NaN when none
    threshold: float = math.nan
    text: str = ""
    tokens: int = 0
    discarded_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    latency_ms: float = 0.0
    worker_ms: float = 0.0
    finish_reason: str = ""

    def routing(self) -> dict:
        """The step without its text, JSON-safe: what the gateway reports per step."""
        return {
            "index": self.index,
            "turn": self.turn,
            "model": self.role,
            "model_id": self.model_id,
            "decision": self.decision,
            "entropy": finite_or_none(self.entropy),
            "threshold": finite_or_none(self.threshold),
            "tokens": self.tokens,
            "discarded_tokens": self.discarded_tokens,
            "cached_tokens": self.cached_tokens,
            "prefilled_tokens": self.prefilled_tokens,
            "latency_ms": self.latency_ms,
            "worker_ms": self.worker_ms,
            "finish_reason": self.finish_reason,
        }


@dataclass
class AnswerDelta:
    text: str
    role: str = ""




@dataclass
class Done:
    session_id: str
    answer: str = ""
    stats: Stats = field(default_factory=Stats)


Event = Started | Step | AnswerDelta | Done


@dataclass
class SessionInfo:
    """A session as GetSession reports it."""

    session_id: str
    status: str = ""
    prefix_mode: str = ""
    turn: int = 0
    small_model: str = ""
    large_model: str = ""
    options_json: str = ""
    steps: list[Step] = field(default_factory=list)
    lease_holder: str = ""
    lease_ms_left: int = 0
    answer: str = ""
    stats: Stats = field(default_factory=Stats)
    affinity: dict[str, str] = field(default_factory=dict)
    created_unix_ms: int = 0
    updated_unix_ms: int = 0
    error: str = ""
    trace_ids: list[str] = field(default_factory=list)  # OpenTelemetry traces of its requests, oldest first
