"""Eager catch-up (services/router/catchup.py): the model not writing a step
prefills it while it streams, so a switch finds it cached; and catch-up only ever
changes when prefill happens, never what is written or whether a request succeeds.

The loop runs in-process (RouterCore over the batched scheduler with sim models,
real Redis). Workers are wrapped to watch (and, where a test says so, to delay or
break) the Extend calls; waits are on conditions, never on sleeps.
"""
from __future__ import annotations

import asyncio
import contextlib
import urllib.request

import pytest

from glimprouter.v1 import router_pb2 as pb
from services.router.api.types import (
    CatchUp,
    Done,
    Message,
    PrefixMode,
    ReasonRequest,
    Role,
    RoutingOptions,
    SamplingOptions,
    Step,
)
from services.router.catchup import EagerCatchUp
from services.router.config import RouterSettings
from services.router.core import RouterCore
from services.router.store import SessionStore
from services.router.worker_client import EngineClient, LocalPool
from services.worker.backends.sim import SimModel
from services.worker.scheduler import Scheduler
from services.worker.types import Extension, Usage

WAIT_S = 20.0  # a condition that does not hold by then is a failure, not a slow machine


class Watch:
    """What one role's worker was asked to extend, shared by every session's client."""

    def __init__(self) -> None:
        self.done: list[list[int]] = []  # prompts of the Extends that completed, in order
        self.started = 0
        self.cancelled = 0
        self.cond = asyncio.Condition()
        self.fail = False  # every Extend raises
        self.hold: asyncio.Event | None = None  # Extends wait for this before reaching the worker

    async def completed(self, prompt: list[int]) -> None:
        async with self.cond:
            self.done.append(list(prompt))
            self.cond.notify_all()

    async def holds(self, prefix: list[int]) -> None:
        """Waits until an Extend of exactly `prefix` (or longer, starting with it) completed."""
        n = len(prefix)

        def covered() -> bool:
            return any(len(p) >= n and p[:n] == prefix for p in self.done)

        async with self.cond:
            await asyncio.wait_for(self.cond.wait_for(covered), WAIT_S)


class WatchedClient(EngineClient):
    def __init__(self, engine, session_id: str, watch: Watch, gate: bool) -> None:
        super().__init__(engine, session_id)
        self.watch, self.gate = watch, gate

    async def extend(self, prompt):
        w = self.watch
        w.started += 1
        try:
            if w.hold is not None:
                await w.hold.wait()
            if w.fail:
                raise RuntimeError("this worker breaks every Extend")
            out = await super().extend(prompt)
        except asyncio.CancelledError:
            w.cancelled += 1
            raise
        await w.completed(prompt)
        return out

    async def _caught_up(self, req) -> None:
        # "The catch-up arrived in time": a step's call waits for the Extend of its
        # whole prefix, so what the worker reports cannot depend on the machine's speed.
        # (The answer's call reads the router's join text too, which nobody extends.)
        if self.gate and req.stop.step_boundary:
            await self.watch.holds(list(req.prompt))

    async def generate_stream(self, req):
        await self._caught_up(req)
        async for c in super().generate_stream(req):
            yield c

    async def step_stream(self, req, gate):
        await self._caught_up(req)
        async for c in super().step_stream(req, gate):
            yield c


class WatchedPool(LocalPool):
    def __init__(self, engine, watch: Watch, gate: bool = False) -> None:
        super().__init__(engine)
        self.watch, self.gate = watch, gate

    def bind(self, session_id, affinity):
        return WatchedClient(self.engine, session_id, self.watch, self.gate)


def sim(model_id: str, **kw) -> Scheduler:
    kw.setdefault("hard_steps", {1, 3})
    kw.setdefault("steps", 6)
    kw.setdefault("step_tokens", 24)
    return Scheduler(SimModel(model_id, **kw))


def make_core(redis_url, key_prefix, small, large, **settings):
    store = SessionStore.from_url(redis_url, key_prefix, 600, 5000, 100)
    return RouterCore(RouterSettings(**settings), store, small, large), store


def request(catch_up: CatchUp | None, **kw) -> ReasonRequest:
    return ReasonRequest(messages=[Message("user", "Add 2 and 3, then 4.")], include_token_ids=True,
                         routing=RoutingOptions(catch_up=catch_up), **kw)


async def run(core, req) -> list:
    return [ev async for ev in core.events(req)]


def steps(events) -> list[Step]:
    return [e for e in events if isinstance(e, Step)]


