"""Router replicas that die or are stopped mid-session, seen by an HTTP client.

tests/router/test_sessions.py already shows a SIGKILLed router's session resumed
by another replica over gRPC; here the client is the gateway's, the gateway
dials both replicas as one target (as a Kubernetes Service would give it), and
the client reconnects with the session header to get the rest. SIGTERM is the
polite version: NOT_SERVING first, the step in flight is finished and stored,
the lease is released at once, and another replica resumes without waiting.
"""
from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx

from glimprouter.v1 import router_pb2 as pb

STEPS = 8
LEASE = ("--lease-ms", "1500", "--lease-renew-ms", "300")


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_router_killed_mid_stream_client_reconnects_through_the_gateway(stack, faults):
    r = stack.redis()
    small = stack.sim("sim-small", steps=STEPS, token_latency_s=0.03)
    large = stack.sim("sim-large", steps=STEPS, token_latency_s=0.03)
    a = stack.router([small.address], [large.address], r.url, *LEASE, "--router-id", "router-a")
    b = stack.router([small.address], [large.address], r.url, *LEASE, "--router-id", "router-b")
    # pick_first over both addresses: the gateway uses A while it lives, then B.
    gw = stack.gateway(f"ipv4:{a.address},{b.address}")
    url = f"http://{gw.address}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "Count to ten, slowly."}], "stream": True, "answer_by": "none"}

    first: list[dict] = []
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url, json=body) as resp:
            assert resp.status_code == 200
            sid = resp.headers["x-glimprouter-session"]
            for ev in sse_events(resp):
                first.append(ev)
                if sum("step_done" in (e.get("glimprouter") or {}) for e in first) == 2:
                    a.kill()  # SIGKILL: no lease released, nothing marked
            # The stream ends with an error event instead of hanging.
            assert "error" in first[-1] and first[-1]["error"]["code"] == "router_unavailable", first[-1]
        before = [e["glimprouter"]["step_done"] for e in first if "step_done" in (e.get("glimprouter") or {})]

        # Reconnect: the session header and no new messages resume the turn. The dead
        # router's lease holds it for up to 1.5 s (409 session_busy, Retry later).
        busy = 0
        deadline = time.monotonic() + 15
        while True:
            resp = client.post(url, json={**body, "stream": False, "messages": []},
                               headers={"X-GlimpRouter-Session": sid})
            if resp.status_code != 409:
                break
            assert resp.json()["error"]["code"] == "session_busy" and "router-a" in resp.json()["error"]["message"]
            busy += 1
            assert time.monotonic() < deadline, "the dead router's lease never expired"
            time.sleep(0.2)
        assert resp.status_code == 200, resp.text
        rest = resp.json()["glimprouter"]
        assert rest["session_id"] == sid and rest["resumed_steps"] >= len(before)
        got = [s["index"] for s in rest["step_log"]]
        assert got == list(range(rest["resumed_steps"], STEPS + 1))

        session = client.get(f"http://{gw.address}/v1/sessions/{sid}").json()
    stored = session["steps"]
    assert [s["index"] for s in stored] == list(range(STEPS + 1))  # none lost, none twice
    assert session["status"] == "done"
    by_index = {s["index"]: s for s in stored}
    for s in before:
        assert by_index[s["index"]]["tokens"] == s["tokens"] and by_index[s["index"]]["model"] == s["model"]
    for s in rest["step_log"]:
        assert by_index[s["index"]]["tokens"] == s["tokens"]


def test_router_sigterm_turns_not_serving_finishes_the_step_and_hands_the_session_over(stack, faults):
    r = stack.redis()
    small = stack.sim("sim-small", steps=STEPS, step_tokens=16, token_latency_s=0.05)  # ~0.8 s a step
    large = stack.sim("sim-large", steps=STEPS, step_tokens=16, token_latency_s=0.05)
    a = stack.router([small.address], [large.address], r.url, *LEASE, "--router-id", "router-a")
    b = stack.router([small.address], [large.address], r.url, *LEASE, "--router-id", "router-b")
    stub_a, stub_b = stack.stub(a), stack.stub(b)

    events: list = []
    error: dict = {}

    def read() -> None:
        try:
            for batch in stub_a.ReasonStream(pb.ReasonRequest(prompt="Take your time.", answer_by=pb.ANSWER_BY_NONE),
                                             timeout=60):
                events.extend(batch.events)
        except grpc.RpcError as exc:
            error["rpc"] = exc

    t = threading.Thread(target=read)
    t.start()
    faults.wait_for(lambda: any(e.HasField("step") for e in events), 20, "the first step")
    steps_at_signal = sum(e.HasField("step") for e in events)
    a.proc.send_signal(signal.SIGTERM)
    statuses = set()
    while t.is_alive():  # health during the drain: NOT_SERVING, never SERVING again
        statuses.add(faults.health(a.address, timeout=0.5))
        time.sleep(0.02)
    t.join()
    assert "NOT_SERVING" in statuses and "SERVING" not in statuses, statuses
    exc = error["rpc"]
    assert exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.details(), exc.details()
    steps = [e.step for e in events if e.HasField("step")]
    assert len(steps) == steps_at_signal + 1  # the step in flight was finished, stored and reported
    assert a.proc.wait(15) == 0

    # Stored, interrupted, and the lease already released: B resumes at once (no ABORTED).
    s = stub_b.GetSession(pb.GetSessionRequest(session_id=events[0].started.session_id))
    assert s.status == "interrupted" and not s.lease_holder and len(s.steps) == len(steps)
    resumed = stub_b.Reason(pb.ReasonRequest(session_id=s.session_id), timeout=60)
    assert resumed.stats.resumed_steps == len(steps)
    assert [x.index for x in resumed.steps] == list(range(len(steps), STEPS + 1))
