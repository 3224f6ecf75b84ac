"""Gateway API keys own sessions: a session belongs to the key that created it, and
any other key gets the same 404 as for an id that never existed (it cannot read,
continue, resume or cancel it, nor learn that it exists, even while it runs).
Session ids are 128 random bits; Redis holds a hash of the owner key, never the key."""
from __future__ import annotations

import json
import re
import threading
import time

import grpc
import httpx
import pytest

from glimprouter.v1 import router_pb2 as pb
from services.common import owner as owners

ALICE, BOB = "sk-alice-3b7f0c1e9a", "sk-bob-88d2e4f6a1"


@pytest.fixture(scope="module")
def gw(faults):
    s = faults.Stack()
    try:
        r = s.redis()
        small = s.sim("sim-small", steps=6, token_latency_s=0.03)
        large = s.sim("sim-large", steps=6, token_latency_s=0.03)
        router = s.router([small.address], [large.address], r.url, key_prefix="own:")
        gateway = s.gateway(router.address, "--api-keys", f"{ALICE},{BOB}")
        yield {"url": f"http://{gateway.address}", "redis": r, "router": s.stub(router)}
    finally:
        s.close()


def call(gw, key: str | None, method: str, path: str, body=None, session: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if session:
        headers["X-GlimpRouter-Session"] = session
    return httpx.request(method, gw["url"] + path, json=body, headers=headers, timeout=30)


def ask(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "answer_by": "none"}


def not_found_message(r: httpx.Response, sid: str) -> str:
    assert r.status_code == 404, r.text
    return r.json()["error"]["message"].replace(sid, "<id>")


def test_other_keys_get_404_for_a_session_they_did_not_create(gw):
    created = call(gw, ALICE, "POST", "/v1/chat/completions", ask("Alice's secret question."))
    assert created.status_code == 200
    sid = created.json()["glimprouter"]["session_id"]
    unknown = "0" * 32

    # Bob: exactly what he would see for an id that does not exist.
    for method, path, body in (("GET", f"/v1/sessions/{{}}", None), ("POST", f"/v1/sessions/{{}}/cancel", None)):
        mine = not_found_message(call(gw, BOB, method, path.format(sid), body), sid)
        never = not_found_message(call(gw, BOB, method, path.format(unknown), body), unknown)
        assert mine == never
    for body in (ask("And now?"), {"messages": []}):  # a new turn; a resume
        r = call(gw, BOB, "POST", "/v1/chat/completions", body, session=sid)
        assert not_found_message(r, sid) == not_found_message(
            call(gw, BOB, "POST", "/v1/chat/completions", body, session=unknown), unknown)
    assert call(gw, None, "GET", f"/v1/sessions/{sid}").status_code == 401

    # Alice still can, and nothing Bob did touched the session.
    mine = call(gw, ALICE, "GET", f"/v1/sessions/{sid}")
    assert mine.status_code == 200 and mine.json()["status"] == "done"
    again = call(gw, ALICE, "POST", "/v1/chat/completions", ask("A follow-up."), session=sid)
    assert again.status_code == 200 and again.json()["glimprouter"]["turn"] == 1

    # The router's own clients (no owner) do not see a keyed session either.
    with pytest.raises(grpc.RpcError) as err:
        gw["router"].GetSession(pb.GetSessionRequest(session_id=sid), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_running_session_is_404_not_busy_for_another_key(gw):
    events: list[dict] = []

    def stream() -> None:
        body = {**ask("A long one for Alice."), "stream": True}
        with httpx.stream("POST", gw["url"] + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {ALICE}"}, timeout=30) as r:
            events.append({"sid": r.headers["x-glimprouter-session"]})
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    sid = events[0]["sid"]
    r = call(gw, BOB, "POST", "/v1/chat/completions", {"messages": []}, session=sid)
    assert r.status_code == 404  # Alice's own resume would get 409: Bob learns nothing
    assert call(gw, ALICE, "POST", "/v1/chat/completions", {"messages": []}, session=sid).status_code == 409
    t.join(30)
    assert "finish_reason" in json.dumps(events[-1])


def test_session_ids_are_128_random_bits_and_keys_are_never_stored(gw):
    ids = set()
    for i in range(12):
        r = call(gw, ALICE, "POST", "/v1/chat/completions", {**ask(f"Question {i}"), "budgets": {"max_steps": 1}})
        ids.add(r.json()["glimprouter"]["session_id"])
    assert len(ids) == 12 and all(re.fullmatch(r"[0-9a-f]{32}", x) for x in ids)
    # 128 bits: no fixed nibble (as UUID4's version and variant would be) across the ids.
    for pos in range(32):
        assert len({x[pos] for x in ids}) > 1, f"nibble {pos} never changes"

    r = gw["redis"].client()
    meta = r.hgetall(f"own:{{{next(iter(ids))}}}:meta")
    assert meta[b"owner"].decode() == owners.owner_id(ALICE) != ALICE
    for key in r.scan_iter("*"):
        kind = r.type(key)
        values = {b"string": lambda: [r.get(key)], b"hash": lambda: list(r.hgetall(key).values()),
                  b"list": lambda: r.lrange(key, 0, -1), b"zset": lambda: [m for m, _ in r.zrange(key, 0, -1, withscores=True)]}
        for v in values.get(kind, lambda: [])():
            assert ALICE.encode() not in v and BOB.encode() not in v
