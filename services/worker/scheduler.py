"""The Engine for logits-level backends (llama.cpp, sim): one scheduler owns the
model's context and decodes every request in flight together, as llama.cpp's
server does with its slots.

Each request in flight holds one sequence ("slot") of the context. One thread
runs the loop; each iteration it
  1. admits waiting requests to free slots, picking the slot whose KV state
     shares the longest prefix with the prompt (the session's own, else the
     least recently used; the state of a session leaving a slot is saved to the
     snapshot cache and restored when it returns),
  2. builds one batch: the next token of every decoding request, then prompt
     tokens of requests still prefilling, at most `prefill_chunk` of them while
     others decode (a long prompt must not stall them) and up to the batch size
     when nothing decodes,
  3. evaluates it with one backend call and hands each request its own logits
     row: a glimpse reads the distribution and ends, a Step decides, a
     generation samples its next token.
Glimpse, Step and Generate are kinds of one request type here, not separate
code paths. Results reach the asyncio side once per iteration; chunks that
pile up between two reads are merged, so a stream carries one message per
batch at most.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

import numpy as np

from services.worker import entropy as ent
from services.worker import observe
from services.worker.batch import Batch, BatchModel
from services.worker.decoding import Decoding
from services.worker.engine import CancelToken, Engine, EngineError
from services.worker.kvcache import Snapshot, SnapshotCache
from services.worker.prompts import render_prompt
from services.worker.types import (
    ChatMessage,
    Chunk,
    Decided,
    Decision,
    Extension,
    FinishReason,
    Gate,
    GenerateRequest,
    Generation,
    Glimpse,
    ModelInfo,
    StepResult,
    Timings,
    TokenLogprob,
    Usage,
)

log = logging.getLogger("glimprouter.worker.scheduler")

DEFAULT_PREFILL_CHUNK = 128


class Kind(enum.Enum):
    GLIMPSE = "glimpse"
    STEP = "step"
    GENERATE = "generate"
    # Catch-up prefill (the router's Extend): a session's KV state grows ahead of its
    # next real call, at the lowest priority, and gives way to any real request.
    EXTEND = "extend"


_END = object()  # the last item delivered to a request's consumer


@dataclass
class Stats:
    """Counters the tests (and metrics) read instead of timing."""

    evaluated_tokens: int = 0
    batches: int = 0
    max_batch_sequences: int = 0  # the most requests one batch carried
    restores: int = 0


class Slot:
    """One sequence of the context and what its KV state holds."""

    __slots__ = ("seq", "tokens", "session", "logits", "job", "last_used")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.tokens: list[int] = []  # positions 0..n-1 of the sequence's KV state
        self.session = ""  # whose state it is ("" anonymous)
        self.logits: np.ndarray | None = None  # next-token logits after tokens[-1], when kept
        self.job: Job | None = None
        self.last_used = 0.0


class Job:
    """One request, from submission to its last result."""

    def __init__(
        self, kind: Kind, prompt: Sequence[int], session_id: str, cancel: CancelToken, stream: bool,
        req: GenerateRequest | None = None, gate: Gate | None = None, top_k: int = 20,
    ) -> None:
        self.kind, self.prompt, self.session = kind, list(prompt), session_id
        self.cancel, self.stream, self.req, self.gate, self.top_k = cancel, stream, req, gate, top_k
        self.enqueued = time.perf_counter()
        self.admitted = self.prefilled = 0.0
        self.slot: Slot | None = None
        self.cached = 0  # prompt tokens found in the KV state
        self.ready: np.ndarray | None = None  # logits already known for the whole prompt
        self.decoding: Decoding | None = None
        self.next_token: int | None = None  # sampled, to be evaluated in the next batch
        self.done = False
        # Delivery to the asyncio side: the scheduler thread fills `out` during an
        # iteration and hands it over at its end; the consumer reads `inbox`.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.out: list = []
        self.inbox: list = []
        self.event: asyncio.Event | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share. A placement asks it of every idle
    sequence, most of which share only the chat template's first tokens with the
    prompt: so unless the last shared position agrees (most likely an extension: one
    comparison), it compares blocks that double in size (a difference near the start
    costs one small comparison), then halves the block that differs; all comparisons
    are C-level slices, never a Python loop over the tokens."""
    n = min(len(a), len(b))
    if n and a[n - 1] == b[n - 1]:  # most likely an extension: one comparison (the shorter one not copied)
        if (a if len(a) == n else a[:n]) == (b if len(b) == n else b[:n]):
            return n
    i, size = 0, 32
    while i < n:
        j = min(n, i + size)
        if a[i:j] != b[i:j]:
            break
        i, size = j, size * 2
    else:
        return n
    while j - i > 8:  # the first difference is in [i, j)
        m = (i + j) // 2
        if a[i:m] == b[i:m]:
            i = m
        else:
            j = m
    while a[i] == b[i]:
        i += 1
    return i


