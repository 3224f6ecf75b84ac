"""The engine interface every backend implements (llama.cpp and sim through the
batching scheduler, TensorRT-LLM directly).

The gRPC servicer is a thin layer over this: it validates requests, converts
protobuf to the dataclasses in `types`, and calls an Engine. Engines may assume
their inputs were validated (token ids in range, prompt within the context).
"""
from __future__ import annotations

import abc
import threading
from typing import AsyncIterator, Sequence

from services.worker.types import (
    ChatMessage,
    Chunk,
    Decided,
    Extension,
    Gate,
    GenerateRequest,
    Generation,
    Glimpse,
    ModelInfo,
    StepResult,
    Usage,
)


class EngineError(Exception):
    """A request the engine cannot serve; the message names what is wrong."""


class CancelToken:
    """Set by the transport when the caller goes away; engines poll it between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Engine(abc.ABC):
    info: ModelInfo

    async def start(self) -> None:
        """Load and warm the model; the worker reports SERVING only after this."""

    async def close(self) -> None:
        """Release the model."""

    def describe(self) -> str:
        """What the engine runs with (threads, batch, ...), for the start line."""
        return ""

    @abc.abstractmethod
    def render_prompt(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool, continue_final_message: bool
    ) -> tuple[list[int], str]:
        """Chat messages -> (token ids, text) with the model's chat template."""

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Text -> token ids; special-token text such as <|im_start|> is parsed."""

    @abc.abstractmethod
    def token_text(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text (invalid UTF-8 replaced)."""

    @abc.abstractmethod
    async def glimpse(self, prompt: list[int], top_k: int, session_id: str, cancel: CancelToken) -> Glimpse:
        """The next token's distribution after `prompt`; generates nothing."""

    @abc.abstractmethod
    def step(self, req: GenerateRequest, gate: Gate, cancel: CancelToken) -> AsyncIterator[Decided | Chunk]:
        """Glimpse and decide: yields a Decided first; on KEEP the step follows as Chunks
        (its first token sampled from the glimpsed distribution), the last with `final`."""

    @abc.abstractmethod
    def generate(self, req: GenerateRequest, cancel: CancelToken) -> AsyncIterator[Chunk]:
        """Stream chunks; the last one carries `final`."""

    async def extend(self, prompt: list[int], session_id: str, cancel: CancelToken) -> Extension:
        """Catch-up prefill of a session's KV state (see worker.proto's Extend). A
        backend without per-session state to extend does nothing, which is always
        correct: the next real call prefills what it needs."""
        return Extension(Usage(len(prompt), 0, 0, 0))

    # ---- whole results, for unary calls ----------------------------------------------
    async def generate_full(self, req: GenerateRequest, cancel: CancelToken) -> Generation:
        final: Generation | None = None
        async for chunk in self.generate(req, cancel):
            if chunk.final is not None:
                final = chunk.final
        if final is None:  # a backend bug, not a user error
            raise RuntimeError("engine stream ended without a final chunk")
        return final

    async def step_full(self, req: GenerateRequest, gate: Gate, cancel: CancelToken) -> StepResult:
        head: Decided | None = None
        final: Generation | None = None
        async for item in self.step(req, gate, cancel):
            if isinstance(item, Decided):
                head = item
            elif item.final is not None:
                final = item.final
        if head is None:
            raise RuntimeError("engine step ended without a decision")
        return StepResult(head.decision, head.entropy, head.glimpse, final)
