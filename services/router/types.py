"""Messages inside the router: typed dataclasses that the gRPC layer maps to and
from protobuf, so the step loop, policies and tests never touch protobuf objects.
Worker-side messages (Glimpse, Generation, ...) are reused from services.worker.types."""
from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

# The paper's reference defaults (see docs/router.md).
DEFAULT_POLICY = "glimpse"
DEFAULT_THRESHOLD = 0.9
DEFAULT_TOP_K = 20
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
DEFAULT_STEP_TOKENS = 512
DEFAULT_THINKING_TOKENS = 8192
DEFAULT_ANSWER_TOKENS = 2048
STEP_BOUNDARY = "\n\n"


class Role(str, enum.Enum):
    SMALL = "small"
    LARGE = "large"


class AnswerBy(str, enum.Enum):
    AUTO = "auto"  # large for thinking models, none for plain ones
    LARGE = "large"
    SMALL = "small"
    NONE = "none"


class RouterError(Exception):
    """A request the router refuses; `code` names a gRPC status (INVALID_ARGUMENT, ...)."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(RouterError):
    code = "INVALID_ARGUMENT"


class NotFound(RouterError):
    code = "NOT_FOUND"


class SessionBusy(RouterError):
    """Another router holds the session's lease."""

    code = "ABORTED"


class FailedPrecondition(RouterError):
    code = "FAILED_PRECONDITION"


class LimitExceeded(RouterError):
    code = "RESOURCE_EXHAUSTED"


class LeaseLost(RouterError):
    """The lease expired or was taken over while this router worked: stop, write nothing."""

    code = "ABORTED"


class SessionCancelled(RouterError):
    code = "CANCELLED"


class WorkersUnavailable(RouterError):
    code = "UNAVAILABLE"


class StoreUnavailable(RouterError):
    """Redis did not answer in time: nothing was stored; the session can be resumed once it is back."""

    code = "UNAVAILABLE"


class ShuttingDown(RouterError):
    """The router is draining (SIGTERM): retry, or resume the session, on another replica."""

    code = "UNAVAILABLE"


@dataclass
class RoutingOptions:
    policy: str = DEFAULT_POLICY
    threshold: float = DEFAULT_THRESHOLD
    params: dict[str, float] = field(default_factory=dict)
    glimpse_mode: str = "fused"  # fused | separate
    entropy: str = "top_k"  # top_k | full
    top_k: int = DEFAULT_TOP_K


@dataclass
class Budgets:
    step_tokens: int = DEFAULT_STEP_TOKENS
    thinking_tokens: int = DEFAULT_THINKING_TOKENS  # glimpses not counted
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    max_steps: int = 0  # 0 = no per-turn limit


@dataclass
class SamplingOptions:
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None


@dataclass
class SessionOptions:
    routing: RoutingOptions = field(default_factory=RoutingOptions)
    budgets: Budgets = field(default_factory=Budgets)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    answer_by: AnswerBy = AnswerBy.AUTO
    think: bool | None = None  # None: on when the workers report think delimiters

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["answer_by"] = self.answer_by.value
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SessionOptions":
        d = json.loads(text)
        return cls(
            routing=RoutingOptions(**d["routing"]),
            budgets=Budgets(**d["budgets"]),
            sampling=SamplingOptions(**d["sampling"]),
            answer_by=AnswerBy(d["answer_by"]),
            think=d["think"],
        )


@dataclass
class ChatTurn:
    role: str
    content: str


@dataclass
class ReasonRequest:
    session_id: str = ""
    messages: list[ChatTurn] = field(default_factory=list)
    options: SessionOptions = field(default_factory=SessionOptions)
    # Which option groups the caller set: a new turn of an existing session keeps
    # the stored options for the groups left unset.
    options_set: frozenset[str] = frozenset()
    include_token_ids: bool = False
    # Who is asking (services/common/owner.py): stored with a new session, checked on every later call.
    owner: str = ""


class Kind(str, enum.Enum):
    """What a log record appended to the prefix: the session's prefix is exactly the
    concatenation of every record's tokens, in order."""

    PROMPT = "prompt"  # the rendered conversation of the first turn
    TURN = "turn"  # a later turn's messages, rendered onto the stored prefix
    STEP = "step"  # one reasoning step
    JOIN = "join"  # text the router adds between thinking and the answer
    ANSWER = "answer"


@dataclass
class Record:
    """One entry of a session's log; written together with its tokens in one Redis
    transaction, so the log and the prefix never disagree."""

    kind: Kind
    turn: int
    index: int = -1  # step index over the session (steps only)
    role: str = ""  # writer: small | large | "" (router-made text)
    model_id: str = ""
    decision: str = ""  # small | large (steps)
    entropy: float = math.nan
    threshold: float = math.nan
    text: str = ""
    tokens: int = 0  # tokens the writer produced (its own tokenizer)
    discarded_tokens: int = 0
    glimpses: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    latency_ms: float = 0.0
    worker_ms: float = 0.0
    finish_reason: str = ""
    prefix_end: dict[str, int] = field(default_factory=dict)  # view -> prefix length after this record
    end_reason: str = ""  # on the step that ended thinking: why

    def to_json(self) -> str:
        # Written once per step: a shallow copy is enough (asdict deep-copies, 10x slower).
        d = dict(self.__dict__)
        d["kind"] = self.kind.value
        # JSON has no NaN; null means "no value"
        for k in ("entropy", "threshold"):
            if math.isnan(d[k]):
                d[k] = None
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Record":
        d: dict[str, Any] = json.loads(text)
        d["kind"] = Kind(d["kind"])
        for k in ("entropy", "threshold"):
            if d.get(k) is None:
                d[k] = math.nan
        return cls(**d)


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
    intervention_rate: float = 0.0
    small: RoleStats = field(default_factory=RoleStats)
    large: RoleStats = field(default_factory=RoleStats)
    thinking_tokens: int = 0
    answer_tokens: int = 0
    thinking_end: str = ""
    answer_end: str = ""
    resumed_steps: int = 0
    prompt_tokens: int = 0


# ---- events of one Reason call -----------------------------------------------------
@dataclass
class Started:
    session_id: str
    turn: int
    prefix_mode: str  # tokens | text
    resumed_steps: int
    small_model: str
    large_model: str


@dataclass
class StepDone:
    record: Record
    token_ids: list[int] | None = None


@dataclass
class AnswerDelta:
    text: str
    role: str


@dataclass
class Finished:
    session_id: str
    answer: str
    stats: Stats
