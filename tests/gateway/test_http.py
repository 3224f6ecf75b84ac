"""The gateway over HTTP against a scripted router: the OpenAI client's view,
errors and their statuses, auth, limits, disconnects, health and metrics."""
from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def gw(fake_router, gateways):
    return gateways(fake_router.address)


@pytest.fixture(scope="module")
def client(gw):
    return openai.OpenAI(base_url=gw + "/v1", api_key="unused", max_retries=0, timeout=30)


def post(gw, body, headers=None, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(gw + "/v1/chat/completions", content=data, headers=headers or {}, timeout=30, **kw)


def assert_openai_error(r, status, param="__any__"):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param != "__any__":
        assert err["param"] == param
    return err


# ---- the OpenAI client ----------------------------------------------------------------------------
def test_non_streaming_completion(client, fake_router):
    r = client.chat.completions.create(model="glimprouter", messages=MSG, extra_body={"policy": "glimpse", "threshold": 1.1})
    msg = r.choices[0].message
    assert msg.content == "The answer is **5**."
    assert msg.reasoning_content == "Two plus three.\n\nWait, count: 2 + 3 = 5.\n\nSo 5."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 22 and r.usage.completion_tokens_details.reasoning_tokens == 16
    g = r.glimprouter
    assert g["session_id"] == "sess-1" and g["steps"] == {"total": 3, "small": 2, "large": 1}
    assert g["intervention_rate"] == pytest.approx(1 / 3) and g["latency_ms"] == 20.0
    assert [s["model"] for s in g["step_log"]] == ["small", "large", "small"] and g["step_log"][1]["entropy"] == 1.42
    sent = fake_router.requests[-1]
    assert sent.routing.policy == "glimpse" and sent.routing.threshold == 1.1


def test_streaming_chunks_assemble_to_the_non_streaming_result(client):
    full = client.chat.completions.create(model="glimprouter", messages=MSG)
    stream = client.chat.completions.create(model="glimprouter", messages=MSG, stream=True,
                                            stream_options={"include_usage": True})
    content, reasoning, finish, usage, info, steps, done = "", "", None, None, None, [], []
    for chunk in stream:
        extra = chunk.model_extra.get("glimprouter") or {}
        if "step" in extra:
            steps.append(extra["step"])
        if "step_done" in extra:
            done.append(extra["step_done"])
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            content += ch.delta.content or ""
            reasoning += getattr(ch.delta, "reasoning_content", None) or ""
            if ch.finish_reason:
                finish, info = ch.finish_reason, extra
    assert content == full.choices[0].message.content
    assert reasoning == full.choices[0].message.reasoning_content
    assert finish == full.choices[0].finish_reason
    assert usage.model_dump() == full.usage.model_dump()
    assert info == full.glimprouter and done == full.glimprouter["step_log"]
    # Each step's routing came with its first chunk, as soon as the writer was chosen.
    assert [(s["index"], s["model"], s["entropy"]) for s in steps] == [
        (s["index"], s["model"], s["entropy"]) for s in full.glimprouter["step_log"]]


def test_session_header_continues_and_comes_back(gw, fake_router):
    r = post(gw, {"messages": [*MSG, {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4+4?"}]},
             {"X-GlimpRouter-Session": "sess-1"})
    assert r.status_code == 200 and r.headers["x-glimprouter-session"] == "sess-1"
    sent = fake_router.requests[-1]
    assert sent.session_id == "sess-1" and [m.content for m in sent.messages] == ["and 4+4?"]
    assert r.json()["glimprouter"]["turn"] == 1


def test_unknown_session_is_404(client, gw):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="glimprouter", messages=MSG,
                                       extra_headers={"X-GlimpRouter-Session": "missing"})
    assert_openai_error(httpx.get(gw + "/v1/sessions/nope"), 404)


def test_session_endpoint(gw):
    s = httpx.get(gw + "/v1/sessions/sess-1").json()
    assert s["id"] == "sess-1" and s["status"] == "done" and s["options"] == {"routing": {}}
    assert [x["model"] for x in s["steps"]] == ["small", "large", "small"] and s["steps"][0]["text"]


def test_models(client, gw):
    assert [m.id for m in client.models.list()] == ["glimprouter"]
    assert httpx.get(gw + "/v1/models/glimprouter").json()["id"] == "glimprouter"
    assert_openai_error(httpx.get(gw + "/v1/models/gpt-4o"), 404)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSG)


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("code,status,exc", [
    ("INVALID_ARGUMENT", 400, openai.BadRequestError),
    ("NOT_FOUND", 404, openai.NotFoundError),
    ("ABORTED", 409, openai.ConflictError),
    ("RESOURCE_EXHAUSTED", 429, openai.RateLimitError),
    ("UNAVAILABLE", 503, openai.InternalServerError),
    ("INTERNAL", 500, openai.InternalServerError),
])
def test_router_refusals_map_to_http_statuses(client, gw, code, status, exc):
    body = {"messages": [{"role": "user", "content": f"abort:{code}"}]}
    assert_openai_error(post(gw, body), status)
    # The stream's status is decided before the first byte, so streaming gets it too.
    assert_openai_error(post(gw, {**body, "stream": True}), status)
    with pytest.raises(exc):
        client.chat.completions.create(model="glimprouter", messages=body["messages"])


def test_failure_mid_stream_is_an_error_event(client):
    stream = client.chat.completions.create(model="glimprouter", messages=[{"role": "user", "content": "midfail"}], stream=True)
    with pytest.raises(openai.APIError, match="a worker crashed"):
        for _ in stream:
            pass


BAD_INPUT = [
    ("malformed JSON", b'{"messages": [', None),
    ("empty body", b"", None),
    ("not an object", b"[1]", None),
    ("missing messages", {"model": "glimprouter"}, "messages"),
    ("messages wrong type", {"messages": "hi"}, "messages"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("temperature wrong type", {"messages": MSG, "temperature": "warm"}, "temperature"),
    ("threshold wrong type", {"messages": MSG, "threshold": [1]}, "threshold"),
    ("budgets wrong type", {"messages": MSG, "budgets": {"max_steps": "3"}}, "budgets.max_steps"),
    ("oversized body", {"messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}, None),
    ("deeply nested JSON", b"[" * 200_000 + b"]" * 200_000, None),
]


@pytest.mark.parametrize("name,body,param", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_input_is_400_and_the_gateway_keeps_serving(gw, name, body, param):
    assert_openai_error(post(gw, body), 400, param)
    assert httpx.get(gw + "/healthz").status_code == 200


def test_unknown_route_and_method_in_openai_format(gw):
    assert_openai_error(httpx.get(gw + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(gw + "/v1/chat/completions"), 405)


# ---- auth --------------------------------------------------------------------------------------------
def test_api_keys_from_flag_and_file(fake_router, gateways, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# mounted secret\nfile-key\n")
    gw = gateways(fake_router.address, "--api-keys", "flag-key", "--api-keys-file", str(keys))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic flag-key"}):
        err = assert_openai_error(post(gw, {"messages": MSG}, headers), 401)
        assert err["code"] == "invalid_api_key"
    assert_openai_error(httpx.get(gw + "/v1/models"), 401)
    for key in ("flag-key", "file-key"):
        assert post(gw, {"messages": MSG}, {"Authorization": f"Bearer {key}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw + "/v1", api_key="nope", max_retries=0).models.list()
    assert openai.OpenAI(base_url=gw + "/v1", api_key="file-key", max_retries=0).models.list().data
    # Probes and scrapers need no key.
    assert httpx.get(gw + "/healthz").status_code == 200 and httpx.get(gw + "/metrics").status_code == 200
    # Keys never reach the logs.
    svc = gateways.services[-1]
    assert not any("flag-key" in line or "file-key" in line for line in svc.log_tail)


# ---- limits, deadlines, disconnects ------------------------------------------------------------------------
def test_concurrency_limit_429_and_deadline_504(fake_router, gateways):
    gw = gateways(fake_router.address, "--max-concurrent", "1", "--request-timeout-s", "1.5")
    fake_router.ended.clear()
    with httpx.Client(timeout=30) as c, c.stream("POST", gw + "/v1/chat/completions",
                                                  json={"messages": [{"role": "user", "content": "slow"}], "stream": True}) as r:
        assert r.status_code == 200
        err = assert_openai_error(post(gw, {"messages": MSG}), 429)
        assert err["type"] == "rate_limit_error"
        # The slow stream hits its deadline: an error event ends it.
        body = b"".join(r.iter_bytes()).decode()
        assert '"code":"timeout"' in body
    assert fake_router.ended.wait(5)
    # Before any event: a plain 504.
    r = post(gw, {"messages": [{"role": "user", "content": "slow"}]})
    assert_openai_error(r, 504)
    assert post(gw, {"messages": MSG}).status_code == 200  # the slot is free again


def _raw_request(address: str, body: dict) -> socket.socket:
    host, port = address.split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_router_call(gw, fake_router, stream):
    fake_router.ended.clear()
    calls = len(fake_router.requests)
    sock = _raw_request(urlparse(gw).netloc, {"messages": [{"role": "user", "content": "slow"}], "stream": stream})
    deadline = time.monotonic() + 10
    while len(fake_router.requests) == calls:  # the gateway's call has reached the router
        assert time.monotonic() < deadline, "the gateway never called the router"
        time.sleep(0.01)
    sock.close()
    # The slow call would run for 30 s; ending within seconds means the gateway cancelled it.
    assert fake_router.ended.wait(5)
    metrics = httpx.get(gw + "/metrics").text
    assert "glimprouter_gateway_client_disconnects_total" in metrics


# ---- health and metrics ------------------------------------------------------------------------------
def test_health_ready_and_metrics(gw, client):
    assert httpx.get(gw + "/healthz").json() == {"status": "ok"}
    r = httpx.get(gw + "/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    client.chat.completions.create(model="glimprouter", messages=MSG)
    m = httpx.get(gw + "/metrics")
    assert m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'glimprouter_gateway_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert 'glimprouter_gateway_steps_total{model="large"}' in text
    assert "glimprouter_gateway_request_duration_seconds_bucket" in text


def test_router_down_is_503_and_not_ready(gateways):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    gw = gateways(dead, "--ready-timeout-s", "0.5")
    assert httpx.get(gw + "/healthz").status_code == 200
    r = httpx.get(gw + "/readyz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    err = assert_openai_error(post(gw, {"messages": MSG}), 503)
    assert err["code"] == "router_unavailable"
    assert post(gw, {"messages": MSG}).headers.get("retry-after") == "1"


def test_no_tracebacks_in_gateway_logs(gateways):
    # Runs last in this module: every path above must have been handled, not crashed.
    for svc in gateways.services:
        assert not any("Traceback" in line for line in svc.log_tail), "\n".join(svc.log_tail)
