"""The step loop: plain Python over two WorkerClients, a writer and an `emit`.

One turn of a session: the policy writes steps (each ending at "\\n\\n") until
thinking ends, then one model may write the answer. Per step the loop emits
StepStart as soon as the writer is decided, StepDeltas as the writer produces
text, and Step once the step is stored: every step is handed to the writer
(Redis in production) as one record plus the tokens it appends to each prefix
view, and a step that was not stored was not made. Everything the loop needs to
continue is in those records, so a turn interrupted anywhere resumes from its
last stored step.

A worker that fails in the middle of a step (after some of it streamed) makes the
loop write the step again from its start, on another replica when there is one:
a new StepStart with the same index and attempt + 1 (clients drop the earlier
attempt's deltas). Nothing of the failed attempt was stored.

Prefix views: in token mode both models read one prefix ("shared") of token ids;
in text mode each model has its own ("small", "large"): its own rendering of the
prompt plus its own tokenization of every step's text.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import AsyncIterator, Awaitable, Callable, Protocol

from services.router import spans
from services.router.api.types import (
    AnswerBy,
    AnswerDelta,
    CatchUp,
    Decision,
    Done,
    Event,
    PrefixMode,
    Role,
    RoleStats,
    Stats,
    StepDelta,
    StepStart,
)
from services.router.catchup import DEFAULT_CHUNK_TOKENS, EagerCatchUp
from services.router.errors import SessionCancelled, WorkerFault
from services.router.policies import Policy, StepOutcome
from services.router.session import STEP_BOUNDARY, Kind, Record, SessionOptions, TurnState, views_for
from services.router.worker_client import WorkerClient
from services.worker.prompt_delta import Continued
from services.worker.types import (
    Chunk,
    Decided,
    Decision as StepDecision,
    EntropyMethod,
    FinishReason,
    Gate,
    GenerateRequest,
    Generation,
    Glimpse,
    SamplingParams,
    StopParams,
    Timings,
    Usage,
)

Emit = Callable[[Event], Awaitable[None]]
Entries = list[tuple[Record, dict[str, list[int]]]]


class Writer(Protocol):
    async def append(self, entries: Entries, fields: dict[str, str], *, turn_end: bool = False) -> None:
        """Store the records and their tokens atomically, or raise (nothing stored).
        `turn_end`: the turn's last write (the session's lease may be let go with it)."""


def step_seed(seed: int, index: int) -> int:
    # Distinct, reproducible seeds per step: a resumed step samples as it would have.
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def answer_writer(options: SessionOptions, think: bool) -> Role | None:
    by = options.answer_by or (AnswerBy.LARGE if think else AnswerBy.NONE)
    return {AnswerBy.LARGE: Role.LARGE, AnswerBy.SMALL: Role.SMALL}.get(by)


def needs_answer(options: SessionOptions, think: bool, thinking_end: str) -> bool:
    # A model that ended its turn (EOS) or filled its context has nothing to add.
    return answer_writer(options, think) is not None and thinking_end not in ("eos", "context")


class _Ctx:
    """The StepContext a policy sees for one attempt at one step: it times the worker
    calls and turns the shown writer's output into StepStart and StepDelta events."""

    def __init__(self, loop: "StepLoop", index: int, max_tokens: int, attempt: int) -> None:
        self.loop = loop
        self.index = index
        self.attempt = attempt
        self.seed = step_seed(loop.state.seed, index)
        r = loop.options.routing
        self.fused = r.glimpse_mode.value == "fused"
        self.method = EntropyMethod.FULL if r.entropy.value == "full" else EntropyMethod.TOP_K
        self.top_k = r.top_k
        self.history = loop.state.session_steps
        s = loop.options.sampling
        self.sampling = SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=self.seed, max_tokens=max_tokens)
        self.stop = StopParams(STEP_BOUNDARY, (loop.state.think_end,) if loop.state.think else (), True)
        self.worker_ms = 0.0
        self.started: Role | None = None
        # Prompt tokens this attempt's calls prefilled while the request waited.
        self.prefill_tokens = 0
        self.prefill_ms = 0.0

    def _prefilled(self, usage: Usage, timings: Timings) -> None:
        self.prefill_tokens += usage.prefilled_tokens
        self.prefill_ms += timings.prefill_ms

    def _prefix(self, role: Role) -> list[int]:
        return self.loop.state.prefixes[self.loop.views[role]]

    def _request(self, role: Role, return_entropies: bool = False) -> GenerateRequest:
        return GenerateRequest(
            self._prefix(role), self.sampling, self.stop, self.loop.state.session_id, return_entropies, self.top_k
        )

    async def _timed(self, coro):
        t0 = time.perf_counter()
        try:
            return await coro
        finally:
            self.worker_ms += (time.perf_counter() - t0) * 1e3

    # ---- what a policy calls ------------------------------------------------------------
    async def announce(self, role: Role, value: float, threshold: float) -> None:
        self.started = role
        if self.loop.catchup is not None:
            self.loop.catchup.step_written_by(role)
        decision = Decision.SMALL if role is Role.SMALL else Decision.LARGE
        await self.loop.emit(StepStart(self.index, self.loop.state.turn, role, self.loop.worker(role).info.model_id,
                                       decision, value, threshold, self.attempt))

    async def _pass_on(self, token_ids, text: str) -> None:
        """A piece of the step being written: to the client, and to the other model (catch-up)."""
        if text or token_ids:
            self.loop.follow(token_ids, text)
            await self.loop.emit(StepDelta(self.index, text, len(token_ids),
                                           list(token_ids) if self.loop.include_token_ids else []))

    async def _read(self, stream: AsyncIterator, tau: float = math.nan) -> tuple[Decided | None, Generation | None]:
        """Reads a worker's stream to its end: each piece of the step is passed on, a fused
        Step's head (the decision) is kept and on KEEP announces the small model. Returns
        the head (None for a plain generation) and the final generation (None if it never
        came). The waits for items count as worker time (the time taken to pass them on
        does not), timed here rather than by a wrapping generator that every item of
        every step would pay for."""
        head: Decided | None = None
        final: Generation | None = None
        async with contextlib.aclosing(stream) as items:
            since: float | None = time.perf_counter()
            try:
                async for item in items:
                    self.worker_ms += (time.perf_counter() - since) * 1e3
                    since = None
                    if isinstance(item, Decided):
                        head = item
                        if item.decision is StepDecision.KEEP:
                            await self.announce(Role.SMALL, item.entropy, tau)
                    else:  # on ESCALATE no chunk follows: the large model writes the step
                        await self._pass_on(item.token_ids, item.text)
                        if item.final is not None:
                            final = item.final
                    since = time.perf_counter()
            finally:
                if since is not None:
                    self.worker_ms += (time.perf_counter() - since) * 1e3
        return head, final

    async def _show(self, chunks: AsyncIterator[Chunk]) -> Generation:
        _, final = await self._read(chunks)
        if final is None:
            raise WorkerFault("the worker's stream ended without its final chunk")
        self._prefilled(final.usage, final.timings)
        return final

    async def glimpse(self) -> Glimpse:
        g = await self._timed(self.loop.small.glimpse(self._prefix(Role.SMALL), self.top_k))
        self._prefilled(g.usage, g.timings)
        return g

    async def write(self, role: Role, value: float = math.nan, threshold: float = math.nan) -> Generation:
        await self.announce(role, value, threshold)
        return await self._show(self.loop.worker(role).generate_stream(self._request(role)))

    async def draft(self, role: Role, return_entropies: bool = False) -> Generation:
        gen = await self._timed(self.loop.worker(role).generate(self._request(role, return_entropies)))
        self._prefilled(gen.usage, gen.timings)
        return gen

    async def keep(self, role: Role, draft: Generation, value: float = math.nan, threshold: float = math.nan) -> None:
        await self.announce(role, value, threshold)
        await self._pass_on(draft.token_ids, draft.text)

    async def fused_step(self, tau: float) -> StepOutcome:
        stream = self.loop.small.step_stream(self._request(Role.SMALL), Gate(self.method, tau))
        head, gen = await self._read(stream, tau)
        if head is None:
            raise WorkerFault("the small worker's Step stream ended without a decision")
        if head.decision is StepDecision.ESCALATE:
            self._prefilled(head.glimpse.usage, head.glimpse.timings)
            return StepOutcome(Role.LARGE, await self.write(Role.LARGE, head.entropy, tau), head.entropy, tau, glimpses=1)
        if gen is None:
            raise WorkerFault("the small worker's Step stream ended without its final chunk")
        self._prefilled(gen.usage, gen.timings)  # the glimpse's prefill is this call's
        return StepOutcome(Role.SMALL, gen, head.entropy, tau, glimpses=1)

    async def score(self, draft: Generation, judge_text: str, top_k: int) -> Glimpse:
        large = self.loop.large
        if self.loop.state.mode is PrefixMode.TOKENS:
            draft_ids = draft.token_ids
        else:
            draft_ids = await self._timed(large.tokenize(draft.text))
        judge = await self.loop.cached_tokens(Role.LARGE, judge_text)
        g = await self._timed(large.glimpse(Continued(self._prefix(Role.LARGE), list(draft_ids) + judge), top_k))
        self._prefilled(g.usage, g.timings)
        return g


