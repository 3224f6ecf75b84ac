"""Redis lost under a running router: requests fail fast with UNAVAILABLE while it
is gone (refusing connections, or hanging), no step is half written, and the
router recovers by itself when Redis is back; the interrupted session resumes.

Our redis-server keeps an append-only file fsynced on every write, as a
production Redis holding sessions should; what a router stored is what comes
back after the crash.
"""
from __future__ import annotations

import time

import grpc
import pytest

from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import worker_pb2, worker_pb2_grpc

STEPS = 8
FAST = ("--redis-timeout-s", "1", "--lease-ms", "1500", "--lease-renew-ms", "300")


@pytest.fixture(scope="module")
def env(faults):
    s = faults.Stack()
    try:
        r = s.redis()
        small = s.sim("sim-small", steps=STEPS, token_latency_s=0.03)
        large = s.sim("sim-large", steps=STEPS, token_latency_s=0.03)
        router = s.router([small.address], [large.address], r.url, *FAST)
        yield s, r, small, router, s.stub(router)
    finally:
        s.close()


def _fails_fast(call, limit_s: float) -> grpc.RpcError:
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call()
    took = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
    assert took < limit_s, f"took {took:.1f}s"
    return err.value


def test_redis_killed_and_restarted(env, faults):
    _, r, small, router, stub = env
    call = stub.ReasonStream(pb.ReasonRequest(prompt="Count the eggs.", include_token_ids=True), timeout=30)
    seen: dict[int, list[int]] = {}
    sid = ""
    with pytest.raises(grpc.RpcError) as err:
        for ev in (ev for batch in call for ev in batch.events):
            if ev.HasField("started"):
                sid = ev.started.session_id
            if ev.HasField("step"):
                seen[ev.step.index] = list(ev.step.token_ids)
                if len(seen) == 3:
                    killed = time.monotonic()
                    r.kill()  # SIGKILL mid-session
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "session store unavailable" in err.value.details()
    assert time.monotonic() - killed < 3.0
    assert "resumes once it is back" in err.value.details()

    # While Redis is down: every call fails fast, and readiness says so.
    _fails_fast(lambda: stub.Reason(pb.ReasonRequest(prompt="New one."), timeout=20), 3.0)
    _fails_fast(lambda: stub.Reason(pb.ReasonRequest(session_id=sid), timeout=20), 3.0)
    _fails_fast(lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=20), 3.0)
    faults.wait_for(lambda: faults.health(router.address) == "NOT_SERVING", 5, "NOT_SERVING while Redis is down")

    r.start()  # same port, same append-only file
    faults.wait_for(lambda: faults.health(router.address) == "SERVING", 10, "the router to recover by itself")

    # Whatever was stored is whole: the log and the prefix agree (GetSession checks it),
    # every stored step is one the client saw or one finished just before the crash.
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid, include_prefix=True), timeout=10)
    assert [x.index for x in s.steps] == list(range(len(s.steps)))
    assert len(seen) <= len(s.steps) <= len(seen) + 1
    with grpc.insecure_channel(small.address) as ch:
        prompt = list(worker_pb2_grpc.ModelWorkerStub(ch).RenderPrompt(worker_pb2.RenderPromptRequest(
            messages=[worker_pb2.ChatMessage(role="user", content="Count the eggs.")], add_generation_prompt=True)).token_ids)
    prefix = list(s.prefixes[0].token_ids)
    assert s.prefixes[0].length == len(prompt) + sum(x.tokens for x in s.steps)
    body = list(prompt)
    for i in sorted(seen):
        body += seen[i]
    assert prefix[: len(body)] == body

    # The session resumes (once the crashed router call's lease has run out).
    def resume():
        try:
            return stub.Reason(pb.ReasonRequest(session_id=sid), timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED, exc.details()
            return None

    done = faults.wait_for(resume, 10, "the session to resume", interval=0.2)
    assert [x.index for x in done.steps] == list(range(len(s.steps), STEPS + 1))
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).status == "done"


def test_redis_that_hangs_fails_requests_within_the_timeout(env, faults):
    _, r, _, router, stub = env
    sid = stub.Reason(pb.ReasonRequest(prompt="Before the pause."), timeout=30).session_id
    r.pause()  # SIGSTOP: connections open, nothing answers
    try:
        # --redis-timeout-s 1: each call gives up on Redis after ~1 s instead of hanging.
        _fails_fast(lambda: stub.Reason(pb.ReasonRequest(prompt="During the pause."), timeout=20), 4.0)
        _fails_fast(lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=20), 4.0)
        faults.wait_for(lambda: faults.health(router.address) == "NOT_SERVING", 5, "NOT_SERVING while Redis hangs")
    finally:
        r.resume()
    faults.wait_for(lambda: faults.health(router.address) == "SERVING", 10, "the router to recover by itself")
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=10).status == "done"
    assert stub.Reason(pb.ReasonRequest(prompt="After the pause."), timeout=30).stats.steps == STEPS + 1
