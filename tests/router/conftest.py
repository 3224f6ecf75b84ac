"""Router test fixtures: a private Redis, sim/llama.cpp workers and routers as real
processes over loopback gRPC.

The Redis server is our own (a free port, no persistence), so the tests never touch
the shared instance on 6379 and may look at every key.
"""
from __future__ import annotations

import shutil
import uuid
from types import SimpleNamespace

import grpc
import pytest
import redis

from glimprouter.v1 import router_pb2_grpc
from services.common import procs, redis_local


@pytest.fixture(scope="session")
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    r = redis_local.start_private()
    yield r.url
    r.stop()


@pytest.fixture
def redis_client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def key_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:8]}:"


def start_sim(model_id: str, *, hard_steps: str = "1,3", steps: int = 6, step_tokens: int = 8,
              token_latency_s: float = 0.0, seed: int = 0) -> procs.Service:
    return procs.start(
        "worker",
        ["services.worker", "--backend", "sim", "--model", "sim", "--model-id", model_id, "--port", "0",
         "--sim-hard-steps", hard_steps, "--sim-steps", str(steps), "--sim-step-tokens", str(step_tokens),
         "--sim-token-latency-s", str(token_latency_s), "--sim-seed", str(seed)],
        timeout=60,
    )


def start_router(small: list[str], large: list[str], redis_url: str, key_prefix: str, *extra: str) -> procs.Service:
    return procs.start(
        "router",
        ["services.router", "--port", "0", "--small", ",".join(small), "--large", ",".join(large),
         "--redis-url", redis_url, "--key-prefix", key_prefix, "--health-interval-s", "0.5", *extra],
        timeout=60,
    )


class RouterHandle:
    """A router process and a stub to it."""

    def __init__(self, svc: procs.Service) -> None:
        self.svc = svc
        self.channel = grpc.insecure_channel(svc.address)
        self.stub = router_pb2_grpc.RouterStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.svc.stop()


@pytest.fixture(scope="session")
def spawn():
    """Process helpers for test modules (importlib mode: they cannot import conftest)."""
    return SimpleNamespace(sim=start_sim, router=start_router, handle=RouterHandle)


@pytest.fixture(scope="module")
def sim_pair():
    """Two fast sim workers whose steps 1 and 3 start with high entropy."""
    small, large = start_sim("sim-small"), start_sim("sim-large")
    yield small, large
    small.stop()
    large.stop()


@pytest.fixture(scope="module")
def sim_router(sim_pair, redis_url):
    small, large = sim_pair
    h = RouterHandle(start_router([small.address], [large.address], redis_url, "simrouter:"))
    yield h
    h.close()
