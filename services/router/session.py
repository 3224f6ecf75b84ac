"""A session as the router keeps it: its options, its log records, its meta hash
(typed), and where a turn stands (TurnState).

Everything here is plain data. store.py reads and writes it in Redis; turns.py and
resume.py build TurnStates from it; the loop advances one.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

from services.router.api.types import (
    AnswerBy,
    Budgets,
    CatchUp,
    Decision,
    Entropy,
    GlimpseMode,
    PrefixMode,
    Role,
    RoutingOptions,
    SamplingOptions,
    Step,
)

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


# ---- options ---------------------------------------------------------------------------------
def default_routing() -> RoutingOptions:
    return RoutingOptions(DEFAULT_POLICY, DEFAULT_THRESHOLD, {}, GlimpseMode.FUSED, Entropy.TOP_K, DEFAULT_TOP_K)


def default_budgets() -> Budgets:
    return Budgets(DEFAULT_STEP_TOKENS, DEFAULT_THINKING_TOKENS, DEFAULT_ANSWER_TOKENS, 0)  # max_steps 0: no limit


def default_sampling() -> SamplingOptions:
    return SamplingOptions(DEFAULT_TEMPERATURE, DEFAULT_TOP_P, None)


@dataclass
class SessionOptions:
    """The options a session runs with: the request's option groups (api types) with
    every field filled in (admission.py), stored with the session as JSON."""

    routing: RoutingOptions = field(default_factory=default_routing)
    budgets: Budgets = field(default_factory=default_budgets)
    sampling: SamplingOptions = field(default_factory=default_sampling)
    answer_by: AnswerBy | None = None  # None: large for thinking models, none for plain ones
    think: bool | None = None  # None: on when the workers report think delimiters

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=_enum_value)

    @classmethod
    def from_json(cls, text: str) -> "SessionOptions":
        d = json.loads(text)
        r = d["routing"]
        catch_up = r.get("catch_up")  # sessions stored before catch-up existed: the router's default
        routing = RoutingOptions(r["policy"], r["threshold"], r["params"], GlimpseMode(r["glimpse_mode"]),
                                 Entropy(r["entropy"]), r["top_k"], CatchUp(catch_up) if catch_up else None)
        by = d.get("answer_by")
        return cls(routing, Budgets(**d["budgets"]), SamplingOptions(**d["sampling"]),
                   AnswerBy(by) if by not in (None, "auto") else None, d["think"])


def _enum_value(x: Any) -> Any:
    if isinstance(x, enum.Enum):
        return x.value
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


# ---- the log ----------------------------------------------------------------------------------------
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
    script, so the log and the prefix never disagree."""

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
    critical_prefill_tokens: int = 0
    critical_prefill_ms: float = 0.0
    prefix_end: dict[str, int] = field(default_factory=dict)  # view -> prefix length after this record
    end_reason: str = ""  # on the step that ended thinking: why

    def to_json(self) -> str:
        # Written once per step: a shallow copy is enough (asdict deep-copies, 10x slower).
        d = dict(self.__dict__)
        d["kind"] = self.kind.value
        for k in ("entropy", "threshold"):  # JSON has no NaN: null means "no value"
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

    def step(self, token_ids: list[int] | None = None) -> Step:
        """The public form of a step record (the event a client reads)."""
        return Step(
            self.index, self.turn, Role(self.role) if self.role else None, self.model_id,
            Decision(self.decision) if self.decision else None, self.entropy, self.threshold, self.text, self.tokens,
            self.discarded_tokens, self.cached_tokens, self.prefilled_tokens, self.latency_ms, self.worker_ms,
            self.finish_reason, token_ids if token_ids is not None else [],
            self.critical_prefill_tokens, self.critical_prefill_ms,
        )


