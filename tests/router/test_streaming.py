"""The streaming contract of ReasonStream, over real gRPC (sim workers that decode
with a small per-token latency, so steps stream in several pieces) and real Redis:

- per step, StepStart (the decision) comes before any of the step's text;
- the step's deltas add up to the stored step: text, token ids and token count;
- every event of a step agrees with the stored one on who wrote it and why;
- deltas stream: at least some steps come in more than one piece (a draft kept by
  verify or step-entropy is shown whole, once judged);
- a step write is five Redis commands (token mode) and one round trip, and the
  per-step writes leave the session's TTLs alone.
"""
from __future__ import annotations

import asyncio
import math

import pytest

from services.router.api import (
    AnswerDelta, Done, Entropy, GlimpseMode, Message, ReasonRequest, RoutingOptions, SamplingOptions, Started, Step,
    StepDelta, StepStart,
)
from services.router.api.client import RouterClient

POLICIES = [
    RoutingOptions("glimpse", glimpse_mode=GlimpseMode.FUSED),
    RoutingOptions("glimpse", glimpse_mode=GlimpseMode.SEPARATE, entropy=Entropy.FULL),
    RoutingOptions("large-only"),
    RoutingOptions("random", params={"p": 0.5}),
    RoutingOptions("verify", params={"accept_score": 5}),
    RoutingOptions("step-entropy", threshold=0.2),
]
DRAFTS = ("verify", "step-entropy")  # decide after the small model drafted the whole step


@pytest.fixture(scope="module")
def streaming_router(spawn, redis_url):
    """Steps of 12 tokens at 4 ms a token, and a router that forwards every delta as it
    comes (--stream-interval-ms 0): each step streams in several pieces."""
    small = spawn.sim("sim-small", steps=4, step_tokens=12, token_latency_s=0.004)
    large = spawn.sim("sim-large", steps=4, step_tokens=12, token_latency_s=0.004)
    router = spawn.router([small.address], [large.address], redis_url, "streaming:", "--stream-interval-ms", "0")
    yield router
    for svc in (router, small, large):
        svc.stop()


def run(address: str, req: ReasonRequest) -> list:
    async def go():
        async with RouterClient(address) as client:
            return [ev async for ev in client.reason_stream(req, timeout=60)]

    return asyncio.run(go())


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("routing", POLICIES, ids=lambda r: f"{r.policy}-{r.glimpse_mode.value if r.glimpse_mode else ''}")
def test_deltas_follow_the_decision_and_add_up_to_the_stored_step(streaming_router, routing):
    req = ReasonRequest([Message("user", "Count to five.")], routing=routing, sampling=SamplingOptions(seed=5),
                        include_token_ids=True)
    events = run(streaming_router.address, req)
    assert isinstance(events[0], Started) and isinstance(events[-1], Done)
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.index for s in steps] == list(range(len(steps))) and len(steps) == 5
    pieces = 0
    for step in steps:
        mine = [e for e in events if isinstance(e, (StepStart, StepDelta, Step)) and e.index == step.index]
        start, *deltas, last = mine
        # The decision first, then the text, then the stored step: nothing else of this step in between.
        assert isinstance(start, StepStart) and start.attempt == 1 and last is step
        assert all(isinstance(d, StepDelta) for d in deltas) and deltas
        assert "".join(d.text for d in deltas) == step.text
        assert [i for d in deltas for i in d.token_ids] == step.token_ids and len(step.token_ids) == step.tokens
        assert sum(d.tokens for d in deltas) == step.tokens
        assert (start.role, start.decision, start.model_id) == (step.role, step.decision, step.model_id)
        assert same(start.entropy, step.entropy) and same(start.threshold, step.threshold)
        if routing.policy in DRAFTS and step.role.value == "small":
            assert len(deltas) == 1  # a kept draft is shown whole, once judged
        pieces += len(deltas) > 1
    assert pieces > 0  # the text really streamed (in more pieces than one) somewhere
    answer = [e for e in events if isinstance(e, AnswerDelta)]
    assert "".join(a.text for a in answer).strip() == events[-1].answer


def test_a_step_write_is_five_commands_in_one_round_trip_and_leaves_ttls_alone(streaming_router, redis_client):
    """Token mode: GET lease, HMGET cancel/len, RPUSH, APPEND, HSET, in one EVALSHA."""
    from services.router.session import Kind, Record, SessionMeta
    from services.router.store import SessionStore

    async def go():
        store = SessionStore.from_url(f"redis://127.0.0.1:{redis_client.connection_pool.connection_kwargs['port']}/0",
                                      "cmds:", 3600, 5000, 0)
        token = store.new_lease_token("me")
        await store.create("s", token, Record(Kind.PROMPT, 0, text="p", tokens=2), {"shared": [1, 2]}, SessionMeta())
        redis_client.pexpire("cmds:{s}:log", 123_000)  # a TTL the step write must not touch
        before = redis_client.info("commandstats")
        await store.append("s", token, 1, [(Record(Kind.STEP, 0, index=0, text="a", tokens=1), {"shared": [3]})],
                           {"steps": "1"})
        after = redis_client.info("commandstats")
        await store.close()
        return before, after

    before, after = asyncio.run(go())
    ran = {k: after[k]["calls"] - before.get(k, {"calls": 0})["calls"] for k in after}
    ran = {k[len("cmdstat_"):]: v for k, v in ran.items() if v and k != "cmdstat_info"}
    assert ran == {"evalsha": 1, "get": 1, "hmget": 1, "rpush": 1, "append": 1, "hset": 1}, ran
    assert 0 < redis_client.pttl("cmds:{s}:log") <= 123_000
