"""The Redis session store on its own: leases, guarded appends, packing."""
from __future__ import annotations

import pytest

from services.router.errors import FailedPrecondition, LeaseLost, LimitExceeded, SessionBusy, SessionCancelled
from services.router.session import Kind, Record, SessionMeta
from services.router.store import SessionStore, pack_ids, unpack_ids


@pytest.fixture
async def store(redis_url, key_prefix):
    s = SessionStore.from_url(redis_url, key_prefix, ttl_s=60, lease_ms=400, max_sessions=10)
    yield s
    await s.close()


async def _session(store, sid="s1"):
    token = store.new_lease_token("r1")
    await store.create(sid, token, Record(Kind.PROMPT, 0, text="p", tokens=3), {"shared": [1, 2, 3]}, SessionMeta())
    return token


def test_pack_roundtrip():
    ids = [0, 1, 2**31 - 1, 151935, 7]
    assert unpack_ids(pack_ids(ids)) == ids
    assert pack_ids([1]) == b"\x01\x00\x00\x00"  # int32 little-endian, documented


async def test_append_is_guarded_by_lease_and_position(store):
    token = await _session(store)
    step = Record(Kind.STEP, 0, index=0, role="small", text="a\n\n", tokens=2)
    assert await store.append("s1", token, 1, [(step, {"shared": [4, 5]})], {"steps": "1"}) == 2
    # The same write again (a retry after a lost reply) finds the log moved on.
    with pytest.raises(LeaseLost, match="moved on"):
        await store.append("s1", token, 1, [(step, {"shared": [4, 5]})], {})
    with pytest.raises(LeaseLost, match="lease"):
        await store.append("s1", "r2|other", 2, [(step, {"shared": [6]})], {})
    s = await store.load("s1")
    assert s.prefixes == {"shared": [1, 2, 3, 4, 5]} and len(s.records) == 2 and s.meta.steps == 1
    assert s.lease_holder == "r1"


async def test_one_lease_holder_until_it_expires(store):
    token = await _session(store)
    other = store.new_lease_token("r2")
    with pytest.raises(SessionBusy, match="router r1"):
        await store.acquire("s1", other)
    assert await store.renew("s1", token) == 1
    await store.release("s1", token)
    await store.acquire("s1", other)  # free after release
    assert await store.renew("s1", token) == 0  # the old holder lost it


async def test_expired_lease_can_be_taken(store):
    import asyncio

    await _session(store)
    await asyncio.sleep(0.5)  # lease_ms=400 and nobody renews: the holder "died"
    await store.acquire("s1", store.new_lease_token("r2"))


async def test_cancel_flag_stops_writes_and_renewals(store):
    token = await _session(store)
    assert await store.request_cancel("s1") == 1
    assert await store.renew("s1", token) == 2
    with pytest.raises(SessionCancelled):
        await store.append("s1", token, 1, [], {})
    assert await store.request_cancel("missing") == 0


async def test_create_twice_and_session_limit(store):
    await _session(store, "a")
    with pytest.raises(FailedPrecondition, match="already exists"):
        await _session(store, "a")
    for i in range(9):
        await _session(store, f"n{i}")
    with pytest.raises(LimitExceeded, match="limit 10"):
        await _session(store, "one-too-many")
