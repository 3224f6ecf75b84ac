"""The step loop: plain Python over two WorkerClients and a writer.

One turn of a session: the policy writes steps (each ending at "\n\n") until
thinking ends, then one model may write the answer. Every step is handed to the
writer (Redis in production) as one record plus the tokens it appends to each
prefix view, before the step is reported: a step that was not stored was not
made. Everything the loop needs to continue is in those records, so a turn
interrupted anywhere resumes from its last stored step.

Prefix views: in token mode both models read one prefix ("shared") of token ids;
in text mode each model has its own ("small", "large"): its own rendering of the
prompt plus its own tokenization of every step's text.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from services.router import observe
from services.router.policies import Policy, StepOutcome
from services.router.types import (
    STEP_BOUNDARY,
    AnswerBy,
    AnswerDelta,
    Finished,
    Kind,
    Record,
    Role,
    RoleStats,
    SessionCancelled,
    SessionOptions,
    Stats,
    StepDone,
)
from services.router.worker_client import WorkerClient
from services.worker.types import (
    EntropyMethod,
    FinishReason,
    Gate,
    GenerateRequest,
    Generation,
    Glimpse,
    SamplingParams,
    StepResult,
    StopParams,
)

TOKEN_MODE = "tokens"
TEXT_MODE = "text"


class Writer(Protocol):
    async def append(self, entries: list[tuple[Record, dict[str, list[int]]]], meta: dict[str, str]) -> None:
        """Store the records and their tokens atomically, or raise (nothing stored)."""


def views_for(mode: str) -> dict[Role, str]:
    if mode == TOKEN_MODE:
        return {Role.SMALL: "shared", Role.LARGE: "shared"}
    return {Role.SMALL: "small", Role.LARGE: "large"}


def step_seed(seed: int, index: int) -> int:
    # Distinct, reproducible seeds per step: a resumed step samples as it would have.
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


@dataclass
class TurnState:
    """Where a session stands; rebuilt from its log when a turn resumes."""

    session_id: str
    turn: int
    mode: str
    seed: int
    think: bool
    think_end: str
    prefixes: dict[str, list[int]]
    log_len: int  # records in the log: the position the next write must find
    session_steps: list[Record] = field(default_factory=list)  # every step over all turns
    turn_records: list[Record] = field(default_factory=list)  # this turn's records
    resumed_steps: int = 0

    @property
    def turn_steps(self) -> list[Record]:
        return [r for r in self.turn_records if r.kind is Kind.STEP]

    @property
    def thinking_end(self) -> str:
        steps = self.turn_steps
        return steps[-1].end_reason if steps else ""

    @property
    def answer_record(self) -> Record | None:
        return next((r for r in self.turn_records if r.kind is Kind.ANSWER), None)


def answer_writer(options: SessionOptions, think: bool) -> Role | None:
    by = options.answer_by
    if by is AnswerBy.AUTO:
        by = AnswerBy.LARGE if think else AnswerBy.NONE
    return {AnswerBy.LARGE: Role.LARGE, AnswerBy.SMALL: Role.SMALL}.get(by)


def needs_answer(options: SessionOptions, think: bool, thinking_end: str) -> bool:
    # A model that ended its turn (EOS) or filled its context has nothing to add.
    return answer_writer(options, think) is not None and thinking_end not in ("eos", "context")


class _Ctx:
    """The StepContext a policy sees for one step; times every worker call."""

    def __init__(self, loop: "StepLoop", index: int, max_tokens: int) -> None:
        self.loop = loop
        self.index = index
        self.seed = step_seed(loop.state.seed, index)
        self.fused = loop.options.routing.glimpse_mode == "fused"
        self.method = EntropyMethod.FULL if loop.options.routing.entropy == "full" else EntropyMethod.TOP_K
        self.top_k = loop.options.routing.top_k
        self.history = loop.state.session_steps
        s = loop.options.sampling
        self.sampling = SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=self.seed, max_tokens=max_tokens)
        self.stop = StopParams(STEP_BOUNDARY, (loop.state.think_end,) if loop.state.think else (), True)
        self.worker_ms = 0.0

    def _prefix(self, role: Role) -> list[int]:
        return self.loop.state.prefixes[self.loop.views[role]]

    async def _timed(self, coro):
        t0 = time.perf_counter()
        try:
            return await coro
        finally:
            self.worker_ms += (time.perf_counter() - t0) * 1e3

    def _request(self, role: Role, return_entropies: bool = False) -> GenerateRequest:
        return GenerateRequest(
            self._prefix(role), self.sampling, self.stop, self.loop.state.session_id, return_entropies, self.top_k
        )

    async def glimpse(self) -> Glimpse:
        return await self._timed(self.loop.small.glimpse(self._prefix(Role.SMALL), self.top_k))

    async def write(self, role: Role, return_entropies: bool = False) -> Generation:
        return await self._timed(self.loop.worker(role).generate(self._request(role, return_entropies)))

    async def fused_step(self, threshold: float) -> StepResult:
        return await self._timed(self.loop.small.step(self._request(Role.SMALL), Gate(self.method, threshold)))

    async def score(self, draft: Generation, judge_text: str, top_k: int) -> Glimpse:
        large = self.loop.large
        if self.loop.state.mode == TOKEN_MODE:
            draft_ids = draft.token_ids
        else:
            draft_ids = await self._timed(large.tokenize(draft.text))
        judge = await self.loop.cached_tokens(Role.LARGE, judge_text)
        return await self._timed(large.glimpse(self._prefix(Role.LARGE) + draft_ids + judge, top_k))


class StepLoop:
    def __init__(
        self,
        state: TurnState,
        options: SessionOptions,
        policy: Policy,
        small: WorkerClient,
        large: WorkerClient,
        writer: Writer,
        *,
        include_token_ids: bool = False,
        max_session_steps: int = 0,
    ) -> None:
        self.state = state
        self.options = options
        self.policy = policy
        self.small = small
        self.large = large
        self.writer = writer
        self.include_token_ids = include_token_ids
        self.max_session_steps = max_session_steps
        self.views = views_for(state.mode)
        self._token_cache: dict[tuple[Role, str], list[int]] = {}

    def worker(self, role: Role) -> WorkerClient:
        return self.small if role is Role.SMALL else self.large

    async def cached_tokens(self, role: Role, text: str) -> list[int]:
        key = (role, text)
        if key not in self._token_cache:
            self._token_cache[key] = await self.worker(role).tokenize(text)
        return self._token_cache[key]

    async def _tokens_by_view(self, writer: Role, ids: list[int], text: str) -> dict[str, list[int]]:
        """The tokens one piece of text appends to each view: the writer's own ids,
        and in text mode the other model's tokenization of the same text."""
        if self.state.mode == TOKEN_MODE:
            return {"shared": list(ids)}
        other = Role.LARGE if writer is Role.SMALL else Role.SMALL
        return {self.views[writer]: list(ids), self.views[other]: await self.worker(other).tokenize(text)}

    async def _text_tokens(self, text: str) -> dict[str, list[int]]:
        if self.state.mode == TOKEN_MODE:
            return {"shared": await self.cached_tokens(Role.SMALL, text)}
        return {self.views[r]: await self.cached_tokens(r, text) for r in (Role.SMALL, Role.LARGE)}

    async def _store(self, entries: list[tuple[Record, dict[str, list[int]]]], meta: dict[str, str]) -> None:
        ends = {v: len(ids) for v, ids in self.state.prefixes.items()}
        for record, tokens in entries:
            for v, t in tokens.items():
                ends[v] += len(t)
            record.prefix_end = dict(ends)
        await self.writer.append(entries, meta)
        # Only after the store accepted them do the records count.
        for record, tokens in entries:
            for view, ids in tokens.items():
                self.state.prefixes[view].extend(ids)
            self.state.turn_records.append(record)
            if record.kind is Kind.STEP:
                self.state.session_steps.append(record)
        self.state.log_len += len(entries)

    # ---- the turn ------------------------------------------------------------------
    async def run(self) -> AsyncIterator[object]:
        started = time.perf_counter()
        observe.turn_started(self.options, self.policy)
        st = self.state
        answer_role = answer_writer(self.options, st.think)
        while not st.thinking_end:
            yield await self._one_step()
        answer = self._steps_answer()
        answer_end = "none"
        done = st.answer_record
        if done is None and needs_answer(self.options, st.think, st.thinking_end):
            assert answer_role is not None
            async for event in self._answer(answer_role):
                yield event
            done = st.answer_record
        if done is not None:
            answer = (answer + done.text) if not st.think else done.text
            answer_end = done.finish_reason
        stats = self.stats(answer_end, (time.perf_counter() - started) * 1e3)
        yield Finished(st.session_id, answer.strip(), stats)

    def _steps_answer(self) -> str:
        # Plain instruct models: the steps are the reply. Thinking models: the answer
        # comes after </think>.
        return "" if self.state.think else "".join(r.text for r in self.state.turn_steps)

    def _end_reason(self, outcome: StepOutcome, text: str, turn_tokens: int, turn_steps: int) -> str:
        gen, b = outcome.generation, self.options.budgets
        prev = self.state.turn_steps[-1].text if self.state.turn_steps else None
        if gen.finish_reason is FinishReason.CANCELLED:
            raise SessionCancelled("a worker cancelled the step")
        if self.state.think and (gen.matched_stop == self.state.think_end or self.state.think_end in text):
            return "think_end"
        if gen.finish_reason is FinishReason.EOS:
            return "eos"
        if gen.finish_reason is FinishReason.CONTEXT:
            return "context"
        if prev is not None and prev == text:
            return "repetition"
        if turn_tokens >= b.thinking_tokens:
            return "budget"
        if b.max_steps and turn_steps >= b.max_steps:
            return "max_steps"
        if self.max_session_steps and len(self.state.session_steps) + 1 >= self.max_session_steps:
            return "session_steps"
        return ""

    async def _one_step(self) -> StepDone:
        """`_write_step` inside its span: the worker calls it makes and its Redis write are children."""
        st = self.state
        index = len(st.session_steps)
        with observe.step_span(self.policy, self.options, st.session_id, st.turn, index, self.small.info.model_id) as obs:
            done = await self._write_step()
            obs.done(done.record)
            return done

    async def _write_step(self) -> StepDone:
        st, b = self.state, self.options.budgets
        t0 = time.perf_counter()
        used = sum(r.tokens for r in st.turn_steps)
        index = len(st.session_steps)
        ctx = _Ctx(self, index, max(1, min(b.step_tokens, b.thinking_tokens - used)))
        outcome = await self.policy.write_step(ctx)
        gen = outcome.generation
        end = self._end_reason(outcome, gen.text, used + len(gen.token_ids), len(st.turn_steps) + 1)
        writer = outcome.writer
        tokens = await ctx._timed(self._tokens_by_view(writer, gen.token_ids, gen.text))
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
            end_reason=end,
        )
        meta = {"steps": str(index + 1)}
        if end and not needs_answer(self.options, st.think, end):
            meta.update(status="done", answer=(self._steps_answer() + gen.text).strip())
        await self._store([(record, tokens)], meta)
        # The stream reports the step's full time, including the store write.
        shown = dataclasses.replace(record, latency_ms=(time.perf_counter() - t0) * 1e3)
        return StepDone(shown, list(gen.token_ids) if self.include_token_ids else None)

    async def _answer(self, role: Role) -> AsyncIterator[object]:
        """`_write_answer` inside its span; times the first answer text."""
        with observe.answer_span(role.value, self.worker(role).info.model_id, self.state.session_id) as obs:
            async with contextlib.aclosing(self._write_answer(role)) as events:
                async for event in events:
                    if isinstance(event, AnswerDelta):
                        obs.text(event.text)
                    yield event
            obs.done(self.state.answer_record)

    async def _write_answer(self, role: Role) -> AsyncIterator[object]:
        st = self.state
        t0 = time.perf_counter()
        entries: list[tuple[Record, dict[str, list[int]]]] = []
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
        req = GenerateRequest(st.prefixes[view] + join[view], sampling, stop, st.session_id)
        async for chunk in worker.generate_stream(req):
            if chunk.text:
                yield AnswerDelta(chunk.text, role.value)
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
        )
        entries.append((record, await self._tokens_by_view(role, final.token_ids, final.text)))
        answer = final.text if st.think else self._steps_answer() + final.text
        await self._store(entries, {"status": "done", "answer": answer.strip()})

    def stats(self, answer_end: str, latency_ms: float) -> Stats:
        return turn_stats(self.state, answer_end, latency_ms)


def turn_stats(state: TurnState, answer_end: str, latency_ms: float) -> Stats:
    per = {Role.SMALL.value: RoleStats(), Role.LARGE.value: RoleStats()}
    thinking = 0
    for r in state.turn_steps:
        rs = per[r.role]
        rs.steps += 1
        rs.generated_tokens += r.tokens
        rs.prefilled_tokens += r.prefilled_tokens
        rs.cached_tokens += r.cached_tokens
        rs.worker_ms += r.worker_ms
        thinking += r.tokens
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
        thinking_tokens=thinking,
        answer_tokens=answer.tokens if answer is not None else 0,
        thinking_end=state.thinking_end,
        answer_end=answer_end if answer is not None else "none",
        resumed_steps=state.resumed_steps,
    )
