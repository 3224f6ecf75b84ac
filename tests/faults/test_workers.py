"""Workers that die, stall or shut down while a step is being written, and callers
that give up: the router retries on a live replica within the deadline or fails
UNAVAILABLE, nothing half-made is stored, a session resumes once a worker is
back, deadlines and cancellations stop the decoding on the workers, and SIGTERM
drains the calls in flight behind a NOT_SERVING health status.

(tests/router/test_sessions.py already covers a dead small replica skipped at
start and a small replica lost mid-session; these add the large role, the case
with no replica left, and resuming after one is restarted.)
"""
from __future__ import annotations

import signal
import threading
import time
from types import SimpleNamespace

import grpc
import httpx
import pytest

from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import worker_pb2, worker_pb2_grpc

STEPS = 8
LARGE_ONLY = pb.RoutingOptions(policy="large-only")


class Streamer(threading.Thread):
    """One ReasonStream read in the background."""

    def __init__(self, stub, request: pb.ReasonRequest, timeout: float = 60) -> None:
        super().__init__(daemon=True)
        self.stub, self.request, self.timeout = stub, request, timeout
        self.events: list = []
        self.error: grpc.RpcError | None = None
        self.session_id = ""
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            for ev in (ev for batch in self.stub.ReasonStream(self.request, timeout=self.timeout) for ev in batch.events):
                self.events.append(ev)
                if ev.HasField("started"):
                    self.session_id = ev.started.session_id
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def steps(self):
        return [e.step for e in self.events if e.HasField("step")]

    def wait_steps(self, n: int, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while len(self.steps()) < n and time.monotonic() < end and self.is_alive():
            time.sleep(0.01)
        assert len(self.steps()) >= n, (self.error, self.events)


def prompt_ids(worker_address: str, text: str) -> list[int]:
    with grpc.insecure_channel(worker_address) as ch:
        r = worker_pb2_grpc.ModelWorkerStub(ch).RenderPrompt(worker_pb2.RenderPromptRequest(
            messages=[worker_pb2.ChatMessage(role="user", content=text)], add_generation_prompt=True), timeout=10)
        return list(r.token_ids)


def assert_prefix_is_prompt_and_steps(stub, sid: str, prompt: list[int], step_ids: dict[int, list[int]]) -> pb.Session:
    """The stored prefix is the prompt, then every stored step's tokens in order, each index once."""
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid, include_prefix=True), timeout=10)
    indices = [x.index for x in s.steps]
    assert indices == list(range(len(indices))), indices  # none lost, none twice
    prefix = list(s.prefixes[0].token_ids)
    body = list(prompt)
    for x in s.steps:
        ids = step_ids.get(x.index)
        assert ids is not None and len(ids) == x.tokens, (x.index, ids, x.tokens)
        body += ids
    assert prefix[: len(body)] == body
    return s


