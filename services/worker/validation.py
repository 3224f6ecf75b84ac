"""Request validation: protobuf request -> checked dataclass parameters.

Every problem raises InvalidArgument naming the field, which the servicer turns
into INVALID_ARGUMENT; nothing invalid reaches an engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from glimprouter.v1 import worker_pb2 as pb
from services.worker.types import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_STEP_BOUNDARY,
    DEFAULT_TOP_K,
    ChatMessage,
    EntropyMethod,
    ModelInfo,
    SamplingParams,
    StopParams,
)

MAX_TOP_K = 1000
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_SESSION_ID = 256
MAX_MESSAGES = 1024
ROLES = ("system", "user", "assistant", "tool")


class InvalidArgument(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    context_length: int

    @classmethod
    def of(cls, info: ModelInfo) -> "Limits":
        return cls(info.vocab_size, info.context_length)


def prompt_ids(prompt: pb.Prompt, limits: Limits, tokenize: Callable[[str], list[int]], field: str = "prompt") -> list[int]:
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(field, "is required (token_ids or text)")
    if kind == "delta":  # resolved by the Multiplex stream (prompt_delta.py) before it gets here
        raise InvalidArgument(f"{field}.delta", "is only valid on Multiplex (send token_ids or text)")
    if kind == "text":
        if not prompt.text:
            raise InvalidArgument(f"{field}.text", "is empty")
        ids = tokenize(prompt.text)
        where = f"{field}.text"
    else:
        ids = list(prompt.token_ids.ids)
        where = f"{field}.token_ids"
        # min/max run in C: a Python loop over every token cost ~100 µs per call at 2000 tokens.
        if ids and (min(ids) < 0 or max(ids) >= limits.vocab_size):
            i, t = next((i, t) for i, t in enumerate(ids) if not 0 <= t < limits.vocab_size)
            raise InvalidArgument(f"{where}[{i}]", f"token id {t} is out of range [0, {limits.vocab_size})")
    if not ids:
        raise InvalidArgument(where, "is empty")
    if len(ids) >= limits.context_length:
        raise InvalidArgument(
            where, f"prompt has {len(ids)} tokens; the context holds {limits.context_length} (at least one must be left to generate)"
        )
    return ids


def top_k(value: int, field: str = "top_k") -> int:
    if value == 0:
        return DEFAULT_TOP_K
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidArgument(field, f"must be between 1 and {MAX_TOP_K}, got {value}")
    return value


def sampling(s: pb.Sampling, field: str = "sampling") -> SamplingParams:
    temperature = s.temperature if s.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"{field}.temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):  # also false for NaN
        raise InvalidArgument(f"{field}.top_p", f"must be in (0, 1], got {top_p}")
    k = s.top_k if s.HasField("top_k") else 0
    if k < 0:
        raise InvalidArgument(f"{field}.top_k", f"must be >= 0 (0 = no cut), got {k}")
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens < 1:
        raise InvalidArgument(f"{field}.max_tokens", f"must be >= 1, got {max_tokens}")
    return SamplingParams(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=k,
        seed=s.seed if s.HasField("seed") else None,
        max_tokens=max_tokens,
    )


def stop(s: pb.StopCondition, field: str = "stop") -> StopParams:
    boundary = s.step_boundary if s.HasField("step_boundary") else DEFAULT_STEP_BOUNDARY
    if len(boundary) > MAX_STOP_LENGTH:
        raise InvalidArgument(f"{field}.step_boundary", f"longer than {MAX_STOP_LENGTH} characters")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"{field}.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    for i, text in enumerate(s.stop):
        if not text or len(text) > MAX_STOP_LENGTH:
            raise InvalidArgument(f"{field}.stop[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters")
    return StopParams(
        step_boundary=boundary,
        stop=tuple(s.stop),
        stop_on_eos=s.stop_on_eos if s.HasField("stop_on_eos") else True,
    )


def entropy_method(value: int, field: str = "entropy_method") -> EntropyMethod:
    if value in (pb.ENTROPY_METHOD_UNSPECIFIED, pb.ENTROPY_METHOD_TOP_K):
        return EntropyMethod.TOP_K
    if value == pb.ENTROPY_METHOD_FULL:
        return EntropyMethod.FULL
    raise InvalidArgument(field, f"unknown entropy method {value} (use ENTROPY_METHOD_TOP_K or ENTROPY_METHOD_FULL)")


def threshold(value: float, field: str = "threshold") -> float:
    if math.isnan(value):
        raise InvalidArgument(field, "is NaN")
    return value


def session_id(value: str, field: str = "session_id") -> str:
    if len(value) > MAX_SESSION_ID:
        raise InvalidArgument(field, f"longer than {MAX_SESSION_ID} characters")
    return value


def messages(msgs: Sequence[pb.ChatMessage], add_generation_prompt: bool, continue_final: bool) -> list[ChatMessage]:
    if not msgs:
        raise InvalidArgument("messages", "is empty")
    if len(msgs) > MAX_MESSAGES:
        raise InvalidArgument("messages", f"at most {MAX_MESSAGES} messages, got {len(msgs)}")
    out = []
    for i, m in enumerate(msgs):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"unknown role {m.role!r} (use one of {', '.join(ROLES)})")
        out.append(ChatMessage(m.role, m.content))
    if continue_final and add_generation_prompt:
        raise InvalidArgument("continue_final_message", "cannot be combined with add_generation_prompt")
    if continue_final and out[-1].role != "assistant":
        raise InvalidArgument("continue_final_message", "the final message must have role 'assistant'")
    return out
