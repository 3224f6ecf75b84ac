"""The router's public types: what a caller sends (ReasonRequest), the events a
Reason call streams, statistics, and a session as GetSession reports it.

One dataclass per message of router.proto that callers use; `protomap.py` maps
them to and from protobuf. The router yields these events itself, so the gRPC
servicer, the gateway, the CLI and the evaluation all read the same objects.

Enums are named after the proto values (`Role.SMALL` is `ROLE_SMALL`); a field
whose proto value may be UNSPECIFIED is `X | None`, None meaning "the router's
default" (or "keep the session's", on a continued session).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class Role(str, enum.Enum):
    SMALL = "small"
    LARGE = "large"


class Decision(str, enum.Enum):
    """Who the policy chose to write the step: the small model's step kept, or the large model's."""

    SMALL = "small"
    LARGE = "large"


class PrefixMode(str, enum.Enum):
    TOKENS = "tokens"  # both pools share a tokenizer: the prefix travels as token ids
    TEXT = "text"  # each pool has its own prefix of the same text


class GlimpseMode(str, enum.Enum):
    FUSED = "fused"  # one Step call glimpses, decides and (on keep) writes
    SEPARATE = "separate"  # the paper's Glimpse, then Generate


class Entropy(str, enum.Enum):
    TOP_K = "top_k"
    FULL = "full"


class CatchUp(str, enum.Enum):
    """When the model that is not writing a step reads it: EAGER while it streams
    (Extend on the other worker), LAZY at its next call (prefix caching only)."""

    EAGER = "eager"
    LAZY = "lazy"


class AnswerBy(str, enum.Enum):
    """Who writes the answer after the steps; None (unspecified): LARGE for thinking
    models, NONE for plain instruct models, whose steps are the answer."""

    LARGE = "large"
    SMALL = "small"
    NONE = "none"


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: a policy that reads no entropy reports null."""
    return None if value is None or math.isnan(value) or math.isinf(value) else value


# ---- the request ------------------------------------------------------------------------------
@dataclass
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass
class RoutingOptions:
    policy: str = ""  # "": glimpse
    threshold: float | None = None
    params: dict[str, float] = field(default_factory=dict)
    glimpse_mode: GlimpseMode | None = None
    entropy: Entropy | None = None
    top_k: int | None = None
    catch_up: CatchUp | None = None


@dataclass
class Budgets:
    step_tokens: int | None = None
    thinking_tokens: int | None = None
    answer_tokens: int | None = None
    max_steps: int | None = None


@dataclass
class SamplingOptions:
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None


@dataclass
class ReasonRequest:
    """A Reason call. A group left None (routing, budgets, sampling) takes the router's
    defaults on a new session and the stored options on a continued one."""

    messages: list[Message] = field(default_factory=list)
    session_id: str = ""  # "": a new session
    routing: RoutingOptions | None = None
    budgets: Budgets | None = None
    sampling: SamplingOptions | None = None
    answer_by: AnswerBy | None = None
    think: bool | None = None
    include_token_ids: bool = False


# ---- statistics ---------------------------------------------------------------------------------
@dataclass
class RoleStats:
    steps: int = 0
    generated_tokens: int = 0
    discarded_tokens: int = 0
    glimpses: int = 0
    prefilled_tokens: int = 0
    cached_tokens: int = 0
    worker_ms: float = 0.0


@dataclass
class Stats:
    latency_ms: float = 0.0
    steps: int = 0
    intervention_rate: float = 0.0  # share of steps written by the large model
    small: RoleStats = field(default_factory=RoleStats)
    large: RoleStats = field(default_factory=RoleStats)
    thinking_tokens: int = 0
    answer_tokens: int = 0
    thinking_end: str = ""  # think_end, repetition, budget, max_steps, session_steps, eos, context
    answer_end: str = ""  # eos, length, stop, none
    resumed_steps: int = 0
    prompt_tokens: int = 0


