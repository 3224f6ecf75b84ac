"""TLS on every gRPC hop, mutual TLS between the router and the workers (and from
the gateway to the router), with certificates from a CA made in the test.
Plaintext only when no certificate is configured, and then said in the log."""
from __future__ import annotations

import grpc
import httpx
import pytest

from glimprouter.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common import procs


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def creds(ca: str | None, leaf=None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca) if ca else None,
        private_key=_read(leaf.key) if leaf else None,
        certificate_chain=_read(leaf.cert) if leaf else None,
    )


def model_info(address: str, credentials: grpc.ChannelCredentials | None) -> worker_pb2.ModelInfo:
    ch = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with ch:
        return worker_pb2_grpc.ModelWorkerStub(ch).GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=3)


def refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        model_info(address, credentials)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    return err.value


@pytest.fixture(scope="module")
def secure(pki, faults):
    s = faults.Stack()
    try:
        r = s.redis()
        wt = ("--tls-cert", pki.worker.cert, "--tls-key", pki.worker.key, "--tls-client-ca", pki.ca)
        small, large = s.sim("sim-small", *wt), s.sim("sim-large", *wt)
        router = s.router(
            [small.address], [large.address], r.url,
            "--tls-cert", pki.router.cert, "--tls-key", pki.router.key, "--tls-client-ca", pki.ca,
            "--worker-tls-ca", pki.ca, "--worker-tls-cert", pki.router_client.cert, "--worker-tls-key", pki.router_client.key,
        )
        gateway = s.gateway(router.address, "--router-tls-ca", pki.ca, "--router-tls-cert", pki.gateway_client.cert,
                            "--router-tls-key", pki.gateway_client.key)
        yield s, small, router, gateway
    finally:
        s.close()


def test_a_completion_crosses_every_hop_over_mutual_tls(secure):
    _, small, router, gateway = secure
    base = f"http://{gateway.address}"
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    r = httpx.post(f"{base}/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "Add 2 and 3."}], "answer_by": "none"})
    assert r.status_code == 200, r.text
    assert r.json()["glimprouter"]["steps"]["total"] > 0
    # Each process said how it serves and calls.
    assert any("worker serves gRPC over mutual TLS" in ln for ln in small.log_tail)
    assert any("router serves gRPC over mutual TLS" in ln for ln in router.log_tail)
    assert any("calls to workers use mutual TLS" in ln for ln in router.log_tail)
    assert not any("PLAINTEXT" in ln for ln in small.log_tail + router.log_tail)


def test_worker_refuses_clients_without_a_certificate_from_its_ca(secure, pki):
    _, small, _, _ = secure
    assert model_info(small.address, creds(pki.ca, pki.router_client)).model_id == "sim-small"  # the router's identity
    refused(small.address, None)  # plaintext
    refused(small.address, creds(pki.ca))  # TLS, but no client certificate
    refused(small.address, creds(pki.ca, pki.impostor))  # a certificate from another CA
    refused(small.address, creds(pki.wrong_ca, pki.router_client))  # the worker's certificate does not verify


def test_router_refuses_clients_without_a_certificate_from_its_ca(secure, pki):
    _, _, router, _ = secure
    req = router_pb2.GetSessionRequest(session_id="nope")
    for bad in (None, creds(pki.ca), creds(pki.ca, pki.impostor), creds(pki.wrong_ca, pki.gateway_client)):
        ch = grpc.secure_channel(router.address, bad) if bad else grpc.insecure_channel(router.address)
        with ch, pytest.raises(grpc.RpcError) as err:
            router_pb2_grpc.RouterStub(ch).GetSession(req, timeout=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(router.address, creds(pki.ca, pki.gateway_client)) as ch:
        with pytest.raises(grpc.RpcError) as err:
            router_pb2_grpc.RouterStub(ch).GetSession(req, timeout=3)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # through: the handshake passed


def test_a_router_that_trusts_the_wrong_ca_does_not_start(secure, pki, faults):
    s, small, _, _ = secure
    with pytest.raises(procs.ServiceFailed) as err:
        s.router([small.address], [small.address], "redis://127.0.0.1:1/0", "--connect-timeout-s", "2",
                 "--worker-tls-ca", pki.wrong_ca, "--worker-tls-cert", pki.router_client.cert,
                 "--worker-tls-key", pki.router_client.key)
    assert "no small worker answered" in str(err.value) or "no large worker answered" in str(err.value)


def test_half_configured_tls_is_a_startup_error_and_plaintext_is_announced(stack, pki):
    with pytest.raises(procs.ServiceFailed) as err:
        stack.sim("sim-x", "--tls-cert", pki.worker.cert)  # no key
    assert "TLS configuration" in str(err.value) and "--tls-key" in str(err.value)
    plain = stack.sim("sim-plain")
    assert any("PLAINTEXT gRPC" in ln and "no --tls-cert configured" in ln for ln in plain.log_tail)
