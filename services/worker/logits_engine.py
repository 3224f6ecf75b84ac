"""The Engine for backends that hand us next-token logits one position at a time
(llama.cpp, sim). Glimpse, Step and Generate are written once here: a backend
only implements `TokenModel` (prefill to a prefix, decode one token, vocabulary).

A TokenModel is not thread-safe, so every call runs on one dedicated thread:
requests to one model are serialised, and the time a request waits for that
thread is reported as queue time.
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Sequence

import numpy as np

from services.worker import entropy as ent
from services.worker import observe
from services.worker.engine import CancelToken, Engine
from services.worker.sampling import sample
from services.worker.stepcut import StepCutter
from services.worker.vocab import tokenizer_fingerprint
from services.worker.types import (
    ChatMessage,
    Chunk,
    Decision,
    EntropyMethod,
    FinishReason,
    Generation,
    Glimpse,
    ModelInfo,
    SamplingParams,
    StepResult,
    StopParams,
    Timings,
    TokenLogprob,
    Usage,
)


@dataclass
class Prefill:
    logits: np.ndarray  # next-token logits after the prompt, float32 [vocab]
    cached_tokens: int  # prompt tokens whose KV state was reused


class TokenModel(abc.ABC):
    """The few primitives a logits-level backend provides. Single-threaded use only."""

    model_id: str
    backend: str
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int
    think_start: str = ""
    think_end: str = ""

    @abc.abstractmethod
    def prefill(self, session_id: str, tokens: Sequence[int]) -> Prefill:
        """Make the context hold exactly `tokens`, reusing any KV state that shares a
        prefix with them (the current context or the session's saved state)."""

    @abc.abstractmethod
    def decode(self, token_id: int) -> np.ndarray:
        """Append one token to the context; logits for the next position."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token decodes to (special tokens: their text)."""

    @abc.abstractmethod
    def tokenize(self, text: str, add_bos: bool) -> list[int]: ...

    @abc.abstractmethod
    def chat_template_text(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool
    ) -> str | None:
        """The chat template applied to messages, or None when the model has none."""

    def warmup(self) -> None:
        """Run something through the model so the first real request is not slow."""
        self.prefill("__warmup__", self.tokenize("Hello", add_bos=True))

    def close(self) -> None: ...

    def tokenizer_fingerprint(self) -> str:
        pieces = (self.token_bytes(t) for t in range(self.vocab_size))
        return tokenizer_fingerprint(pieces, self.eos_token_ids, self.bos_token_id)


_SENTINEL = "\x00GLIMPROUTER_CONTINUE\x00"


class LogitsEngine(Engine):
    def __init__(self, model: TokenModel) -> None:
        self.model = model
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=model.backend)
        self._piece_cache: dict[int, str] = {}
        self.info = ModelInfo(
            model_id=model.model_id,
            backend=model.backend,
            vocab_size=model.vocab_size,
            context_length=model.context_length,
            eos_token_ids=tuple(model.eos_token_ids),
            bos_token_id=model.bos_token_id,
            has_chat_template=model.chat_template_text([ChatMessage("user", "x")], True) is not None,
            tokenizer_fingerprint=model.tokenizer_fingerprint(),
            think_start=model.think_start,
            think_end=model.think_end,
        )

    # ---- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        await self._run(self.model.warmup)

    async def close(self) -> None:
        await self._run(self.model.close)
        self._thread.shutdown(wait=False)

    # ---- text helpers ------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos)

    def token_text(self, token_ids: Sequence[int]) -> str:
        return b"".join(self.model.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    def _piece(self, token_id: int) -> str:
        text = self._piece_cache.get(token_id)
        if text is None:
            text = self.model.token_bytes(token_id).decode("utf-8", errors="replace")
            self._piece_cache[token_id] = text
        return text

    def render_prompt(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool, continue_final_message: bool
    ) -> tuple[list[int], str]:
        msgs = list(messages)
        if continue_final_message:
            # Render with a sentinel in place of the final message's end, then cut
            # there: the template's end-of-turn tokens must not follow the text.
            last = msgs[-1]
            msgs[-1] = ChatMessage(last.role, last.content + _SENTINEL)
            text = self.model.chat_template_text(msgs, False)
            if text is None:
                text = "".join(m.content for m in msgs)
            text = text[: text.index(_SENTINEL)]
        else:
            text = self.model.chat_template_text(msgs, add_generation_prompt)
            if text is None:
                text = "\n\n".join(m.content for m in msgs)
        return self.model.tokenize(text, True), text

    # ---- the three calls -----------------------------------------------------------
    async def glimpse(self, prompt: list[int], top_k: int, session_id: str, cancel: CancelToken) -> Glimpse:
        return await self._run(self._glimpse_sync, prompt, top_k, session_id, time.perf_counter())

    async def step(
        self,
        prompt: list[int],
        method: EntropyMethod,
        threshold: float,
        top_k: int,
        sampling: SamplingParams,
        stop: StopParams,
        session_id: str,
        cancel: CancelToken,
    ) -> StepResult:
        def run(enqueued: float) -> StepResult:
            started = time.perf_counter()
            g, pre = self._glimpse_with_logits(prompt, top_k, session_id, enqueued)
            value = g.entropy(method)
            if value >= threshold:
                return StepResult(Decision.ESCALATE, value, g)
            gen: Generation | None = None
            for chunk in self._generate_sync(
                prompt, sampling, stop, cancel, False, top_k, pre, started, g.timings.queue_ms
            ):
                gen = chunk.final or gen
            assert gen is not None
            gen.usage.cached_tokens, gen.usage.prefilled_tokens = g.usage.cached_tokens, g.usage.prefilled_tokens
            return StepResult(Decision.KEEP, value, g, gen)

        return await self._run(run, time.perf_counter())

    async def generate(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        stop: StopParams,
        session_id: str,
        cancel: CancelToken,
        return_entropies: bool = False,
        top_k: int = 20,
    ) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        enqueued = time.perf_counter()

        def produce() -> None:
            try:
                started = time.perf_counter()
                pre = self._prefill(session_id, prompt)
                for chunk in self._generate_sync(
                    prompt, sampling, stop, cancel, return_entropies, top_k, pre, started,
                    (started - enqueued) * 1e3,
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, chunk)
            except BaseException as exc:  # delivered to the awaiting side
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        future = loop.run_in_executor(self._thread, produce)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # A caller that stops reading (cancelled RPC) stops the model too.
            cancel.cancel()
            await asyncio.shield(future)

    # ---- synchronous internals, run on the model thread ----------------------------
    async def _run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _prefill(self, session_id: str, prompt: list[int]) -> tuple[Prefill, float]:
        t0 = time.perf_counter()
        pre = self.model.prefill(session_id, prompt)
        return pre, (time.perf_counter() - t0) * 1e3

    def _glimpse_sync(self, prompt: list[int], top_k: int, session_id: str, enqueued: float) -> Glimpse:
        return self._glimpse_with_logits(prompt, top_k, session_id, enqueued)[0]

    def _glimpse_with_logits(
        self, prompt: list[int], top_k: int, session_id: str, enqueued: float
    ) -> tuple[Glimpse, tuple[Prefill, float]]:
        started = time.perf_counter()
        pre = self._prefill(session_id, prompt)
        dist = ent.summarize(pre[0].logits, top_k)
        usage = Usage(len(prompt), pre[0].cached_tokens, len(prompt) - pre[0].cached_tokens, 0)
        total = (time.perf_counter() - enqueued) * 1e3
        timings = Timings((started - enqueued) * 1e3, pre[1], 0.0, total)
        top = [TokenLogprob(t, self._piece(t), lp) for t, lp in zip(dist.top_ids, dist.top_logprobs)]
        return (
            Glimpse(dist.greedy_id, self._piece(dist.greedy_id), dist.entropy_full, dist.entropy_top_k, top, usage, timings),
            pre,
        )

    def _generate_sync(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        stop: StopParams,
        cancel: CancelToken,
        return_entropies: bool,
        top_k: int,
        pre: tuple[Prefill, float],
        started: float,
        queue_ms: float,
    ) -> Iterator[Chunk]:
        prefill, prefill_ms = pre
        rng = np.random.default_rng(sampling.seed)
        cutter = StepCutter(self.model.token_bytes, stop.step_boundary, stop.stop)
        eos = set(self.model.eos_token_ids) if stop.stop_on_eos else set()
        logits = prefill.logits
        produced: list[int] = []
        entropies: list[float] = []
        finish = FinishReason.LENGTH
        decode_started = time.perf_counter()
        room = self.model.context_length - len(prompt)
        while len(produced) < sampling.max_tokens:
            if cancel.cancelled:
                finish = FinishReason.CANCELLED
                break
            token = sample(logits, sampling, rng)
            produced.append(token)
            h = []
            if return_entropies:
                h = [ent.top_k_entropy(logits[ent.top_k_ids(logits, top_k)])]
                entropies.extend(h)
            if token in eos:
                finish = FinishReason.EOS
                yield Chunk([token], cutter.flush(), h)
                break
            text = cutter.feed(token)
            if cutter.done is not None:
                finish = cutter.done
                yield Chunk([token], text + cutter.flush(), h)
                break
            yield Chunk([token], text, h)
            if len(produced) >= room:
                finish = FinishReason.CONTEXT
                break
            if len(produced) < sampling.max_tokens:
                logits = self.model.decode(token)
        if finish is FinishReason.CANCELLED:
            observe.generation_cancelled(self.model.model_id, len(produced))
        if finish not in (FinishReason.EOS, FinishReason.STEP_END, FinishReason.STOP):
            tail = cutter.flush()
            if tail:
                yield Chunk([], tail)
        now = time.perf_counter()
        usage = Usage(len(prompt), prefill.cached_tokens, len(prompt) - prefill.cached_tokens, len(produced))
        timings = Timings(queue_ms, prefill_ms, (now - decode_started) * 1e3, (now - started) * 1e3 + queue_ms)
        final = Generation(
            token_ids=produced,
            text=cutter.text,
            finish_reason=finish,
            usage=usage,
            timings=timings,
            entropies=entropies,
            matched_stop=cutter.matched_stop,
        )
        yield Chunk([], "", [], final)