# ---- the meta hash ------------------------------------------------------------------------------------
@dataclass
class SessionMeta:
    """The session's Redis hash, typed. `log_len` is the log's length, kept here so a
    write checks its position with the same read that checks the cancel flag."""

    status: str = "running"  # running, interrupted, done, cancelled
    mode: PrefixMode = PrefixMode.TOKENS
    views: tuple[str, ...] = ()
    options: SessionOptions = field(default_factory=SessionOptions)
    seed: int = 0
    think: bool = False
    think_end: str = "</think>"
    turn: int = 0
    steps: int = 0
    small_model: str = ""
    large_model: str = ""
    owner: str = ""
    affinity: dict[str, str] = field(default_factory=dict)  # role -> worker endpoint
    answer: str = ""
    error: str = ""
    cancel: bool = False
    created_ms: int = 0
    updated_ms: int = 0
    trace_ids: list[str] = field(default_factory=list)
    log_len: int = 0

    def to_hash(self) -> dict[str, str]:
        out = {
            "status": self.status, "mode": self.mode.value, "views": ",".join(self.views),
            "options": self.options.to_json(), "seed": str(self.seed), "think": "1" if self.think else "0",
            "think_end": self.think_end, "turn": str(self.turn), "steps": str(self.steps),
            "small_model": self.small_model, "large_model": self.large_model, "owner": self.owner,
            "len": str(self.log_len),
        }
        out.update(affinity_fields(self.affinity))
        return out

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> "SessionMeta":
        return cls(
            status=h.get("status", "running"),
            mode=PrefixMode(h.get("mode", "tokens")),
            views=tuple(v for v in h.get("views", "").split(",") if v),
            options=SessionOptions.from_json(h["options"]) if "options" in h else SessionOptions(),
            seed=int(h.get("seed", "0")),
            think=h.get("think") == "1",
            think_end=h.get("think_end", "</think>"),
            turn=int(h.get("turn", "0")),
            steps=int(h.get("steps", "0")),
            small_model=h.get("small_model", ""),
            large_model=h.get("large_model", ""),
            owner=h.get("owner", ""),
            affinity={k[4:]: v for k, v in h.items() if k.startswith("aff:")},
            answer=h.get("answer", ""),
            error=h.get("error", ""),
            cancel=h.get("cancel") == "1",
            created_ms=int(h.get("created_ms", "0")),
            updated_ms=int(h.get("updated_ms", "0")),
            trace_ids=h.get("trace_ids", "").split(),
            log_len=int(h.get("len", "0")),
        )


def affinity_fields(affinity: dict[str, str]) -> dict[str, str]:
    return {f"aff:{k}": v for k, v in affinity.items()}


# ---- a turn in progress ---------------------------------------------------------------------------------
def views_for(mode: PrefixMode) -> dict[Role, str]:
    """The prefix view each model reads: one shared view of token ids, or one per model."""
    if mode is PrefixMode.TOKENS:
        return {Role.SMALL: "shared", Role.LARGE: "shared"}
    return {Role.SMALL: "small", Role.LARGE: "large"}


@dataclass
class TurnState:
    """Where a session stands; rebuilt from its log when a turn resumes. Kept up to
    date by `accept` as records are stored, so nothing per step rescans the log."""

    session_id: str
    turn: int
    mode: PrefixMode
    seed: int
    think: bool
    think_end: str
    prefixes: dict[str, list[int]]
    log_len: int  # records in the log: the position the next write must find
    session_steps: list[Record] = field(default_factory=list)  # every step over all turns
    turn_records: list[Record] = field(default_factory=list)  # this turn's records
    resumed_steps: int = 0
    turn_steps: list[Record] = field(default_factory=list)
    turn_tokens: int = 0  # tokens of this turn's steps (the thinking budget counts them)

    def __post_init__(self) -> None:
        if not self.turn_steps and self.turn_records:
            self.turn_steps = [r for r in self.turn_records if r.kind is Kind.STEP]
            self.turn_tokens = sum(r.tokens for r in self.turn_steps)

    def accept(self, record: Record, tokens: dict[str, list[int]]) -> None:
        """A record the store accepted: it now counts."""
        for view, ids in tokens.items():
            self.prefixes[view].extend(ids)
        self.turn_records.append(record)
        if record.kind is Kind.STEP:
            self.session_steps.append(record)
            self.turn_steps.append(record)
            self.turn_tokens += record.tokens
        self.log_len += 1

    def start_turn(self, record: Record, tokens: dict[str, list[int]]) -> None:
        self.turn = record.turn
        self.turn_records, self.turn_steps, self.turn_tokens = [], [], 0
        self.accept(record, tokens)

    @property
    def thinking_end(self) -> str:
        return self.turn_steps[-1].end_reason if self.turn_steps else ""

    @property
    def answer_record(self) -> Record | None:
        last = self.turn_records[-1] if self.turn_records else None
        return last if last is not None and last.kind is Kind.ANSWER else None
