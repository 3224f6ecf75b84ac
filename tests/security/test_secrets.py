"""Redis AUTH and TLS through the URL, and no secrets or prompts in the logs.

The log test runs the whole system with an API key and a Redis password, sends
requests down every path that logs (success, refusal, a client that goes away,
a deadline, session reads, a cancel, shutdown), and greps everything the
processes wrote for the key, the password and the prompt text."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest
import redis

from glimprouter.v1 import router_pb2 as pb
from services.common import procs

PASSWORD = "redis-pw-9c41e07d55"
API_KEY = "sk-live-7f3a9d2c11e0"
PROMPT = "Zanzibar-marmalade-42 costs how much?"


def test_redis_auth_in_the_url_and_a_wrong_password_refused(stack, faults):
    r = stack.redis(password=PASSWORD)
    small, large = stack.sim("sim-small"), stack.sim("sim-large")
    # The URL from the environment (a Kubernetes secret), not the command line other users can read.
    router = stack.router([small.address], [large.address], None, env={"GLIMPROUTER_REDIS_URL": r.url})
    stub = stack.stub(router)
    assert stub.Reason(pb.ReasonRequest(prompt="hi", answer_by=pb.ANSWER_BY_NONE), timeout=30).stats.steps > 0

    wrong = r.url.replace(PASSWORD, "not-the-password")
    with pytest.raises(procs.ServiceFailed) as err:
        stack.router([small.address], [large.address], wrong)
    out = str(err.value)
    assert "did not answer" in out and ":***@" in out  # one clear line, the password masked
    assert "not-the-password" not in out and "Traceback" not in out


def test_redis_over_tls_with_a_private_ca(stack, pki, faults, tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = faults.free_port()
    proc = subprocess.Popen(
        [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "",
         "--appendonly", "no", "--tls-cert-file", pki.redis.cert, "--tls-key-file", pki.redis.key,
         "--tls-ca-cert-file", pki.ca, "--tls-auth-clients", "no", "--requirepass", PASSWORD],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, ssl_ca_certs=pki.ca, socket_timeout=2)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.skip("this redis-server was built without TLS")
                time.sleep(0.05)
        small, large = stack.sim("sim-small"), stack.sim("sim-large")
        router = stack.router([small.address], [large.address], url, "--redis-tls-ca", pki.ca)
        stub = stack.stub(router)
        sid = stub.Reason(pb.ReasonRequest(prompt="hi", answer_by=pb.ANSWER_BY_NONE), timeout=30).session_id
        assert client.exists(f"faults:{{{sid}}}:meta")
        # The same server, but trusting only the system roots: the handshake fails, clearly.
        with pytest.raises(procs.ServiceFailed) as err:
            stack.router([small.address], [large.address], url)
        assert "did not answer" in str(err.value) and PASSWORD not in str(err.value)
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_no_secrets_or_prompts_in_any_log(stack, faults):
    r = stack.redis(password=PASSWORD)
    small = stack.sim("sim-small", token_latency_s=0.02)
    large = stack.sim("sim-large", token_latency_s=0.02)
    router = stack.router([small.address], [large.address], None, env={"GLIMPROUTER_REDIS_URL": r.url})
    gateway = stack.gateway(router.address, "--api-keys", API_KEY, "--request-timeout-s", "5")
    url = f"http://{gateway.address}"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"messages": [{"role": "user", "content": PROMPT}]}
    with httpx.Client(timeout=30, headers=auth) as c:
        ok = c.post(f"{url}/v1/chat/completions", json=body)
        assert ok.status_code == 200
        sid = ok.json()["glimprouter"]["session_id"]
        c.post(f"{url}/v1/chat/completions", json={**body, "stream": True})
        c.post(f"{url}/v1/chat/completions", json={**body, "policy": "nope"})  # refused by the router
        c.post(f"{url}/v1/chat/completions", json={**body, "messages": [{"role": "robot", "content": PROMPT}]})
        c.post(f"{url}/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "' + PROMPT.encode() + b'\xff"}]}')
        c.get(f"{url}/v1/sessions/{sid}")
        c.post(f"{url}/v1/sessions/{sid}/cancel")
        c.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong-key"})
        with c.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as resp:
            next(resp.iter_lines())  # then go away mid-stream
        c.post(f"{url}/v1/chat/completions", json={**body, "budgets": {"max_steps": 4096}},
               headers={"X-GlimpRouter-Session": sid})
    time.sleep(0.5)
    services = [small, large, router, gateway]
    for svc in reversed(services):
        assert svc.stop() == 0
    logs = "\n".join(line for svc in services for line in svc.log_tail)
    assert all(len(svc.log_tail) < svc.log_tail.maxlen for svc in services)  # nothing scrolled away unchecked
    assert "ready" in logs  # the capture works
    for secret in (API_KEY, PASSWORD, PROMPT, "Zanzibar"):
        assert secret not in logs, f"{secret!r} leaked into the logs"
    assert os.environ.get("GLIMPROUTER_REDIS_URL") is None  # the test did not leak it into our own env either
