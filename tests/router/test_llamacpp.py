"""End to end with a real model: SmolLM2-135M in llama.cpp workers behind the router.

SmolLM2 cannot reason; these tests check the plumbing: token-mode and text-mode
prefixes, and that fused and separate glimpses make the same decisions.
"""
from __future__ import annotations

import statistics

import grpc
import pytest

from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import worker_pb2, worker_pb2_grpc
from services.common import procs

pytestmark = pytest.mark.slow

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have? Think step by step."
BUDGETS = pb.Budgets(step_tokens=24, thinking_tokens=120, answer_tokens=32)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    svc = procs.start(
        "worker",
        ["services.worker", "--backend", "llamacpp", "--model", str(smollm2_path), "--model-id", "smollm2",
         "--port", "0", "--threads", "2", "--context-length", "2048"],
        timeout=180,
    )
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def smol_stub(smol):
    with grpc.insecure_channel(smol.address) as ch:
        yield worker_pb2_grpc.ModelWorkerStub(ch)


@pytest.fixture(scope="module")
def token_router(smol, redis_url, spawn):
    # One worker serves both roles: same tokenizer, so token mode.
    h = spawn.handle(spawn.router([smol.address], [smol.address], redis_url, "smol:"))
    yield h
    h.close()


def render(stub, text: str) -> list[int]:
    r = stub.RenderPrompt(worker_pb2.RenderPromptRequest(
        messages=[worker_pb2.ChatMessage(role="user", content=text)], add_generation_prompt=True))
    return list(r.token_ids)


def reason(router, **routing):
    return router.stub.Reason(pb.ReasonRequest(
        prompt=QUESTION, budgets=BUDGETS, sampling=pb.SamplingOptions(seed=5), include_token_ids=True,
        routing=pb.RoutingOptions(**routing)), timeout=120)


def test_token_mode_end_to_end(token_router, smol_stub):
    resp = reason(token_router)
    assert resp.prefix_mode == pb.PREFIX_MODE_TOKENS
    assert resp.steps and all(s.text for s in resp.steps)
    assert resp.stats.thinking_end in ("eos", "budget", "repetition")
    assert resp.stats.thinking_tokens == sum(s.tokens for s in resp.steps) <= 120
    # A plain instruct model: the answer is the steps (answer_by defaults to none).
    assert resp.answer == "".join(s.text for s in resp.steps).strip()
    session = token_router.stub.GetSession(pb.GetSessionRequest(session_id=resp.session_id, include_prefix=True))
    expected = render(smol_stub, QUESTION)
    for s in resp.steps:
        expected += list(s.token_ids)
    assert [p.name for p in session.prefixes] == ["shared"]
    assert list(session.prefixes[0].token_ids) == expected


def test_fused_and_separate_make_the_same_decisions(token_router):
    # Put tau at the median first-token entropy of a probe run, so both paths are taken.
    probe = reason(token_router, threshold=1e9)
    tau = statistics.median(s.entropy for s in probe.steps)
    fused = reason(token_router, threshold=tau, glimpse_mode=pb.GLIMPSE_MODE_FUSED)
    separate = reason(token_router, threshold=tau, glimpse_mode=pb.GLIMPSE_MODE_SEPARATE)
    decisions = [s.decision for s in fused.steps]
    assert pb.DECISION_LARGE in decisions and pb.DECISION_SMALL in decisions
    assert decisions == [s.decision for s in separate.steps]
    assert [s.entropy for s in fused.steps] == pytest.approx([s.entropy for s in separate.steps], abs=1e-4)
    assert [s.text for s in fused.steps] == [s.text for s in separate.steps]
    assert fused.answer == separate.answer


def test_text_mode_end_to_end(smol, smol_stub, redis_url, spawn):
    # A sim large model has another tokenizer: the router must fall back to text mode.
    sim = spawn.sim("sim-large", hard_steps="0,1,2,3,4,5,6,7,8,9")
    router = spawn.handle(spawn.router([smol.address], [sim.address], redis_url, "smoltext:"))
    try:
        resp = reason(router, threshold=1.0)
        assert resp.prefix_mode == pb.PREFIX_MODE_TEXT
        roles = {s.role for s in resp.steps}
        session = router.stub.GetSession(pb.GetSessionRequest(session_id=resp.session_id, include_prefix=True))
        views = {p.name: list(p.token_ids) for p in session.prefixes}
        assert set(views) == {"small", "large"}
        # The small model's view: its own prompt, then each step as its own tokens
        # (its steps) or its tokenization of the large model's text.
        expected = render(smol_stub, QUESTION)
        for s in resp.steps:
            if s.role == pb.ROLE_SMALL:
                expected += list(s.token_ids)
            else:
                expected += list(smol_stub.Tokenize(worker_pb2.TokenizeRequest(text=s.text)).token_ids)
        assert views["small"] == expected
        assert views["large"] != views["small"]
        assert resp.steps and roles  # at least one step; which role depends on SmolLM2's entropies
    finally:
        router.close()
        sim.stop()
