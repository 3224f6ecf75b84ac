"""The router answers health while its worker pools are still loading."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import router_pb2_grpc
from services.common import procs
from services.common.redis_local import free_port as _free_port


def _status(stub, name: str):
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
    except grpc.RpcError:
        return None


def test_liveness_first_then_ready_once_workers_answer(redis_url, key_prefix):
    router_port, small_port, large_port = _free_port(), _free_port(), _free_port()
    router = subprocess.Popen(
        [sys.executable, "-m", "services.router", "--port", str(router_port),
         "--small", f"127.0.0.1:{small_port}", "--large", f"127.0.0.1:{large_port}",
         "--redis-url", redis_url, "--key-prefix", key_prefix, "--health-interval-s", "0.5",
         "--connect-timeout-s", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
    )
    workers = []
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{router_port}")
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while _status(health, "liveness") != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "liveness never answered while the workers were absent"
            time.sleep(0.2)
        assert _status(health, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            router_pb2_grpc.RouterStub(channel).Reason(pb.ReasonRequest(prompt="2 + 3?"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in err.value.details()

        for port, model_id in ((small_port, "sim-small"), (large_port, "sim-large")):
            workers.append(procs.start("worker", ["services.worker", "--backend", "sim", "--model-id", model_id,
                                                  "--port", str(port)], timeout=60))
        deadline = time.monotonic() + 30
        while _status(health, "") != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the router never became ready"
            time.sleep(0.2)
        reply = router_pb2_grpc.RouterStub(channel).Reason(pb.ReasonRequest(prompt="2 + 3?"), timeout=30)
        assert reply.steps
        channel.close()
    finally:
        router.terminate()
        router.wait(20)
        for w in workers:
            w.stop()
