"""Sessions in Redis: stored state, multi-turn, leases between routers, crash and
resume, cancellation, deadlines, limits, bad input and worker failover."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import worker_pb2, worker_pb2_grpc
from services.router.config import RouterSettings
from services.router.core import RouterCore
from services.router.store import SessionStore, unpack_ids
from services.router.api.types import Done, Message, ReasonRequest, Step
from services.router.errors import InvalidArgument, LimitExceeded
from services.router.worker_client import LocalPool
from services.worker.backends.sim import SimModel
from services.worker.scheduler import Scheduler


SLOW_STEPS = 8  # each ~8 tokens x 25 ms: a session takes ~2 s, long enough to interfere with


def prompt_ids(worker_address: str, text: str) -> list[int]:
    with grpc.insecure_channel(worker_address) as ch:
        stub = worker_pb2_grpc.ModelWorkerStub(ch)
        r = stub.RenderPrompt(worker_pb2.RenderPromptRequest(
            messages=[worker_pb2.ChatMessage(role="user", content=text)], add_generation_prompt=True))
        return list(r.token_ids)


# ---- stored state ----------------------------------------------------------------------
def test_redis_holds_the_prefix_and_every_step(sim_router, sim_pair, redis_client):
    resp = sim_router.stub.Reason(
        pb.ReasonRequest(prompt="Add 2 and 3.", answer_by=pb.ANSWER_BY_NONE, include_token_ids=True), timeout=30
    )
    sid = resp.session_id
    session = sim_router.stub.GetSession(pb.GetSessionRequest(session_id=sid, include_prefix=True))
    assert session.status == "done" and session.prefix_mode == pb.PREFIX_MODE_TOKENS
    (view,) = session.prefixes
    expected = prompt_ids(sim_pair[0].address, "Add 2 and 3.")
    assert resp.stats.prompt_tokens == len(expected)
    for s in resp.steps:
        expected += list(s.token_ids)
    assert list(view.token_ids) == expected  # the prefix is the prompt and the steps, nothing else
    assert [s.text for s in session.steps] == [s.text for s in resp.steps]
    # The raw keys: packed int32 prefix, one log record per prompt/step, TTLs set.
    meta_key, log_key, prefix_key = (f"simrouter:{{{sid}}}:{part}" for part in ("meta", "log", "prefix:shared"))
    assert unpack_ids(redis_client.get(prefix_key)) == expected
    assert redis_client.llen(log_key) == 1 + len(resp.steps)
    for key in (meta_key, log_key, prefix_key):
        assert 0 < redis_client.ttl(key) <= 3600
    assert not redis_client.exists(f"simrouter:{{{sid}}}:lease")  # released at the end


def test_answer_and_a_second_turn_extend_the_stored_prefix(sim_router):
    first = sim_router.stub.Reason(pb.ReasonRequest(prompt="Add 2 and 3."), timeout=30)
    before = sim_router.stub.GetSession(pb.GetSessionRequest(session_id=first.session_id, include_prefix=True))
    assert first.answer and before.answer == first.answer
    second = sim_router.stub.Reason(pb.ReasonRequest(session_id=first.session_id, prompt="And 4 more?"), timeout=30)
    assert second.turn == 1 and second.session_id == first.session_id
    assert [s.index for s in second.steps] == list(range(len(first.steps), len(first.steps) + len(second.steps)))
    after = sim_router.stub.GetSession(pb.GetSessionRequest(session_id=first.session_id, include_prefix=True))
    old, new = list(before.prefixes[0].token_ids), list(after.prefixes[0].token_ids)
    assert new[: len(old)] == old  # continued from the stored prefix, never re-rendered
    # The second turn's prompt is the whole first turn plus the new message.
    second_steps = sum(s.tokens for s in second.steps) + second.stats.answer_tokens
    assert len(old) < second.stats.prompt_tokens <= len(new) - second_steps
    assert after.turn == 1 and len(after.steps) == len(first.steps) + len(second.steps)


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_, code, words",
    [
        (pb.ReasonRequest(), grpc.StatusCode.INVALID_ARGUMENT, "messages is empty"),
        (pb.ReasonRequest(messages=[pb.Message(role="user", content="  ")]), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (pb.ReasonRequest(messages=[pb.Message(role="robot", content="hi")]), grpc.StatusCode.INVALID_ARGUMENT, "role"),
        (pb.ReasonRequest(prompt="x", routing=pb.RoutingOptions(policy="nope")), grpc.StatusCode.INVALID_ARGUMENT, "unknown policy 'nope'"),
        (pb.ReasonRequest(prompt="x", routing=pb.RoutingOptions(threshold=float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "threshold must be a finite"),
        (pb.ReasonRequest(prompt="x", routing=pb.RoutingOptions(policy="random", params={"p": 2})), grpc.StatusCode.INVALID_ARGUMENT, "'p' must be in [0, 1]"),
        (pb.ReasonRequest(prompt="x", routing=pb.RoutingOptions(params={"q": 1})), grpc.StatusCode.INVALID_ARGUMENT, "no parameter 'q'"),
        (pb.ReasonRequest(prompt="x", budgets=pb.Budgets(thinking_tokens=-5)), grpc.StatusCode.INVALID_ARGUMENT, "budgets.thinking_tokens must be positive"),
        (pb.ReasonRequest(prompt="x", budgets=pb.Budgets(answer_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "budgets.answer_tokens"),
        (pb.ReasonRequest(prompt="x", sampling=pb.SamplingOptions(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (pb.ReasonRequest(session_id="no-such-session"), grpc.StatusCode.NOT_FOUND, "not found"),
        (pb.ReasonRequest(session_id="bad id!", prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "session_id must be"),
    ],
)
def test_bad_requests_get_clear_errors(sim_router, request_, code, words):
    with pytest.raises(grpc.RpcError) as err:
        sim_router.stub.Reason(request_, timeout=10)
    assert err.value.code() == code
    assert words in err.value.details()


def test_unknown_session_in_get_and_cancel(sim_router):
    for call, req in ((sim_router.stub.GetSession, pb.GetSessionRequest(session_id="nope")),
                      (sim_router.stub.CancelSession, pb.CancelSessionRequest(session_id="nope"))):
        with pytest.raises(grpc.RpcError) as err:
            call(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nope' not found" in err.value.details()


def test_finished_session_without_messages_is_invalid(sim_router):
    sid = sim_router.stub.Reason(pb.ReasonRequest(prompt="hi"), timeout=30).session_id
    with pytest.raises(grpc.RpcError) as err:
        sim_router.stub.Reason(pb.ReasonRequest(session_id=sid), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "send messages" in err.value.details()


# ---- two routers, crash and resume, cancel, deadlines ---------------------------------------------
@pytest.fixture(scope="module")
def slow_pair(spawn):
    small = spawn.sim("sim-small", steps=SLOW_STEPS, token_latency_s=0.025)
    large = spawn.sim("sim-large", steps=SLOW_STEPS, token_latency_s=0.025)
    yield small, large
    small.stop()
    large.stop()


@pytest.fixture(scope="module")
def two_routers(slow_pair, redis_url, spawn):
    small, large = slow_pair
    lease = ("--lease-ms", "1500", "--lease-renew-ms", "300")
    a = spawn.handle(spawn.router([small.address], [large.address], redis_url, "two:", *lease, "--router-id", "router-a"))
    b = spawn.handle(spawn.router([small.address], [large.address], redis_url, "two:", *lease, "--router-id", "router-b"))
    yield a, b
    a.close()
    b.close()


class Streamer(threading.Thread):
    """Reads one ReasonStream in the background."""

    def __init__(self, router, request: pb.ReasonRequest) -> None:
        super().__init__(daemon=True)
        self.router, self.request = router, request
        self.events: list = []
        self.error: grpc.RpcError | None = None
        self.session_id = ""
        self.started = threading.Event()

    def run(self) -> None:
        try:
            for ev in (ev for batch in self.router.stub.ReasonStream(self.request, timeout=60) for ev in batch.events):
                self.events.append(ev)
                if ev.HasField("started"):
                    self.session_id = ev.started.session_id
                if ev.HasField("step"):
                    self.started.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.started.set()

    def steps(self):
        return [e.step for e in self.events if e.HasField("step")]

    def wait_steps(self, n: int, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while len(self.steps()) < n and time.monotonic() < end and self.is_alive():
            time.sleep(0.01)
        assert len(self.steps()) >= n, (self.error, self.events)


def test_two_routers_on_one_session(two_routers):
    a, b = two_routers
    run = Streamer(a, pb.ReasonRequest(prompt="Count to three."))
    run.start()
    run.wait_steps(1)
    for other in (b, a):  # another replica, or a second caller on the same one
        with pytest.raises(grpc.RpcError) as err:
            other.stub.Reason(pb.ReasonRequest(session_id=run.session_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "is being worked on by router router-a" in err.value.details()
    seen = b.stub.GetSession(pb.GetSessionRequest(session_id=run.session_id))
    assert seen.status == "running" and seen.lease_holder == "router-a" and seen.lease_ms_left > 0
    run.join(30)
    assert run.error is None and run.events[-1].HasField("done")
    assert len(run.steps()) == SLOW_STEPS + 1


def test_a_killed_router_is_resumed_by_another_without_losing_or_repeating_steps(slow_pair, redis_url, two_routers, spawn):
    small, large = slow_pair
    _, b = two_routers
    victim = spawn.handle(spawn.router([small.address], [large.address], redis_url, "two:",
                                       "--lease-ms", "1500", "--lease-renew-ms", "300", "--router-id", "victim"))
    run = Streamer(victim, pb.ReasonRequest(prompt="Count to ten.", include_token_ids=True))
    run.start()
    try:
        run.wait_steps(3)
    finally:
        victim.svc.kill()  # SIGKILL mid-session: no cleanup, the lease stays until it expires
    sid = run.session_id
    # At once (the lease was renewed < 0.3 s ago and lasts 1.5 s): the dead holder still has it.
    with pytest.raises(grpc.RpcError) as err:
        b.stub.Reason(pb.ReasonRequest(session_id=sid), timeout=10)
    assert err.value.code() == grpc.StatusCode.ABORTED and "router victim" in err.value.details()
    victim.channel.close()
    run.join(10)
    seen_before = run.steps()

    aborted = 1
    deadline = time.monotonic() + 20
    while True:
        try:
            events = [ev for batch in b.stub.ReasonStream(pb.ReasonRequest(session_id=sid, include_token_ids=True), timeout=60)
                      for ev in batch.events]
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED and "router victim" in exc.details()
            aborted += 1
            assert time.monotonic() < deadline, "the dead router's lease never expired"
            time.sleep(0.2)
    assert aborted >= 1  # the lease outlived its holder for a while, as it should

    started = events[0].started
    resumed = [e.step for e in events if e.HasField("step")]
    assert started.resumed_steps >= len(seen_before)
    assert [s.index for s in resumed] == list(range(started.resumed_steps, SLOW_STEPS + 1))
    assert events[-1].HasField("done") and events[-1].done.stats.resumed_steps == started.resumed_steps

    session = b.stub.GetSession(pb.GetSessionRequest(session_id=sid, include_prefix=True))
    assert session.status == "done"
    assert [s.index for s in session.steps] == list(range(SLOW_STEPS + 1))  # none lost, none twice
    stored = {s.index: s for s in session.steps}
    for s in seen_before + resumed:
        assert stored[s.index].text == s.text
    # The prefix is the prompt, then every step's tokens in order, then the join and answer.
    prefix = list(session.prefixes[0].token_ids)
    body = prompt_ids(small.address, "Count to ten.")
    ids_by_index = {s.index: list(s.token_ids) for s in seen_before + resumed}
    # Steps the victim stored but never reported are recovered from the stored prefix offsets.
    for i in range(SLOW_STEPS + 1):
        ids = ids_by_index.get(i)
        if ids is None:
            ids = prefix[len(body): len(body) + stored[i].tokens]
        body += ids
    assert prefix[: len(body)] == body


def test_cancel_stops_the_session_on_the_router_that_serves_it(two_routers):
    a, b = two_routers
    run = Streamer(a, pb.ReasonRequest(prompt="Count slowly."))
    run.start()
    run.wait_steps(1)
    t0 = time.monotonic()
    r = b.stub.CancelSession(pb.CancelSessionRequest(session_id=run.session_id), timeout=10)
    assert r.cancelled
    run.join(10)
    assert time.monotonic() - t0 < 1.5  # next lease renewal (0.3 s), not the end of the session (~2 s)
    assert run.error is not None and run.error.code() == grpc.StatusCode.CANCELLED
    session = a.stub.GetSession(pb.GetSessionRequest(session_id=run.session_id))
    assert session.status == "cancelled" and len(session.steps) < SLOW_STEPS + 1
    with pytest.raises(grpc.RpcError) as err:
        a.stub.Reason(pb.ReasonRequest(session_id=run.session_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancelled" in err.value.details()
    again = a.stub.CancelSession(pb.CancelSessionRequest(session_id=run.session_id), timeout=10)
    assert not again.cancelled and again.status == "cancelled"


def test_client_deadline_leaves_a_resumable_session(two_routers):
    a, _ = two_routers
    with pytest.raises(grpc.RpcError) as err:
        a.stub.Reason(pb.ReasonRequest(prompt="Take your time."), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = a.stub.ReasonStream(pb.ReasonRequest(prompt="Resume me."), timeout=0.9)
    sid, seen = "", 0
    with pytest.raises(grpc.RpcError) as err:
        for ev in (ev for batch in call for ev in batch.events):
            if ev.HasField("started"):
                sid = ev.started.session_id
            seen += ev.HasField("step")
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and sid
    for _ in range(50):  # the router marks the turn interrupted and releases the lease
        s = a.stub.GetSession(pb.GetSessionRequest(session_id=sid))
        if s.status == "interrupted" and not s.lease_holder:
            break
        time.sleep(0.05)
    assert s.status == "interrupted"
    resp = a.stub.Reason(pb.ReasonRequest(session_id=sid), timeout=60)
    assert resp.stats.resumed_steps == len(s.steps) >= seen
    assert [x.index for x in resp.steps] == list(range(resp.stats.resumed_steps, SLOW_STEPS + 1))
    assert a.stub.GetSession(pb.GetSessionRequest(session_id=sid)).status == "done"


# ---- worker failover ----------------------------------------------------------------------------
def test_a_dead_replica_is_skipped_and_a_failed_one_is_left(slow_pair, redis_url, key_prefix, spawn):
    _, large = slow_pair
    spares = [spawn.sim("sim-small", steps=SLOW_STEPS, token_latency_s=0.025) for _ in range(2)]
    dead = "127.0.0.1:1"  # nothing listens there
    router = None
    try:
        router = spawn.handle(spawn.router([dead] + [w.address for w in spares], [large.address], redis_url, key_prefix))
        run = Streamer(router, pb.ReasonRequest(prompt="Keep going."))
        run.start()
        run.wait_steps(2)
        home = router.stub.GetSession(pb.GetSessionRequest(session_id=run.session_id)).affinity["small"]
        assert home != dead
        victim = next(w for w in spares if w.address == home)
        other = next(w for w in spares if w.address != home)
        victim.kill()  # the session's small replica dies mid-session
        run.join(30)
        assert run.error is None and run.events[-1].HasField("done")
        assert [s.index for s in run.steps()] == list(range(SLOW_STEPS + 1))
        moved = router.stub.GetSession(pb.GetSessionRequest(session_id=run.session_id)).affinity["small"]
        assert moved == other.address  # the affinity followed the session to the live replica
    finally:
        if router is not None:
            router.close()
        for w in spares:
            w.stop()


# ---- limits (in-process core over sim engines, real Redis) -----------------------------------------
def _core(redis_url, key_prefix, **settings):
    store = SessionStore.from_url(redis_url, key_prefix, 600, 5000, settings.pop("max_sessions", 100))
    sims = [LocalPool(Scheduler(SimModel(m, hard_steps={1}))) for m in ("s", "l")]
    return RouterCore(RouterSettings(**settings), store, *sims), store


async def _run(core, req):
    return [ev async for ev in core.events(req)]


async def test_limits_are_clear_errors(redis_url, key_prefix):
    core, store = _core(redis_url, key_prefix, max_prompt_tokens=5)
    with pytest.raises(InvalidArgument, match="the limit is 5"):
        await _run(core, ReasonRequest(messages=[Message("user", "a long enough prompt")]))
    await store.close()

    core, store = _core(redis_url, key_prefix + "n:", max_sessions=1)
    await _run(core, ReasonRequest(messages=[Message("user", "one")]))
    with pytest.raises(LimitExceeded, match="too many live sessions"):
        await _run(core, ReasonRequest(messages=[Message("user", "two")]))
    await store.close()

    core, store = _core(redis_url, key_prefix + "s:", max_session_steps=3)
    events = await _run(core, ReasonRequest(messages=[Message("user", "one")]))
    steps = [e for e in events if isinstance(e, Step)]
    assert len(steps) == 3 and events[-1].stats.thinking_end == "session_steps" and isinstance(events[-1], Done)
    with pytest.raises(LimitExceeded, match="max-session-steps"):
        await _run(core, ReasonRequest(session_id=events[0].session_id, messages=[Message("user", "more")]))
    await store.close()


# ---- TTLs: never while worked on, session_ttl after the last write ------------------------------------
def test_a_session_outlives_its_ttl_while_worked_on_and_expires_ttl_after_its_last_write(spawn, redis_url, key_prefix,
                                                                                       redis_client):
    """TTL 1 s, a turn of ~2.5 s: step writes leave the TTLs alone, so only the turn's
    start and the lease renewals keep the session alive while it is worked on; its
    last write sets them to the TTL from then."""
    small = spawn.sim("sim-small", steps=6, token_latency_s=0.05)
    large = spawn.sim("sim-large", steps=6, token_latency_s=0.05)
    router = spawn.handle(spawn.router([small.address], [large.address], redis_url, key_prefix, "--session-ttl-s", "1",
                                       "--lease-ms", "1000", "--lease-renew-ms", "200"))
    try:
        run = Streamer(router, pb.ReasonRequest(prompt="Take a while.", answer_by=pb.ANSWER_BY_NONE))
        run.start()
        keys = None
        ttls = []
        while run.is_alive():  # sampled while the turn runs, well past the 1 s TTL
            if run.session_id and keys is None:
                keys = [f"{key_prefix}{{{run.session_id}}}:{part}" for part in ("meta", "log", "prefix:shared")]
            if keys:
                ttls.append([redis_client.pttl(k) for k in keys])
            time.sleep(0.05)
        run.join()
        assert run.error is None and run.events[-1].HasField("done")
        assert len(ttls) > 20 and all(t > 0 for sample in ttls for t in sample), ttls  # never gone, never without a TTL
        # The last write: session_ttl from then (1000 ms), for every key.
        assert all(0 < redis_client.pttl(k) <= 1000 for k in keys)
        s = router.stub.GetSession(pb.GetSessionRequest(session_id=run.session_id))
        assert s.status == "done" and len(s.steps) == 7
        deadline = time.monotonic() + 10
        while any(redis_client.exists(k) for k in keys):
            assert time.monotonic() < deadline, "the session outlived its TTL"
            time.sleep(0.1)
    finally:
        router.close()
        small.stop()
        large.stop()