class Scheduler(Engine):
    def __init__(
        self, model: BatchModel, *, kv_cache_bytes: int = 2 * 1024**3, kv_reuse: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        self.model = model
        self.kv_reuse = kv_reuse  # off only to measure what reuse saves: every request starts empty
        self.prefill_chunk = max(1, min(prefill_chunk, model.n_batch))
        self.snapshots = SnapshotCache(kv_cache_bytes)
        self.stats = Stats()
        self._metrics = observe.SchedulerMetrics(model.model_id)
        self._slots = [Slot(i) for i in range(model.n_seq)]
        self._pieces: dict[int, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Job] = deque()
        self._extends: deque[Job] = deque()  # catch-ups wait here, behind every real request
        self._active: list[Job] = []  # admitted, in admission order
        self._outbox: list[Job] = []  # jobs with results to deliver after this iteration
        self._closed = False
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
        self._thread = threading.Thread(target=self._run, name=f"{model.backend}-scheduler", daemon=True)
        self._thread.start()

    # ---- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        # One evaluation, so the first real request does not pay for warming up.
        await self.glimpse(self.tokenize("Hello", add_bos=True), 1, "", CancelToken())

    async def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self.snapshots.clear()
        self.model.close()

    def describe(self) -> str:
        return f"{self.model.describe()} prefill_chunk={self.prefill_chunk} kv_cache_bytes={self.snapshots.max_bytes}"

    @property
    def cached_bytes(self) -> int:
        """Bytes held by saved session states (bounded by kv_cache_bytes)."""
        return self.snapshots.bytes

    # ---- text helpers -------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self.model.tokenize(text, add_bos)

    def token_text(self, token_ids: Sequence[int]) -> str:
        return b"".join(self.model.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    def _piece(self, token_id: int) -> str:
        text = self._pieces.get(token_id)
        if text is None:
            text = self._pieces[token_id] = self.model.token_bytes(token_id).decode("utf-8", errors="replace")
        return text

    def render_prompt(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool, continue_final_message: bool
    ) -> tuple[list[int], str]:
        return render_prompt(self.model, messages, add_generation_prompt, continue_final_message)

    # ---- the calls ------------------------------------------------------------------------
    async def glimpse(self, prompt: list[int], top_k: int, session_id: str, cancel: CancelToken) -> Glimpse:
        async for item in self._submit(Job(Kind.GLIMPSE, prompt, session_id, cancel, False, top_k=top_k)):
            return item
        raise RuntimeError("glimpse ended without a result")

    def step(self, req: GenerateRequest, gate: Gate, cancel: CancelToken, stream: bool = True) -> AsyncIterator[Decided | Chunk]:
        return self._submit(Job(Kind.STEP, req.prompt, req.session_id, cancel, stream, req, gate, req.top_k))

    def generate(self, req: GenerateRequest, cancel: CancelToken, stream: bool = True) -> AsyncIterator[Chunk]:
        return self._submit(Job(Kind.GENERATE, req.prompt, req.session_id, cancel, stream, req, None, req.top_k))

    async def generate_full(self, req: GenerateRequest, cancel: CancelToken) -> Generation:
        async for chunk in self.generate(req, cancel, stream=False):
            if chunk.final is not None:
                return chunk.final
        raise RuntimeError("generation ended without a final chunk")

    async def step_full(self, req, gate, cancel):
        # Unary: only the decision and the final chunk cross threads, not every token.
        head, final = None, None
        async for item in self.step(req, gate, cancel, stream=False):
            if isinstance(item, Decided):
                head = item
            elif item.final is not None:
                final = item.final
        if head is None:
            raise RuntimeError("step ended without a decision")
        return StepResult(head.decision, head.entropy, head.glimpse, final)

    async def extend(self, prompt: list[int], session_id: str, cancel: CancelToken) -> Extension:
        async for item in self._submit(Job(Kind.EXTEND, prompt, session_id, cancel, False)):
            return item
        raise RuntimeError("extend ended without a result")

    async def _submit(self, job: Job) -> AsyncIterator:
        job.loop = asyncio.get_running_loop()
        job.event = asyncio.Event()
        with self._lock:
            if self._closed:
                raise EngineError("the worker is shutting down")
            (self._extends if job.kind is Kind.EXTEND else self._waiting).append(job)
            self._wake.notify()
        try:
            while True:
                if not job.inbox:
                    job.event.clear()
                    await job.event.wait()
                    continue
                items, job.inbox = job.inbox, []
                for item in _coalesce(items):
                    if item is _END:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            # A consumer that stops reading (cancelled RPC, client gone) frees the
            # sequence at the scheduler's next iteration.
            job.cancel.cancel()

    # ---- the loop (scheduler thread) ---------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._extends and not self._active and not self._closed:
                    self._wake.wait()
                if self._closed:
                    pending = list(self._waiting) + list(self._extends) + self._active
                    self._waiting.clear()
                    self._extends.clear()
                    break
            try:
                self._iteration()
            except Exception as exc:  # a backend failure: fail what was in flight, keep serving
                log.exception("scheduler iteration failed")
                for job in list(self._active):
                    self._fail(job, EngineError(f"the model failed: {exc}"))
                    self._reset(job.slot)
            self._metrics.load(len(self._active), len(self._waiting) + len(self._extends))
            self._deliver()
        for job in pending:
            self._fail(job, EngineError("the worker is shutting down"))
        self._deliver()

    def _iteration(self) -> None:
        self._admit()
        for job in [j for j in self._active if j.cancel.cancelled]:
            self._cancelled(job)
        for job in [j for j in self._active if j.ready is not None]:
            logits, job.ready = job.ready, None
            self._on_logits(job, logits)
        batch, rows_for, caught_up = self._build()
        if not len(batch):
            return
        logits = self.model.decode(batch)
        sequences = len(set(batch.seqs))
        self.stats.batches += 1
        self.stats.evaluated_tokens += len(batch)
        self.stats.max_batch_sequences = max(self.stats.max_batch_sequences, sequences)
        self._metrics.batch(sequences, len(batch), self.snapshots.bytes)
        for job, row in zip(rows_for, logits):
            self._on_logits(job, row)
        for job in caught_up:
            self._finish_extend(job)

    def _admit(self) -> None:
        """Real requests first; then catch-ups, into sequences nobody else wants."""
        while True:
            with self._lock:
                if not self._waiting:
                    break
                job = self._waiting[0]
            # A catch-up of this session gives its sequence (and what it prefilled so
            # far) to the real call; any catch-up gives way when no sequence is free.
            for ext in [j for j in self._active if j.kind is Kind.EXTEND and j.session == job.session and job.session]:
                self._finish_extend(ext)
            idle = [s for s in self._slots if s.job is None]
            if not idle:
                ext = next((j for j in self._active if j.kind is Kind.EXTEND), None)
                if ext is None:
                    break
                self._finish_extend(ext)
                continue
            with self._lock:
                self._waiting.popleft()
            self._start(job, idle)
        while True:
            idle = [s for s in self._slots if s.job is None]
            with self._lock:
                if not self._extends or not idle:
                    return
                job = self._extends.popleft()
            if any(j.session == job.session for j in self._active):
                # The session is being served: its real call prefills what it needs.
                job.admitted = job.prefilled = time.perf_counter()
                self._emit(job, Extension(Usage(len(job.prompt), 0, 0, 0), Timings()))
                self._release(job)
                self._emit(job, _END)
                continue
            self._start(job, idle)

    def _start(self, job: Job, idle: list[Slot]) -> None:
        if job.cancel.cancelled:
            self._fail(job, asyncio.CancelledError())
            return
        job.admitted = time.perf_counter()
        self._place(job, idle)
        self._active.append(job)
        if job.kind is Kind.EXTEND and len(job.slot.tokens) >= len(job.prompt):
            self._finish_extend(job)  # it holds all of it already

    def _place(self, job: Job, idle: list[Slot]) -> None:
        """Give the job a sequence, reusing as much KV state as it can."""
        prompt, sid = job.prompt, job.session
        snap = self.snapshots.get(sid) if sid and self.kv_reuse else None
        from_snap = common_prefix(snap.tokens, prompt) if snap is not None else 0

        def score(s: Slot):
            own = common_prefix(s.tokens, prompt) if self.kv_reuse else 0
            return (max(own, from_snap), bool(sid) and s.session == sid, not s.tokens, -s.last_used)

        slot = self._own_slot(idle, sid, prompt, from_snap) if sid and self.kv_reuse else None
        if slot is not None:
            own = len(slot.tokens)  # the prompt extends all of it
        else:
            slot = max(idle, key=score)
            if self.kv_reuse and slot.session and slot.session != sid and slot.tokens:
                self._save(slot)  # its session leaves the sequence
            own = common_prefix(slot.tokens, prompt) if self.kv_reuse else 0
        if snap is not None and from_snap > own:
            own = from_snap if self._restore(slot, snap) else 0
        n = len(prompt)
        if job.kind is Kind.EXTEND and own == n:
            # Already held (perhaps with more after it): an extension only ever adds.
            job.cached = n
        elif job.kind is Kind.EXTEND:
            # No logits are needed, so nothing is evaluated again: keep all it shares.
            if own < len(slot.tokens):
                own = self.model.keep(slot.seq, own)
            slot.tokens = prompt[:own]
            slot.logits = None
            job.cached = own
        elif own == n == len(slot.tokens) and slot.logits is not None:
            # The sequence ends exactly at this prompt and its logits were kept (a
            # Generate right after a Glimpse of the same prompt): nothing to evaluate.
            job.ready = slot.logits
            job.cached = n
        else:
            # Logits exist only for the last evaluated position: a fully cached
            # prompt still evaluates its last token.
            keep = min(own, n - 1)
            if keep < len(slot.tokens):
                keep = self.model.keep(slot.seq, keep)
            slot.tokens = prompt[:keep]
            slot.logits = None
            job.cached = keep
        slot.session, slot.job, slot.last_used = sid, job, time.monotonic()
        job.slot = slot

    @staticmethod
    def _own_slot(idle: list[Slot], sid: str, prompt: list[int], from_snap: int) -> Slot | None:
        """The idle sequence holding this session's previous call, when the prompt extends
        all of it and no snapshot holds more (a session's usual next call): the call goes
        there without scoring the other sequences. Scoring compares the prompt with each of
        them, which costs the length of whatever prefix they share (a system prompt every
        session starts with) per sequence, per call. Another sequence could share more only
        by holding a copy of this session's text, and taking it would make the session it
        belongs to prefill again."""
        for s in idle:
            if s.session == sid:
                held = len(s.tokens)
                if from_snap <= held <= len(prompt) and held and common_prefix(s.tokens, prompt) == held:
                    return s
                return None
        return None

    def _build(self) -> tuple[Batch, list[Job], list[Job]]:
        """This iteration's batch, the job each logits row goes to, and the catch-ups
        this batch completes. Decoding requests first, then prompts (real ones
        before catch-ups), at most `prefill_chunk` prompt tokens while anyone decodes.

        Decoding tokens go in ascending sequence order: with one KV stream per
        sequence, llama.cpp evaluates in one pass (ubatch) only runs of consecutive
        sequence ids as they appear in the batch, so admission order (say 3, 1, 2)
        would cost several passes over the weights per token instead of one."""
        batch, rows_for, caught_up = Batch(), [], []
        decoding = False
        for job in sorted(self._active, key=lambda j: j.slot.seq):
            if job.next_token is not None:
                slot = job.slot
                batch.add(job.next_token, slot.seq, len(slot.tokens), True)
                slot.tokens.append(job.next_token)
                job.next_token = None
                rows_for.append(job)
                decoding = True
        budget = min(self.model.n_batch - len(batch), self.prefill_chunk if decoding else self.model.n_batch)
        prompts = sorted(
            (j for j in self._active if not j.done and j.decoding is None and j.ready is None and j.next_token is None),
            key=lambda j: j.kind is Kind.EXTEND,  # stable: admission order within each kind
        )
        for job in prompts:
            if budget <= 0:
                break
            slot = job.slot
            start = len(slot.tokens)
            rest = len(job.prompt) - start
            if rest <= 0:
                continue
            take = min(rest, budget)
            last = take == rest
            batch.tokens.extend(job.prompt[start : start + take])
            batch.seqs.extend([slot.seq] * take)
            batch.positions.extend(range(start, start + take))
            # A catch-up reads no logits: its last token is evaluated like the others.
            batch.wants.extend([False] * (take - 1) + [last and job.kind is not Kind.EXTEND])
            slot.tokens.extend(job.prompt[start : start + take])
            budget -= take
            if last:
                (caught_up if job.kind is Kind.EXTEND else rows_for).append(job)
        return batch, rows_for, caught_up

    def _finish_extend(self, job: Job) -> None:
        """A catch-up is done, or gives way early: what it prefilled stays in the sequence."""
        if job.done:
            return
        slot = job.slot  # its logits were dropped by _place if it was to add anything
        held = min(len(slot.tokens), len(job.prompt)) if slot is not None else job.cached
        job.prefilled = time.perf_counter()
        n = len(job.prompt)
        usage = Usage(n, job.cached, max(0, held - job.cached), 0)
        timings = Timings(
            (job.admitted - job.enqueued) * 1e3, (job.prefilled - job.admitted) * 1e3, 0.0, (job.prefilled - job.enqueued) * 1e3
        )
        self._emit(job, Extension(usage, timings))
        self._release(job)
        self._emit(job, _END)

    # ---- what a logits row means to its job ------------------------------------------------
    def _on_logits(self, job: Job, logits: np.ndarray) -> None:
        if job.decoding is None:  # the prompt's logits
            job.prefilled = time.perf_counter()
            if job.kind is not Kind.GENERATE:
                g = self._glimpse(job, logits)
                if job.kind is Kind.GLIMPSE:
                    self._emit(job, g)
                    self._finish(job, logits)
                    return
                assert job.gate is not None
                value = g.entropy(job.gate.method)
                if value >= job.gate.threshold:
                    self._emit(job, Decided(Decision.ESCALATE, value, g))
                    self._finish(job, logits)
                    return
                self._emit(job, Decided(Decision.KEEP, value, g))
            assert job.req is not None
            room = self.model.context_length - len(job.prompt)
            job.decoding = Decoding(job.req, self.model.token_bytes, self.model.eos_token_ids, room)
        chunk = job.decoding.take(logits)
        if job.stream:
            self._emit(job, chunk)
        if job.decoding.finish is not None:
            self._finish(job, logits)
        else:
            job.next_token = chunk.token_ids[0]

    def _glimpse(self, job: Job, logits: np.ndarray) -> Glimpse:
        dist = ent.summarize(logits, job.top_k)
        n = len(job.prompt)
        usage = Usage(n, job.cached, n - job.cached, 0)
        now = time.perf_counter()
        timings = Timings(
            (job.admitted - job.enqueued) * 1e3, (job.prefilled - job.admitted) * 1e3, 0.0, (now - job.enqueued) * 1e3
        )
        top = [TokenLogprob(t, self._piece(t), lp) for t, lp in zip(dist.top_ids, dist.top_logprobs)]
        return Glimpse(dist.greedy_id, self._piece(dist.greedy_id), dist.entropy_full, dist.entropy_top_k, top, usage, timings)

    def _finish(self, job: Job, logits: np.ndarray | None) -> None:
        """The job is over: its slot keeps the KV state (and the last logits, so a call
        for exactly this prefix evaluates nothing) for whoever comes next."""
        slot = job.slot
        if slot is not None:
            slot.logits = None if logits is None else np.array(logits, dtype=np.float32, copy=True)
        d = job.decoding
        if d is not None:
            now = time.perf_counter()
            n = len(job.prompt)
            usage = Usage(n, job.cached, n - job.cached, len(d.produced))
            timings = Timings(
                (job.admitted - job.enqueued) * 1e3,
                (job.prefilled - job.admitted) * 1e3,
                (now - job.prefilled) * 1e3,
                (now - job.enqueued) * 1e3,
            )
            assert d.finish is not None
            final = Generation(d.produced, d.cutter.text, d.finish, usage, timings, d.entropies, d.cutter.matched_stop)
            self._emit(job, Chunk([], d.tail(), [], final))
        self._release(job)
        self._emit(job, _END)

    def _cancelled(self, job: Job) -> None:
        if job.kind is Kind.EXTEND:
            self._finish_extend(job)
            return
        d = job.decoding
        if d is None:  # nothing written yet: the consumer is gone or going
            self._release(job)
            self._fail(job, asyncio.CancelledError())
            return
        observe.generation_cancelled(self.model.model_id, len(d.produced))
        d.stop(FinishReason.CANCELLED)
        if job.next_token is not None:  # sampled but never evaluated
            job.next_token = None
        self._finish(job, None)

    def _fail(self, job: Job, exc: BaseException) -> None:
        self._release(job)
        self._emit(job, exc)
        self._emit(job, _END)

    def _release(self, job: Job) -> None:
        if job.done:
            return
        job.done = True
        if job in self._active:
            self._active.remove(job)
        slot = job.slot
        if slot is not None and slot.job is job:
            slot.job = None
            slot.last_used = time.monotonic()

    def _reset(self, slot: Slot | None) -> None:
        if slot is not None:
            self.model.keep(slot.seq, 0)
            slot.tokens, slot.logits, slot.session = [], None, ""

    # ---- saved session state ----------------------------------------------------------------
    def _save(self, slot: Slot) -> None:
        if self.snapshots.holds(slot.session, slot.tokens):
            self.snapshots.touch(slot.session)
            return
        state = self.model.save(slot.seq)
        if state is not None:
            self.snapshots.put(slot.session, Snapshot(list(slot.tokens), state))

    def _restore(self, slot: Slot, snap: Snapshot) -> bool:
        slot.logits = None
        if not self.model.load(slot.seq, snap.state):
            # A failed restore leaves the sequence empty: start from nothing.
            slot.tokens = []
            self.snapshots.drop(slot.session)
            return False
        slot.tokens = list(snap.tokens)
        self.snapshots.touch(slot.session)
        self.stats.restores += 1
        return True

    # ---- delivery to the asyncio side ------------------------------------------------------
    def _emit(self, job: Job, item) -> None:
        if not job.out:
            self._outbox.append(job)
        job.out.append(item)

    def _deliver(self) -> None:
        """Hand this iteration's results over: one wake-up per event loop, not per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, list]]] = {}
        for job in self._outbox:
            items, job.out = job.out, []
            by_loop.setdefault(job.loop, []).append((job, items))
        self._outbox = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, batch)
            except RuntimeError:  # that event loop is closed: nobody is waiting
                pass


def _hand_over(batch: list[tuple[Job, list]]) -> None:
    for job, items in batch:
        job.inbox.extend(items)
        assert job.event is not None
        job.event.set()


def _coalesce(items: list) -> list:
    """Consecutive plain chunks merged into one (a stream sends what piled up as one message)."""
    out: list = []
    for item in items:
        prev = out[-1] if out else None
        if (
            isinstance(item, Chunk) and item.final is None
            and isinstance(prev, Chunk) and prev.final is None
        ):
            out[-1] = Chunk(prev.token_ids + item.token_ids, prev.text + item.text, prev.entropies + item.entropies)
        else:
            out.append(item)
    return out
