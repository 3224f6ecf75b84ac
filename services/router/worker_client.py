"""What the step loop needs from one role's workers, as an abstract interface.

The gRPC pools in `workers.py` implement it (one session bound to one replica);
`EngineClient` implements it over an in-process Engine, so tests and tools can
drive the loop without any transport.
"""
from __future__ import annotations

import abc
from typing import AsyncIterator, Sequence

from services.worker.engine import CancelToken, Engine
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
)


class WorkerClient(abc.ABC):
    """One role (small or large) as seen by one session."""

    info: ModelInfo

    @abc.abstractmethod
    async def render_prompt(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> tuple[list[int], str]: ...

    @abc.abstractmethod
    async def tokenize(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    async def glimpse(self, prompt: Sequence[int], top_k: int) -> Glimpse: ...

    @abc.abstractmethod
    def step_stream(self, req: GenerateRequest, gate: Gate) -> AsyncIterator[Decided | Chunk]:
        """The fused Step, streamed: the decision first; on KEEP the step's chunks, the
        last one carrying `final`."""

    @abc.abstractmethod
    async def generate(self, req: GenerateRequest) -> Generation:
        """A whole generation (a draft nobody sees until it is judged)."""

    @abc.abstractmethod
    def generate_stream(self, req: GenerateRequest) -> AsyncIterator[Chunk]:
        """Streamed generation; the last chunk carries `final`."""

    @abc.abstractmethod
    async def extend(self, prompt: Sequence[int]) -> Extension:
        """Catch-up: the session's KV state on its worker grows to `prompt` (see
        catchup.py); nothing is generated. Only ever an optimisation: may raise."""


class EngineClient(WorkerClient):
    """An in-process Engine as a worker (no gRPC): for tests and offline tools."""

    def __init__(self, engine: Engine, session_id: str = "") -> None:
        self.engine = engine
        self.info = engine.info
        self.session_id = session_id

    async def render_prompt(self, messages, add_generation_prompt=True, continue_final_message=False):
        return self.engine.render_prompt(list(messages), add_generation_prompt, continue_final_message)

    async def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    async def glimpse(self, prompt, top_k):
        return await self.engine.glimpse(list(prompt), top_k, self.session_id, CancelToken())

    async def step_stream(self, req, gate):
        cancel = CancelToken()
        try:
            async for item in self.engine.step(req, gate, cancel):
                yield item
        finally:
            cancel.cancel()  # a caller that stops reading stops the decoding

    async def generate(self, req):
        return await self.engine.generate_full(req, CancelToken())

    async def generate_stream(self, req):
        cancel = CancelToken()
        try:
            async for chunk in self.engine.generate(req, cancel):
                yield chunk
        finally:
            cancel.cancel()

    async def extend(self, prompt):
        cancel = CancelToken()
        try:
            return await self.engine.extend(list(prompt), self.session_id, cancel)
        finally:
            cancel.cancel()  # a catch-up cancelled (the turn ended) stops on the worker


class LocalPool:
    """A pool of one in-process engine, with the interface of the gRPC pools
    (`info`, `bind`): lets the whole router core run in tests without gRPC."""

    def __init__(self, engine: Engine, name: str = "local") -> None:
        self.engine = engine
        self.info = engine.info
        self.name = name

    def bind(self, session_id: str, affinity: dict[str, str]) -> WorkerClient:
        return EngineClient(self.engine, session_id)

    def forget(self, session_id: str) -> None:
        """(No stream holds its prompts: nothing to let go of.)"""
