"""A real worker process on SmolLM2 over loopback gRPC, shared by a test module."""
from __future__ import annotations

import grpc
import pytest

from glimprouter.v1 import worker_pb2_grpc
from services.common import procs


def start_worker(model_path, *extra: str) -> procs.Service:
    return procs.start(
        "worker",
        ["services.worker", "--backend", "llamacpp", "--model", str(model_path), "--port", "0",
         "--threads", "2", "--context-length", "2048", "--metrics-port", "0", *extra],
        timeout=180,
    )


@pytest.fixture(scope="module")
def smol_worker(smollm2_path):
    svc = start_worker(smollm2_path)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def worker_stub(smol_worker):
    channel = grpc.insecure_channel(smol_worker.address)
    yield worker_pb2_grpc.ModelWorkerStub(channel)
    channel.close()


@pytest.fixture
def worker_factory(smollm2_path):
    """Start extra workers for one test; all are stopped after it."""
    started: list[procs.Service] = []

    def make(*extra: str) -> procs.Service:
        started.append(start_worker(smollm2_path, *extra))
        return started[-1]

    yield make
    for svc in started:
        svc.kill()
