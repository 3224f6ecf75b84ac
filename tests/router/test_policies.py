"""Every policy over real gRPC sim workers (steps 1 and 3 start with high entropy)
and a real router process with real Redis."""
from __future__ import annotations

import random

import pytest

from glimprouter.v1 import router_pb2 as pb
from services.router.config import RouterSettings
from services.router.core import RouterCore
from services.router.loop import step_seed
from services.router.store import SessionStore
from services.router.api.types import Message, ReasonRequest, RoutingOptions, SamplingOptions, Step
from services.router.worker_client import LocalPool
from services.worker.backends.sim import SimModel
from services.worker.scheduler import Scheduler

HARD = {1, 3}
SIM_STEPS = 6  # then the "</think>" step


def reason(router, policy="glimpse", seed=7, **routing):
    req = pb.ReasonRequest(
        prompt="What is 2 + 3?",
        routing=pb.RoutingOptions(policy=policy, **routing),
        sampling=pb.SamplingOptions(seed=seed),
    )
    resp = router.stub.Reason(req, timeout=60)
    assert resp.prefix_mode == pb.PREFIX_MODE_TOKENS  # both sims share a tokenizer
    assert len(resp.steps) == SIM_STEPS + 1
    assert resp.stats.thinking_end == "think_end"
    return resp


def large_steps(resp) -> set[int]:
    return {s.index for s in resp.steps if s.decision == pb.DECISION_LARGE}


@pytest.mark.parametrize("mode", [pb.GLIMPSE_MODE_FUSED, pb.GLIMPSE_MODE_SEPARATE])
def test_glimpse_sends_exactly_the_hard_steps_to_the_large_model(sim_router, mode):
    resp = reason(sim_router, "glimpse", glimpse_mode=mode)
    assert large_steps(resp) == HARD
    for s in resp.steps:
        assert s.threshold == pytest.approx(0.9)
        assert (s.entropy >= 0.9) == (s.index in HARD)
        assert s.role == (pb.ROLE_LARGE if s.index in HARD else pb.ROLE_SMALL)
        assert s.model_id == ("sim-large" if s.index in HARD else "sim-small")
    assert resp.stats.small.glimpses == SIM_STEPS + 1  # one glimpse per step, whoever writes it
    assert resp.stats.intervention_rate == pytest.approx(len(HARD) / (SIM_STEPS + 1))
    assert resp.stats.answer_end == "eos" and resp.answer  # the large model wrote the answer


def test_fused_and_separate_agree_for_the_same_seed(sim_router):
    a = reason(sim_router, glimpse_mode=pb.GLIMPSE_MODE_FUSED, seed=11)
    b = reason(sim_router, glimpse_mode=pb.GLIMPSE_MODE_SEPARATE, seed=11)
    assert [(s.decision, s.text) for s in a.steps] == [(s.decision, s.text) for s in b.steps]


def test_threshold_moves_the_decisions(sim_router):
    assert large_steps(reason(sim_router, threshold=0.01)) == set(range(SIM_STEPS + 1))
    assert large_steps(reason(sim_router, threshold=5.0)) == set()


def test_large_only_and_small_only(sim_router):
    big = reason(sim_router, "large-only")
    assert large_steps(big) == set(range(SIM_STEPS + 1))
    assert big.stats.small.glimpses == 0 and big.stats.small.steps == 0
    small = reason(sim_router, "small-only")
    assert large_steps(small) == set()
    assert small.stats.small.glimpses == 0 and small.stats.large.steps == 0


def test_random_flips_a_seeded_coin_per_step(sim_router):
    assert large_steps(reason(sim_router, "random", params={"p": 0.0})) == set()
    assert large_steps(reason(sim_router, "random", params={"p": 1.0})) == set(range(SIM_STEPS + 1))
    resp = reason(sim_router, "random", seed=3, params={"p": 0.5})
    for s in resp.steps:
        draw = random.Random(step_seed(3, s.index)).random()
        assert s.entropy == pytest.approx(draw)  # the draw is reported as the step's value
        assert (s.decision == pb.DECISION_LARGE) == (draw < 0.5)


def test_verify_keeps_drafts_scoring_at_least_accept_score(sim_router):
    resp = reason(sim_router, "verify", params={"accept_score": 5})
    for s in resp.steps:
        assert s.threshold == 5
        assert 0 <= s.entropy <= 9  # the large model's digit (0 when it offers none)
        if s.entropy >= 5:
            assert s.decision == pb.DECISION_SMALL and s.discarded_tokens == 0
        else:
            assert s.decision == pb.DECISION_LARGE and s.discarded_tokens > 0
    assert resp.stats.small.glimpses == 0
    # Scores depend on the drafts; with accept_score 0 every draft is kept, with 10 none.
    assert large_steps(reason(sim_router, "verify", params={"accept_score": 0})) == set()
    assert large_steps(reason(sim_router, "verify", params={"accept_score": 10})) == set(range(SIM_STEPS + 1))


def test_step_entropy_rewrites_the_steps_whose_mean_entropy_is_high(sim_router):
    # A hard step: one token at ~3.0 nats, seven at ~0.05: mean ~0.42. An easy one: ~0.05.
    resp = reason(sim_router, "step-entropy", threshold=0.3)
    assert large_steps(resp) == HARD
    for s in resp.steps:
        assert (s.discarded_tokens > 0) == (s.index in HARD)
        assert s.entropy == pytest.approx(0.42, abs=0.05) if s.index in HARD else s.entropy < 0.1


@pytest.mark.parametrize("hard_fraction", [0.1, 0.4, 0.7])
async def test_adaptive_holds_its_target_share(redis_url, key_prefix, hard_fraction):
    """60 steps whose first-token entropies are two values only (ties: a plain quantile
    cannot split them). tau = quantile + eta * sum(escalated - target) gives, exactly,
    share = target + c_T / (eta T); the correction ends within a few eta of zero, so the
    share lands within a few steps of the target: 0.05 is 3 steps in 60."""
    store = SessionStore.from_url(redis_url, key_prefix, 600, 5000, 100)
    sims = [Scheduler(SimModel(m, seed=4, steps=60, step_tokens=3, hard_fraction=hard_fraction)) for m in ("s", "l")]
    core = RouterCore(RouterSettings(), store, LocalPool(sims[0]), LocalPool(sims[1]))
    req = ReasonRequest(messages=[Message("user", "hi")], routing=RoutingOptions("adaptive", params={"target": 0.25}),
                        sampling=SamplingOptions(seed=1))
    roles = [ev.role.value async for ev in core.events(req) if isinstance(ev, Step)][:-1]  # drop </think>
    await store.close()
    hard = sum(sims[0].model.is_hard(i) for i in range(60))
    assert len(roles) == 60
    share = roles.count("large") / len(roles)
    assert abs(share - 0.25) <= 0.05, (share, hard)
