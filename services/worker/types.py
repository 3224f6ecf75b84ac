"""Messages inside the worker process: typed dataclasses that the gRPC layer maps
to and from protobuf, so engines and tests never touch protobuf objects."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence

DEFAULT_STEP_BOUNDARY = "\n\n"
DEFAULT_TOP_K = 20
DEFAULT_MAX_TOKENS = 512


class FinishReason(str, enum.Enum):
    STEP_END = "step_end"
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    CONTEXT = "context"


class EntropyMethod(str, enum.Enum):
    TOP_K = "top_k"
    FULL = "full"


class Decision(str, enum.Enum):
    KEEP = "keep"
    ESCALATE = "escalate"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no cut
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class StopParams:
    step_boundary: str = DEFAULT_STEP_BOUNDARY  # "" disables step cutting
    stop: tuple[str, ...] = ()
    stop_on_eos: bool = True


@dataclass(frozen=True)
class GenerateRequest:
    """One generation's arguments: what Generate, GenerateStream and Step share."""

    prompt: Sequence[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: StopParams = field(default_factory=StopParams)
    session_id: str = ""  # a hint: the worker keeps this session's KV state warm
    return_entropies: bool = False  # top-k entropy of every generated token's distribution
    top_k: int = DEFAULT_TOP_K  # tokens the entropies (and a Step's glimpse) are computed over


@dataclass(frozen=True)
class Gate:
    """A Step's rule: ESCALATE when the glimpsed entropy (by `method`) is >= threshold."""

    method: EntropyMethod = EntropyMethod.TOP_K
    threshold: float = float("inf")


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class Timings:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass
class Glimpse:
    token_id: int
    token_text: str
    entropy_full: float  # -1.0 when the backend cannot see the full vocabulary
    entropy_top_k: float
    top: list[TokenLogprob]
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)

    def entropy(self, method: EntropyMethod) -> float:
        return self.entropy_full if method is EntropyMethod.FULL else self.entropy_top_k


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    entropies: list[float] = field(default_factory=list)
    matched_stop: str = ""


@dataclass
class Chunk:
    """A streamed piece of a generation; `final` is set on the last chunk only."""

    token_ids: list[int]
    text: str
    entropies: list[float] = field(default_factory=list)
    final: Generation | None = None


@dataclass
class Decided:
    """The head of a streamed Step: what the glimpse saw and what was decided.
    On KEEP the step's Chunks follow; on ESCALATE nothing does."""

    decision: Decision
    entropy: float
    glimpse: Glimpse


@dataclass
class Extension:
    """What a catch-up (Extend) did: prompt_tokens asked for, cached_tokens already
    held, prefilled_tokens added now (fewer when it gave way to a real request)."""

    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)


@dataclass
class StepResult:
    decision: Decision
    entropy: float
    glimpse: Glimpse
    generation: Generation | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    backend: str
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    has_chat_template: bool
    tokenizer_fingerprint: str
    think_start: str = ""
    think_end: str = ""