# ---- the catch-up itself, on fake workers -------------------------------------------------------
class FakeWorker(EngineClient):
    """Records Extends; each waits for `release` so the test sees what is in flight."""

    def __init__(self, tokenize=None) -> None:
        self.calls: list[list[int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()
        self._tokenize = tokenize

    async def tokenize(self, text):
        return self._tokenize(text)

    async def extend(self, prompt):
        self.calls.append(list(prompt))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return Extension(Usage(len(prompt), 0, 0, 0))


async def until(cond) -> None:
    async def poll():
        while not cond():
            await asyncio.sleep(0)
    await asyncio.wait_for(poll(), WAIT_S)


async def test_chunks_one_in_flight_and_the_rest_after_the_step():
    large = FakeWorker()
    prefixes = {Role.SMALL: [1, 2, 3], Role.LARGE: [1, 2, 3]}
    c = EagerCatchUp({Role.SMALL: FakeWorker(), Role.LARGE: large}, lambda: frozenset(Role), lambda r: prefixes[r],
                     PrefixMode.TOKENS, chunk_tokens=4)
    c.step_written_by(Role.SMALL)
    c.tokens([10, 11], "ab")
    await asyncio.sleep(0)
    assert large.calls == []  # less than a chunk: nothing sent yet
    c.tokens([12, 13], "cd")
    await until(lambda: large.in_flight == 1)
    assert large.calls == [[1, 2, 3, 10, 11, 12, 13]]
    for t in range(14, 24):  # more chunks pile up while one is in flight
        c.tokens([t], "x")
    await asyncio.sleep(0)
    assert len(large.calls) == 1
    large.release.set()
    await until(lambda: len(large.calls) == 2)
    assert large.calls[1] == [1, 2, 3] + list(range(10, 24))  # everything accumulated, in one call
    prefixes[Role.SMALL] = prefixes[Role.LARGE] = [1, 2, 3] + list(range(10, 25))
    c.stored()  # the step (one more token) is stored: the large is sent the rest
    await until(lambda: len(large.calls) == 3)
    assert large.calls[2] == prefixes[Role.LARGE]
    assert large.max_in_flight == 1
    await c.close()


async def test_text_mode_reads_its_own_tokenization_without_the_last_token():
    large = FakeWorker(tokenize=lambda text: [ord(ch) for ch in text])
    large.release.set()
    c = EagerCatchUp({Role.SMALL: FakeWorker(), Role.LARGE: large}, lambda: frozenset(Role),
                     lambda r: [7] if r is Role.LARGE else [9], PrefixMode.TEXT, chunk_tokens=2)
    c.step_written_by(Role.SMALL)
    c.tokens([100, 101], "xyz")  # two small-model tokens, three large-model ones
    await until(lambda: len(large.calls) == 1)
    assert large.calls[0] == [7, ord("x"), ord("y")]  # "z" may still merge with what follows
    await c.close()


async def test_a_failing_catch_up_waits_for_the_next_chunk():
    calls = []

    def broken(text):
        calls.append(text)
        raise RuntimeError("tokenizer down")

    large = FakeWorker(tokenize=broken)
    c = EagerCatchUp({Role.SMALL: FakeWorker(), Role.LARGE: large}, lambda: frozenset(Role), lambda r: [7],
                     PrefixMode.TEXT, chunk_tokens=2)
    c.step_written_by(Role.SMALL)
    c.tokens([1, 2], "ab")
    await until(lambda: c.failed == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(calls) == 1 and large.calls == []  # not retried at once, in a loop
    c.tokens([3, 4], "cd")
    await until(lambda: c.failed == 2)
    assert calls == ["ab", "abcd"]
    await c.close()


async def test_a_model_the_policy_never_calls_is_not_caught_up():
    small = FakeWorker()
    c = EagerCatchUp({Role.SMALL: small, Role.LARGE: FakeWorker()}, lambda: frozenset({Role.LARGE}), lambda r: [1],
                     PrefixMode.TOKENS, chunk_tokens=1)
    c.stored()
    c.step_written_by(Role.LARGE)
    c.tokens([5, 6, 7], "abc")
    await asyncio.sleep(0.01)
    assert small.calls == []
    await c.close()


async def test_the_model_each_step_calls_first_is_sent_nothing_between_steps():
    # Glimpse calls the small model first at every step: an Extend to it between steps
    # would only race (and delay) its own glimpse.
    small, large = FakeWorker(), FakeWorker()
    small.release.set()
    large.release.set()
    c = EagerCatchUp({Role.SMALL: small, Role.LARGE: large}, lambda: frozenset(Role), lambda r: [1, 2],
                     PrefixMode.TOKENS, chunk_tokens=100, first=Role.SMALL)
    c.stored()  # the prompt: the large model is caught up, the small one glimpses at once
    await until(lambda: len(large.calls) == 1)
    c.step_written_by(Role.LARGE)
    c.tokens([3], "x")
    c.stored()  # the large model's step: the small one reads it in its own next glimpse
    c.step_written_by(Role.SMALL)
    c.tokens([4], "y")
    c.stored()  # the small model's step: the large one is sent it
    await until(lambda: len(large.calls) == 2)
    await asyncio.sleep(0.01)
    assert small.calls == [] and len(large.calls) == 2
    await c.close()


# ---- through the loop ------------------------------------------------------------------------
async def test_after_a_switch_the_reader_finds_the_step_cached(redis_url, key_prefix):
    large_watch = Watch()
    small = WatchedPool(sim("s"), Watch())
    large = WatchedPool(sim("l"), large_watch, gate=True)
    core, store = make_core(redis_url, key_prefix, small, large, catch_up_tokens=4)
    try:
        events = await run(core, request(CatchUp.EAGER))
    finally:
        await store.close()
    written = steps(events)
    assert isinstance(events[-1], Done)
    switches = [(a, b) for a, b in zip(written, written[1:]) if a.role is Role.SMALL and b.role is Role.LARGE]
    assert switches, "the sim's hard steps must hand steps to the large model"
    for before, step in switches:
        # Everything up to the step it writes was prefilled by catch-up: its call
        # evaluates only the last token (for its logits).
        assert step.prefilled_tokens <= 1 and step.cached_tokens >= sum(s.tokens for s in written[: step.index])
    assert large_watch.done and all(len(p) > 0 for p in large_watch.done)


async def test_lazy_pays_the_prefill_on_the_critical_path(redis_url, key_prefix):
    small, large = LocalPool(sim("s")), LocalPool(sim("l"))
    core, store = make_core(redis_url, key_prefix, small, large)
    try:
        written = steps(await run(core, request(CatchUp.LAZY)))
    finally:
        await store.close()
    switched = [b for a, b in zip(written, written[1:]) if a.role is Role.SMALL and b.role is Role.LARGE]
    assert switched and all(s.critical_prefill_tokens >= 24 for s in switched)  # at least the small's whole step


@pytest.mark.parametrize("trouble", ["fails", "late"])
async def test_a_catch_up_that_fails_or_comes_late_changes_nothing(redis_url, key_prefix, trouble):
    seed = 1234

    async def written(catch_up, watch):
        core, store = make_core(redis_url, key_prefix, WatchedPool(sim("s"), watch), WatchedPool(sim("l"), watch),
                                catch_up_tokens=2)
        try:
            events = await run(core, request(catch_up, sampling=SamplingOptions(seed=seed)))
        finally:
            await store.close()
        assert isinstance(events[-1], Done)
        return [(s.role, s.token_ids) for s in steps(events)], events[-1].answer

    reference = await written(CatchUp.LAZY, Watch())
    watch = Watch()
    if trouble == "fails":
        watch.fail = True
    else:
        watch.hold = asyncio.Event()  # every Extend waits until the turn is over
    assert await written(CatchUp.EAGER, watch) == reference
    assert watch.started > 0
    if watch.hold is not None:
        watch.hold.set()


async def test_a_session_resumed_on_another_router_still_catches_up(redis_url, key_prefix):
    large_watch = Watch()
    small_engine, large_engine = sim("s", token_latency_s=0.002), sim("l", token_latency_s=0.002)
    small, large = WatchedPool(small_engine, Watch()), WatchedPool(large_engine, large_watch)
    first, store_a = make_core(redis_url, key_prefix, small, large, router_id="router-a")
    second, store_b = make_core(redis_url, key_prefix, small, large, router_id="router-b")
    try:
        events = []
        # aclosing: leaving the loop closes the call now (a bare `break` leaves that to the
        # garbage collector, and the session may still read "running" below).
        async with contextlib.aclosing(first.events(request(CatchUp.EAGER))) as stream:
            async for ev in stream:
                events.append(ev)
                if isinstance(ev, Step) and ev.index == 1:
                    break  # the client goes away after two steps: the turn is interrupted
        sid = events[0].session_id
        info = await second.get_session(sid)
        assert info.status == "interrupted" and len(info.steps) == 2
        stored = (await second.get_session(sid, include_prefix=True)).prefixes[0].token_ids
        large_watch.done.clear()
        resumed = await run(second, ReasonRequest(session_id=sid))
        assert isinstance(resumed[-1], Done)
        # The new router's first catch-up hands the large model the stored prefix, steps included.
        await large_watch.holds(list(stored))
    finally:
        await store_a.close()
        await store_b.close()


async def test_cancelling_a_session_stops_its_pending_catch_up(redis_url, key_prefix):
    watch = Watch()
    watch.hold = asyncio.Event()  # Extends never get to the worker: pending until cancelled
    small = WatchedPool(sim("s", token_latency_s=0.005), Watch())
    large = WatchedPool(sim("l", token_latency_s=0.005), watch)
    core, store = make_core(redis_url, key_prefix, small, large)
    try:
        sid = None
        async with contextlib.aclosing(core.events(request(CatchUp.EAGER))) as stream:
            async for ev in stream:
                sid = sid or getattr(ev, "session_id", None)
                if watch.started:
                    break  # the client goes away: the turn is cancelled
        assert sid and watch.started
        await until(lambda: watch.cancelled == watch.started)  # the pending Extend was cancelled with the turn
    finally:
        await store.close()


# ---- over gRPC: the router process and sim workers --------------------------------------------------
def test_the_router_catches_up_over_grpc_by_default(sim_router):
    resp = sim_router.stub.Reason(pb.ReasonRequest(prompt="Add 2 and 3."), timeout=30)
    assert resp.steps and any(s.role == pb.ROLE_LARGE for s in resp.steps)
    port = sim_router.svc.ready_fields["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    ok = [line for line in text.splitlines() if line.startswith("glimprouter_router_catch_ups_total")
          and 'outcome="ok"' in line]
    assert ok and sum(float(line.rsplit(" ", 1)[1]) for line in ok) > 0
    assert 'glimprouter_router_catch_ups_total{outcome="error"' not in text