# ---- a worker killed in the middle of a step ---------------------------------------------------
def test_large_worker_killed_mid_step_retry_then_unavailable_then_resume(stack, faults):
    r = stack.redis()
    small = stack.sim("sim-small", steps=STEPS)
    large = [stack.sim("sim-large", steps=STEPS, token_latency_s=0.04) for _ in range(2)]
    router = stack.router([small.address], [w.address for w in large], r.url)
    stub = stack.stub(router)
    prompt = prompt_ids(small.address, "Count the apples.")

    run = Streamer(stub, pb.ReasonRequest(prompt="Count the apples.", routing=LARGE_ONLY, include_token_ids=True,
                                          answer_by=pb.ANSWER_BY_NONE), timeout=30)
    t0 = time.monotonic()
    run.start()
    run.wait_steps(2)
    home = stub.GetSession(pb.GetSessionRequest(session_id=run.session_id)).affinity["large"]
    first = next(w for w in large if w.address == home)
    second = next(w for w in large if w.address != home)
    first.kill()  # SIGKILL in the middle of step 2 (each takes ~0.3 s)

    # One replica left: the interrupted step is retried there and the turn goes on.
    run.wait_steps(4)
    moved = stub.GetSession(pb.GetSessionRequest(session_id=run.session_id)).affinity["large"]
    assert moved == second.address
    killed_at = time.monotonic()
    second.kill()  # the last large replica dies mid-step: nothing left to retry on
    run.join(10)
    assert run.error is not None and run.error.code() == grpc.StatusCode.UNAVAILABLE, run.error
    assert "large" in run.error.details()
    assert run.ended_at - killed_at < 3.0  # failed fast, not at the 30 s deadline
    assert run.ended_at - t0 < 30

    sid = run.session_id
    seen = {s.index: list(s.token_ids) for s in run.steps()}
    stored = assert_prefix_is_prompt_and_steps(stub, sid, prompt, seen)
    assert stored.status == "interrupted" and not stored.lease_holder
    assert len(stored.steps) == len(seen)  # the step being written when the worker died was not stored

    # Still no large worker: a new session fails fast with UNAVAILABLE too.
    t1 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Reason(pb.ReasonRequest(prompt="Anyone there?", routing=LARGE_ONLY), timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t1 < 3.0

    # A worker comes back on the old address: the router notices by itself, and the session resumes.
    stack.sim("sim-large", steps=STEPS, token_latency_s=0.04, port=second.port)
    faults.wait_for(lambda: faults.health(router.address) == "SERVING", 15, "the router to see the worker again")
    resumed = Streamer(stub, pb.ReasonRequest(session_id=sid, include_token_ids=True), timeout=30)
    resumed.run()
    assert resumed.error is None, resumed.error
    assert resumed.events[0].started.resumed_steps == len(seen)
    assert [s.index for s in resumed.steps()] == list(range(len(seen), STEPS + 1))
    seen.update({s.index: list(s.token_ids) for s in resumed.steps()})
    final = assert_prefix_is_prompt_and_steps(stub, sid, prompt, seen)
    assert final.status == "done" and len(final.steps) == STEPS + 1


# ---- the router's readiness follows its workers ---------------------------------------------------
def test_router_is_serving_only_while_a_worker_of_each_role_would_take_a_call(stack, faults):
    """Readiness is what clients and Kubernetes send traffic on: NOT_SERVING as soon as the
    last large worker is gone (a client just refused is never told SERVING), and SERVING
    again only once the worker is back and connected, so the first call after it is served.
    The health loop is slowed to a minute: none of this may wait for it."""
    r = stack.redis()
    small = stack.sim("sim-small", steps=STEPS)
    large = stack.sim("sim-large", steps=STEPS)
    router = stack.router([small.address], [large.address], r.url, "--health-interval-s", "60")
    stub = stack.stub(router)
    assert faults.health(router.address) == "SERVING"

    large.kill()
    # Before: SERVING until the next health check, up to a minute later.
    faults.wait_for(lambda: faults.health(router.address) == "NOT_SERVING", 10, "NOT_SERVING without a large worker")
    with pytest.raises(grpc.RpcError) as err:
        stub.Reason(pb.ReasonRequest(prompt="Anyone there?", routing=LARGE_ONLY), timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no healthy large worker" in err.value.details()
    assert faults.health(router.address) == "NOT_SERVING"

    stack.sim("sim-large", steps=STEPS, port=large.port)  # back on its old address
    faults.wait_for(lambda: faults.health(router.address) == "SERVING", 15, "the router to see the worker again")
    resp = stub.Reason(pb.ReasonRequest(prompt="Count the apples.", routing=LARGE_ONLY, answer_by=pb.ANSWER_BY_NONE),
                       timeout=30)  # the first call once SERVING
    assert len(resp.steps) == STEPS + 1 and all(s.role == pb.ROLE_LARGE for s in resp.steps)


# ---- slow workers, deadlines and cancellation -----------------------------------------------------
@pytest.fixture(scope="module")
def slow(faults):
    """Workers whose steps take ~2 s (20 tokens x 0.1 s), a router, and gateways with a 1 s and the
    default (600 s) request timeout."""
    s = faults.Stack()
    try:
        r = s.redis()
        small = s.sim("sim-small", steps=4, step_tokens=20, token_latency_s=0.1, hard_steps="")
        large = s.sim("sim-large", steps=4, step_tokens=20, token_latency_s=0.1, hard_steps="")
        router = s.router([small.address], [large.address], r.url)
        hurried = s.gateway(router.address, "--request-timeout-s", "1")
        patient = s.gateway(router.address)
        yield SimpleNamespace(small=small, large=large, router=router, stub=s.stub(router),
                              hurried=f"http://{hurried.address}", patient=f"http://{patient.address}")
    finally:
        s.close()


def _cancelled(faults, worker) -> tuple[float, float]:
    return (faults.metric(worker, "glimprouter_worker_cancelled_generations_total"),
            faults.metric(worker, "glimprouter_worker_cancelled_tokens_total"))


def _active(faults, worker) -> float:
    return faults.metric(worker, "glimprouter_worker_requests_active")


def _assert_worker_idle(faults, worker) -> None:
    """No request holds a sequence of the worker's batch any more: the cut-short generation
    is not still running behind us. The gauge is set at the end of the scheduler iteration
    that counted the cancellation, so it follows within moments, while the step it cut
    would have run on for about a second."""
    faults.wait_for(lambda: _active(faults, worker) == 0, 0.5, "the worker to have no request in flight")


def _wait_cancelled(faults, worker, before: tuple[float, float]) -> float:
    """Waits for the worker to report one more cancelled generation; returns its tokens."""
    faults.wait_for(lambda: _cancelled(faults, worker)[0] > before[0], 5, "the worker to stop decoding")
    return _cancelled(faults, worker)[1] - before[1]


def _wait_busy(faults, worker) -> None:
    """Waits until the worker's model is writing a step (a request holds a sequence)."""
    faults.wait_for(lambda: _active(faults, worker) > 0, 10, "the worker to be writing a step")


def test_deadline_is_honoured_end_to_end_and_the_worker_stops(slow, faults):
    before = _cancelled(faults, slow.small)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        slow.stub.Reason(pb.ReasonRequest(prompt="Think slowly."), timeout=1.0)
    took = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and took < 1.6
    # The small worker was writing step 0 (20 tokens, ~2 s): it stopped after ~1 s of it.
    assert _wait_cancelled(faults, slow.small, before) < 15
    _assert_worker_idle(faults, slow.small)

    # The same through the gateway: its --request-timeout-s (1 s) is the router's deadline.
    before = _cancelled(faults, slow.small)
    t0 = time.monotonic()
    r = httpx.post(f"{slow.hurried}/v1/chat/completions", timeout=10,
                   json={"messages": [{"role": "user", "content": "Think slowly."}]})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert time.monotonic() - t0 < 1.8
    assert _wait_cancelled(faults, slow.small, before) < 15
    _assert_worker_idle(faults, slow.small)


def test_grpc_cancel_stops_the_work_on_the_worker(slow, faults):
    before = _cancelled(faults, slow.small)
    call = slow.stub.ReasonStream(pb.ReasonRequest(prompt="Cancel me."), timeout=30)
    sid = next(iter(call)).events[0].started.session_id
    _wait_busy(faults, slow.small)  # the small worker is writing step 0
    call.cancel()
    assert _wait_cancelled(faults, slow.small, before) < 15
    _assert_worker_idle(faults, slow.small)
    s = faults.wait_for(lambda: (x := slow.stub.GetSession(pb.GetSessionRequest(session_id=sid))).status == "interrupted"
                        and not x.lease_holder and x, 5, "the session to be marked interrupted")
    assert len(s.steps) == 0


def test_http_disconnect_stops_the_work_on_the_worker(slow, faults):
    before = _cancelled(faults, slow.small)
    body = {"messages": [{"role": "user", "content": "Disconnect from me."}], "stream": True}
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{slow.patient}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            sid = r.headers["x-glimprouter-session"]
            lines = r.iter_lines()  # held: a dropped iterator would close the connection at once
            next(lines)  # the role chunk: the router is running the session
            _wait_busy(faults, slow.small)  # the small worker is writing step 0
        closed = time.monotonic()  # leaving the block closed the connection mid-stream
    assert _wait_cancelled(faults, slow.small, before) < 15
    assert time.monotonic() - closed < 1.5  # at the disconnect, not at the end of the ~2 s step
    _assert_worker_idle(faults, slow.small)
    s = faults.wait_for(lambda: (x := slow.stub.GetSession(pb.GetSessionRequest(session_id=sid))).status == "interrupted"
                        and x, 5, "the session to be marked interrupted")
    assert len(s.steps) == 0


# ---- graceful shutdown of a worker --------------------------------------------------------------------
def test_worker_sigterm_turns_not_serving_and_drains_the_call_in_flight(stack, faults):
    w = stack.sim("sim-drain", token_latency_s=0.05)
    ch = grpc.insecure_channel(w.address)
    stub = worker_pb2_grpc.ModelWorkerStub(ch)
    req = worker_pb2.GenerateRequest(prompt=worker_pb2.Prompt(token_ids=worker_pb2.TokenIds(ids=[1, 300, 301])),
                                     sampling=worker_pb2.Sampling(max_tokens=30),
                                     stop=worker_pb2.StopCondition(step_boundary=""))
    call = stub.GenerateStream(req, timeout=20)
    chunks = [next(call)]  # its first token is out: the call is in flight (30 tokens take 1.5 s)
    w.proc.send_signal(signal.SIGTERM)
    # Health says NOT_SERVING while the call in flight finishes...
    faults.wait_for(lambda: faults.health(w.address) == "NOT_SERVING", 2, "NOT_SERVING during the drain")
    # ...and new work is refused as retryable, so a router moves it to another replica.
    with pytest.raises(grpc.RpcError) as err:
        stub.Glimpse(worker_pb2.GlimpseRequest(prompt=req.prompt), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
    chunks += list(call)
    assert sum(len(c.token_ids) for c in chunks) == 30
    assert chunks[-1].finish_reason == worker_pb2.FINISH_REASON_LENGTH  # finished, not cut
    assert w.proc.wait(15) == 0
    ch.close()


# ---- streaming: a step cut in the middle of its text ----------------------------------------------------
def _by_step(events, index: int):
    """The StepStart, StepDelta and stored StepEvent messages of one step, in order."""
    out = []
    for e in events:
        kind = e.WhichOneof("event")
        if kind in ("step_start", "step_delta", "step") and getattr(e, kind).index == index:
            out.append((kind, getattr(e, kind)))
    return out


def _cut_mid_step(run: Streamer, worker, timeout: float = 30) -> int:
    """Kills `worker` once a step has streamed some text but is not stored yet; returns its index."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in list(run.events):
            if e.HasField("step_delta"):
                k = e.step_delta.index
                if not any(x.HasField("step") and x.step.index == k for x in run.events):
                    worker.kill()  # SIGKILL, with most of the step still to write (8 tokens x 0.2 s)
                    return k
        time.sleep(0.005)
    raise AssertionError(f"no step text arrived: {run.error} {run.events}")


def test_a_step_cut_mid_stream_is_written_again_on_another_replica(stack, faults):
    r = stack.redis()
    small = stack.sim("sim-small", steps=4)
    large = [stack.sim("sim-large", steps=4, token_latency_s=0.2) for _ in range(2)]
    router = stack.router([small.address], [w.address for w in large], r.url, "--stream-interval-ms", "0")
    stub = stack.stub(router)
    run = Streamer(stub, pb.ReasonRequest(prompt="Count the pears.", routing=LARGE_ONLY, include_token_ids=True,
                                          answer_by=pb.ANSWER_BY_NONE), timeout=60)
    run.start()
    faults.wait_for(lambda: run.session_id, 20, "the session to start")
    home = stub.GetSession(pb.GetSessionRequest(session_id=run.session_id)).affinity["large"]
    cut = _cut_mid_step(run, next(w for w in large if w.address == home))
    run.join(60)
    assert run.error is None, run.error

    # The step started again under attempt 2, on the other replica; its earlier text is not what was stored.
    mine = _by_step(run.events, cut)
    starts = [m for kind, m in mine if kind == "step_start"]
    assert [s.attempt for s in starts] == [1, 2], mine
    second = mine.index(("step_start", starts[1]))
    deltas = [m for kind, m in mine[second + 1:] if kind == "step_delta"]
    (stored,) = [m for kind, m in mine if kind == "step"]
    assert "".join(d.text for d in deltas) == stored.text and [i for d in deltas for i in d.token_ids] == list(stored.token_ids)
    s = stub.GetSession(pb.GetSessionRequest(session_id=run.session_id), timeout=10)
    assert [x.index for x in s.steps] == list(range(5)) and s.status == "done"  # each step stored once
    assert s.affinity["large"] != home


def test_a_step_cut_with_no_replica_left_is_not_stored_and_the_resume_writes_it_from_its_start(stack, faults):
    r = stack.redis()
    small = stack.sim("sim-small", steps=4)
    large = stack.sim("sim-large", steps=4, token_latency_s=0.2)
    router = stack.router([small.address], [large.address], r.url, "--stream-interval-ms", "0")
    stub = stack.stub(router)
    prompt = prompt_ids(small.address, "Count the plums.")
    run = Streamer(stub, pb.ReasonRequest(prompt="Count the plums.", routing=LARGE_ONLY, include_token_ids=True,
                                          answer_by=pb.ANSWER_BY_NONE), timeout=60)
    run.start()
    cut = _cut_mid_step(run, large)
    run.join(30)
    assert run.error is not None and run.error.code() == grpc.StatusCode.UNAVAILABLE, run.error
    sid = run.session_id
    seen = {s.index: list(s.token_ids) for s in run.steps()}
    assert cut not in seen and any(k == "step_delta" for k, _ in _by_step(run.events, cut))  # text of it was sent...
    stored = assert_prefix_is_prompt_and_steps(stub, sid, prompt, seen)
    assert len(stored.steps) == cut  # ...but the step was not stored

    # The worker is back: the resumed turn starts at the cut step, from its start.
    stack.sim("sim-large", steps=4, token_latency_s=0.2, port=large.port)
    faults.wait_for(lambda: faults.health(router.address) == "SERVING", 15, "the router to see the worker again")
    resumed = Streamer(stub, pb.ReasonRequest(session_id=sid, include_token_ids=True), timeout=60)
    resumed.run()
    assert resumed.error is None, resumed.error
    assert resumed.events[0].started.resumed_steps == cut
    first = next(e.step_start for e in resumed.events if e.HasField("step_start"))
    assert (first.index, first.attempt) == (cut, 1)
    mine = _by_step(resumed.events, cut)
    (again,) = [m for kind, m in mine if kind == "step"]
    assert "".join(m.text for kind, m in mine if kind == "step_delta") == again.text
    seen.update({s.index: list(s.token_ids) for s in resumed.steps()})
    final = assert_prefix_is_prompt_and_steps(stub, sid, prompt, seen)
    assert final.status == "done" and len(final.steps) == 5
