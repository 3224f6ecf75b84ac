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
    EntropyMethod,
    Generation,
    Glimpse,
    ModelInfo,
    SamplingParams,
    StepResult,
    StopParams,
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
    async def glimpse(self, prompt: list[int], top_k: int) -> Glimpse: ...

    @abc.abstractmethod
    async def step(
        self,
        prompt: list[int],
        method: EntropyMethod,
        threshold: float,
        top_k: int,
        sampling: SamplingParams,
        stop: StopParams,
    ) -> StepResult: ...

    @abc.abstractmethod
    async def generate(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        stop: StopParams,
        return_entropies: bool = False,
        top_k: int = 20,
    ) -> Generation: ...

    def generate_stream(
        self, prompt: list[int], sampling: SamplingParams, stop: StopParams
    ) -> AsyncIterator[Chunk]:
        """Streamed generation; the last chunk carries `final`. Default: one chunk."""

        async def one() -> AsyncIterator[Chunk]:
            gen = await self.generate(prompt, sampling, stop)
            yield Chunk(gen.token_ids, gen.text, [], gen)

        return one()


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

    async def step(self, prompt, method, threshold, top_k, sampling, stop):
        return await self.engine.step(list(prompt), method, threshold, top_k, sampling, stop, self.session_id, CancelToken())

    async def generate(self, prompt, sampling, stop, return_entropies=False, top_k=20):
        return await self.engine.generate_full(
            list(prompt), sampling, stop, self.session_id, CancelToken(), return_entropies, top_k
        )

    def generate_stream(self, prompt, sampling, stop):
        return self.engine.generate(list(prompt), sampling, stop, self.session_id, CancelToken())


class LocalPool:
    """A pool of one in-process engine, with the interface of the gRPC pools
    (`info`, `bind`): lets the whole router core run in tests without gRPC."""

    def __init__(self, engine: Engine, name: str = "local") -> None:
        self.engine = engine
        self.info = engine.info
        self.name = name

    def bind(self, session_id: str, affinity: dict[str, str]) -> WorkerClient:
        return EngineClient(self.engine, session_id)