class StepLoop:
    def __init__(
        self,
        state: TurnState,
        options: SessionOptions,
        policy: Policy,
        small: WorkerClient,
        large: WorkerClient,
        writer: Writer,
        emit: Emit,
        *,
        include_token_ids: bool = False,
        max_session_steps: int = 0,
        attempts: int = 3,
        token_cache: dict | None = None,
        catch_up: CatchUp = CatchUp.LAZY,
        catch_up_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        self.state = state
        self.options = options
        self.policy = policy
        self.small = small
        self.large = large
        self.writer = writer
        self.emit = emit
        self.include_token_ids = include_token_ids
        self.max_session_steps = max_session_steps
        self.attempts = max(1, attempts)
        self.views = views_for(state.mode)
        # Tokens of constant texts (the answer's join, the verify judge) per model: the
        # same for every session, so a router shares one cache.
        self._token_cache: dict[tuple[Role, str], list[int]] = {} if token_cache is None else token_cache
        # The session's own choice, else the router's default.
        self.catch_up = options.routing.catch_up or catch_up
        self.catch_up_tokens = catch_up_tokens
        self.catchup: EagerCatchUp | None = None

    def worker(self, role: Role) -> WorkerClient:
        return self.small if role is Role.SMALL else self.large

    def follow(self, ids, text: str) -> None:
        """A piece of the step being written: eager catch-up passes it to the other model."""
        if self.catchup is not None:
            self.catchup.tokens(ids, text)

    async def cached_tokens(self, role: Role, text: str) -> list[int]:
        key = (role, text)
        if key not in self._token_cache:
            self._token_cache[key] = await self.worker(role).tokenize(text)
        return list(self._token_cache[key])

    async def _tokens_by_view(self, writer: Role, ids: list[int], text: str) -> dict[str, list[int]]:
        """The tokens one piece of text appends to each view: the writer's own ids,
        and in text mode the other model's tokenization of the same text."""
        if self.state.mode is PrefixMode.TOKENS:
            return {"shared": list(ids)}
        other = Role.LARGE if writer is Role.SMALL else Role.SMALL
        return {self.views[writer]: list(ids), self.views[other]: await self.worker(other).tokenize(text)}

    async def _text_tokens(self, text: str) -> dict[str, list[int]]:
        if self.state.mode is PrefixMode.TOKENS:
            return {"shared": await self.cached_tokens(Role.SMALL, text)}
        return {self.views[r]: await self.cached_tokens(r, text) for r in (Role.SMALL, Role.LARGE)}

    async def _store(self, entries: Entries, fields: dict[str, str], turn_end: bool = False) -> None:
        ends = {v: len(ids) for v, ids in self.state.prefixes.items()}
        for record, tokens in entries:
            for v, t in tokens.items():
                ends[v] += len(t)
            record.prefix_end = dict(ends)
        await self.writer.append(entries, fields, turn_end=turn_end)
        for record, tokens in entries:  # only after the store accepted them do the records count
            self.state.accept(record, tokens)
        if self.catchup is not None:
            self.catchup.stored()

    # ---- the turn ------------------------------------------------------------------
    async def run(self) -> None:
        if self.catch_up is CatchUp.EAGER:
            self.catchup = EagerCatchUp(
                {Role.SMALL: self.small, Role.LARGE: self.large}, self._callers,
                lambda role: self.state.prefixes[self.views[role]], self.state.mode, self.catch_up_tokens,
                first=self.policy.first,
            )
            self.catchup.stored()  # the prompt (or the steps a resumed turn starts from)
        try:
            await self._run()
        finally:
            if self.catchup is not None:
                await self.catchup.close()  # a pending catch-up stops with the turn

    def _callers(self) -> frozenset[Role]:
        """The models this turn may still call (eager catch-up follows only those): the
        policy's while thinking, then the answer's writer until the answer is stored."""
        st = self.state
        answer = answer_writer(self.options, st.think)
        if not st.thinking_end:
            return self.policy.reads | ({answer} if answer is not None else frozenset())
        if answer is not None and st.answer_record is None and needs_answer(self.options, st.think, st.thinking_end):
            return frozenset({answer})
        return frozenset()

    async def _run(self) -> None:
        started = time.perf_counter()
        st = self.state
        while not st.thinking_end:
            await self._step()
        answer = self._steps_answer()
        answer_end = "none"
        done = st.answer_record
        if done is None and needs_answer(self.options, st.think, st.thinking_end):
            role = answer_writer(self.options, st.think)
            assert role is not None
            with spans.answer(role.value, self.worker(role).info.model_id, st.session_id) as span:
                await self._answer(role, span)
            done = st.answer_record
        if done is not None:
            answer = (answer + done.text) if not st.think else done.text
            answer_end = done.finish_reason
        await self.emit(Done(st.session_id, answer.strip(), turn_stats(st, answer_end, (time.perf_counter() - started) * 1e3)))

    def _steps_answer(self) -> str:
        # Plain instruct models: the steps are the reply. Thinking models: the answer
        # comes after </think>.
        return "" if self.state.think else "".join(r.text for r in self.state.turn_steps)

    def _end_reason(self, gen: Generation) -> str:
        st, b = self.state, self.options.budgets
        text = gen.text
        if gen.finish_reason is FinishReason.CANCELLED:
            raise SessionCancelled("a worker cancelled the step")
        if st.think and (gen.matched_stop == st.think_end or st.think_end in text):
            return "think_end"
        if gen.finish_reason is FinishReason.EOS:
            return "eos"
        if gen.finish_reason is FinishReason.CONTEXT:
            return "context"
        if st.turn_steps and st.turn_steps[-1].text == text:
            return "repetition"
        if st.turn_tokens + len(gen.token_ids) >= b.thinking_tokens:
            return "budget"
        if b.max_steps and len(st.turn_steps) + 1 >= b.max_steps:
            return "max_steps"
        if self.max_session_steps and len(st.session_steps) + 1 >= self.max_session_steps:
            return "session_steps"
        return ""

    async def _step(self) -> None:
        st, b = self.state, self.options.budgets
        index = len(st.session_steps)
        t0 = time.perf_counter()
        max_tokens = max(1, min(b.step_tokens, b.thinking_tokens - st.turn_tokens))
        with spans.step(self.policy, self.options, st.session_id, st.turn, index) as span:
            for attempt in range(1, self.attempts + 1):
                ctx = _Ctx(self, index, max_tokens, attempt)
                try:
                    outcome = await self.policy.write_step(ctx)
                    break
                except WorkerFault:
                    # Part of the step may have streamed: write it again from its start
                    # (the failed replica is out of the pool's healthy set by now).
                    if attempt == self.attempts:
                        raise
                    spans.restarted(span, attempt)
            gen = outcome.generation
            end = self._end_reason(gen)
            writer = outcome.writer
            tokens = await ctx._timed(self._tokens_by_view(writer, gen.token_ids, gen.text))
            if ctx.started is not writer:  # a policy that wrote without announcing: announce now
                await ctx.keep(writer, gen, outcome.value, outcome.threshold)
            record = Record(
                kind=Kind.STEP,
                turn=st.turn,
                index=index,
                role=writer.value,
                model_id=self.worker(writer).info.model_id,
                decision=writer.value,
                entropy=float(outcome.value),
                threshold=float(outcome.threshold),
                text=gen.text,
                tokens=len(gen.token_ids),
                discarded_tokens=outcome.discarded_tokens,
                glimpses=outcome.glimpses,
                cached_tokens=gen.usage.cached_tokens,
                prefilled_tokens=gen.usage.prefilled_tokens,
                latency_ms=(time.perf_counter() - t0) * 1e3,
                worker_ms=ctx.worker_ms,
                finish_reason=gen.finish_reason.value,
                critical_prefill_tokens=ctx.prefill_tokens,
                critical_prefill_ms=ctx.prefill_ms,
                end_reason=end,
            )
            fields = {"steps": str(index + 1)}
            done = bool(end) and not needs_answer(self.options, st.think, end)
            if done:
                fields.update(status="done", answer=(self._steps_answer() + gen.text).strip())
            await self._store([(record, tokens)], fields, turn_end=done)
            spans.step_done(span, self.policy, self.options, record, st.session_id)
        # The stream reports the step's full time, including the store write.
        record.latency_ms = (time.perf_counter() - t0) * 1e3
        await self.emit(record.step(list(gen.token_ids) if self.include_token_ids else None))

    async def _answer(self, role: Role, span) -> None:
        st = self.state
        t0 = time.perf_counter()
        entries: Entries = []
        join: dict[str, list[int]] = {v: [] for v in set(self.views.values())}
        if st.think:
            # As the paper's code frames the answer: "<think>{steps}\n</think>\n\n".
            text = "\n\n" if st.thinking_end == "think_end" else f"\n{st.think_end}\n\n"
            join = await self._text_tokens(text)
            entries.append((Record(Kind.JOIN, st.turn, text=text), join))
        worker = self.worker(role)
        view = self.views[role]
        b, s = self.options.budgets, self.options.sampling
        sampling = SamplingParams(
            temperature=s.temperature, top_p=s.top_p, seed=step_seed(st.seed, -1 - st.turn), max_tokens=b.answer_tokens
        )
        stop = StopParams(step_boundary="", stop=(), stop_on_eos=True)
        final: Generation | None = None
        worker_t0 = time.perf_counter()
        req = GenerateRequest(Continued(st.prefixes[view], join[view]), sampling, stop, st.session_id)
        first = True
        async with contextlib.aclosing(worker.generate_stream(req)) as chunks:
            async for chunk in chunks:
                if chunk.text:
                    if first:
                        spans.first_chunk(span, time.perf_counter() - t0)
                        first = False
                    await self.emit(AnswerDelta(chunk.text, role, len(chunk.token_ids)))
                if chunk.final is not None:
                    final = chunk.final
        worker_ms = (time.perf_counter() - worker_t0) * 1e3
        if final is None:
            raise RuntimeError("the answer stream ended without a final chunk")
        if final.finish_reason is FinishReason.CANCELLED:
            raise SessionCancelled("a worker cancelled the answer")
        record = Record(
            Kind.ANSWER,
            st.turn,
            role=role.value,
            model_id=worker.info.model_id,
            text=final.text,
            tokens=len(final.token_ids),
            cached_tokens=final.usage.cached_tokens,
            prefilled_tokens=final.usage.prefilled_tokens,
            latency_ms=(time.perf_counter() - t0) * 1e3,
            worker_ms=worker_ms,
            finish_reason=final.finish_reason.value,
            critical_prefill_tokens=final.usage.prefilled_tokens,
            critical_prefill_ms=final.timings.prefill_ms,
        )
        entries.append((record, await self._tokens_by_view(role, final.token_ids, final.text)))
        answer = final.text if st.think else self._steps_answer() + final.text
        await self._store(entries, {"status": "done", "answer": answer.strip()}, turn_end=True)
        spans.answer_done(span, record)


def turn_stats(state: TurnState, answer_end: str, latency_ms: float) -> Stats:
    per = {Role.SMALL.value: RoleStats(), Role.LARGE.value: RoleStats()}
    for r in state.turn_steps:
        rs = per[r.role]
        rs.steps += 1
        rs.generated_tokens += r.tokens
        rs.prefilled_tokens += r.prefilled_tokens
        rs.cached_tokens += r.cached_tokens
        rs.worker_ms += r.worker_ms
        # Glimpses and discarded drafts are the small model's work whoever wrote the step.
        per[Role.SMALL.value].glimpses += r.glimpses
        per[Role.SMALL.value].discarded_tokens += r.discarded_tokens
    answer = state.answer_record
    if answer is not None:
        per[answer.role].generated_tokens += answer.tokens
    steps = len(state.turn_steps)
    large = per[Role.LARGE.value].steps
    # The turn's first record (its prompt, or a later turn's messages) ends where the
    # prompt of this turn ends.
    first = state.turn_records[0] if state.turn_records else None
    prompt_view = views_for(state.mode)[Role.SMALL]
    prompt_tokens = first.prefix_end.get(prompt_view, 0) if first is not None and first.kind in (Kind.PROMPT, Kind.TURN) else 0
    return Stats(
        prompt_tokens=prompt_tokens,
        latency_ms=latency_ms,
        steps=steps,
        intervention_rate=(large / steps) if steps else 0.0,
        small=per[Role.SMALL.value],
        large=per[Role.LARGE.value],
        thinking_tokens=state.turn_tokens,
        answer_tokens=answer.tokens if answer is not None else 0,
        thinking_end=state.thinking_end,
        answer_end=answer_end if answer is not None else "none",
        resumed_steps=state.resumed_steps,
    )