# ---- events of one Reason call, in the order they come ----------------------------------------------
@dataclass
class Started:
    session_id: str
    turn: int = 0
    prefix_mode: PrefixMode | None = None
    resumed_steps: int = 0  # steps of this turn already stored (a resume)
    small_model: str = ""
    large_model: str = ""
    thinking: bool = False  # the steps are thinking (<think>); else they are the reply


@dataclass
class StepStart:
    """A step's writer is decided; its text follows as StepDeltas. A new StepStart for
    the same index (attempt + 1) restarts the step: drop the earlier attempt's deltas."""

    index: int
    turn: int = 0
    role: Role | None = None
    model_id: str = ""
    decision: Decision | None = None
    entropy: float = math.nan  # the value the policy compared; NaN when none
    threshold: float = math.nan
    attempt: int = 1


@dataclass
class StepDelta:
    index: int
    text: str
    tokens: int = 0  # tokens this delta completes
    token_ids: list[int] = field(default_factory=list)  # with include_token_ids


@dataclass
class Step:
    """A finished step, as stored."""

    index: int
    turn: int = 0
    role: Role | None = None  # who wrote it
    model_id: str = ""
    decision: Decision | None = None
    entropy: float = math.nan
    threshold: float = math.nan
    text: str = ""
    tokens: int = 0
    discarded_tokens: int = 0  # drafted by the small model, then thrown away
    cached_tokens: int = 0  # prompt tokens the writer found in its KV cache
    prefilled_tokens: int = 0
    latency_ms: float = 0.0  # the step's wall time at the router
    worker_ms: float = 0.0  # the part spent waiting on workers
    finish_reason: str = ""
    token_ids: list[int] = field(default_factory=list)  # with include_token_ids
    # Prompt tokens this step's worker calls prefilled while the request waited, and
    # the workers' prefill time for them (a switch's cost; catch-up shrinks it).
    critical_prefill_tokens: int = 0
    critical_prefill_ms: float = 0.0

    def routing(self) -> dict:
        """The step without its text or ids, JSON-safe: what the gateway reports per step."""
        return {
            "index": self.index,
            "turn": self.turn,
            "model": self.role.value if self.role else "",
            "model_id": self.model_id,
            "decision": self.decision.value if self.decision else "",
            "entropy": finite_or_none(self.entropy),
            "threshold": finite_or_none(self.threshold),
            "tokens": self.tokens,
            "discarded_tokens": self.discarded_tokens,
            "cached_tokens": self.cached_tokens,
            "prefilled_tokens": self.prefilled_tokens,
            "latency_ms": self.latency_ms,
            "worker_ms": self.worker_ms,
            "finish_reason": self.finish_reason,
            "critical_prefill_tokens": self.critical_prefill_tokens,
            "critical_prefill_ms": self.critical_prefill_ms,
        }


@dataclass
class AnswerDelta:
    text: str
    role: Role | None = None
    tokens: int = 0


@dataclass
class Done:
    session_id: str
    answer: str = ""
    stats: Stats = field(default_factory=Stats)


Event = Started | StepStart | StepDelta | Step | AnswerDelta | Done


# ---- GetSession ------------------------------------------------------------------------------------
@dataclass
class PrefixView:
    name: str  # shared (token mode); small, large (text mode)
    length: int = 0
    token_ids: list[int] = field(default_factory=list)  # with include_prefix


@dataclass
class SessionInfo:
    session_id: str
    status: str = ""  # running, interrupted, done, cancelled
    prefix_mode: PrefixMode | None = None
    turn: int = 0
    small_model: str = ""
    large_model: str = ""
    options_json: str = ""
    steps: list[Step] = field(default_factory=list)
    prefixes: list[PrefixView] = field(default_factory=list)
    lease_holder: str = ""
    lease_ms_left: int = 0
    answer: str = ""
    stats: Stats = field(default_factory=Stats)
    affinity: dict[str, str] = field(default_factory=dict)  # role -> worker endpoint
    created_unix_ms: int = 0
    updated_unix_ms: int = 0
    error: str = ""
    trace_ids: list[str] = field(default_factory=list)  # OpenTelemetry traces of its requests, oldest first
