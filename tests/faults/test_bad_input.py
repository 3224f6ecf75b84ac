"""Malformed requests at every boundary (gateway HTTP, router gRPC, worker gRPC):
wrong types, empty and oversized fields, invalid UTF-8, NaN and infinities,
unknown enum values, huge token ids, prompts over the context. Each gets a clear
error (the right status, words that say what is wrong) and the service stays up.

The services run with small limits (a 256-token context, 64 KiB messages), so
"over the limit" costs nothing to send.
"""
from __future__ import annotations

import json

import grpc
import httpx
import pytest

from glimprouter.v1 import router_pb2 as rpb
from glimprouter.v1 import worker_pb2 as wpb
from glimprouter.v1 import worker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

LIMIT = 64 * 1024
CONTEXT = 256
LONG_TEXT = " ".join(["apples"] * 400)  # ~400 sim tokens: over the 256-token context, under 64 KiB
HUGE_TEXT = "x" * (LIMIT + 1024)


@pytest.fixture(scope="module")
def svc(faults):
    s = faults.Stack()
    try:
        r = s.redis()
        small = s.sim("sim-small", "--context-length", str(CONTEXT), "--max-message-bytes", str(LIMIT))
        large = s.sim("sim-large", "--context-length", str(CONTEXT), "--max-message-bytes", str(LIMIT))
        router = s.router([small.address], [large.address], r.url, "--max-message-bytes", str(LIMIT))
        gateway = s.gateway(router.address, "--max-body-bytes", str(LIMIT))
        router_ch = grpc.insecure_channel(router.address)
        worker_ch = grpc.insecure_channel(small.address)
        yield {"gateway": f"http://{gateway.address}", "router": router, "worker": small,
               "router_ch": router_ch, "worker_ch": worker_ch}
        router_ch.close()
        worker_ch.close()
    finally:
        s.close()


def raw_call(channel: grpc.Channel, method: str, payload: bytes, metadata=None):
    """A call with bytes built by hand: what a broken or hostile client can send."""
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    return call(payload, timeout=10, metadata=metadata)


def still_serving(channel: grpc.Channel) -> None:
    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def msg(text: str = "Add 2 and 3.") -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- gateway (HTTP) --------------------------------------------------------------------------------
OK = {"messages": msg(), "answer_by": "none", "budgets": {"max_steps": 2}}

HTTP_CASES = [
    # (name, raw body or JSON object, status, error code, words in the message)
    ("invalid utf-8 bytes", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_json", "not valid JSON"),
    ("not json", b"messages=hello", 400, "invalid_json", "not valid JSON"),
    ("empty body", b"", 400, "invalid_json", "empty"),
    ("array body", [1, 2], 400, "invalid_type", "JSON object"),
    ("string body", "hello", 400, "invalid_type", "JSON object"),
    ("messages missing", {"model": "glimprouter"}, 400, "missing_required_parameter", "'messages' is required"),
    ("messages a string", {"messages": "hi"}, 400, "invalid_type", "array"),
    ("messages empty", {"messages": []}, 400, "invalid_value", "must not be empty"),
    ("message not an object", {"messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "role"),
    ("role a list", {"messages": [{"role": ["user"], "content": "hi"}]}, 400, "invalid_value", "role"),
    ("content a number", {"messages": [{"role": "user", "content": 42}]}, 400, "invalid_type", "content"),
    ("content blank", {"messages": [{"role": "user", "content": "   "}]}, 400, "invalid_value", "empty"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "invalid_value", "not valid Unicode"),
    ("surrogate in a key", b'{"messages": [{"role": "user", "content": "hi"}], "params": {"\\udc00": 1}}', 400, "invalid_value", "Unicode"),
    ("temperature a string", {**OK, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "invalid_type", "finite"),
    ("threshold Infinity", b'{"messages": [{"role": "user", "content": "hi"}], "threshold": Infinity}', 400, "invalid_type", "finite"),
    ("top_p -Infinity", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', 400, "invalid_type", "finite"),
    ("threshold 1e400", b'{"messages": [{"role": "user", "content": "hi"}], "threshold": 1e400}', 400, "invalid_type", "finite"),
    ("policy param NaN", b'{"messages": [{"role": "user", "content": "hi"}], "policy": "random", "params": {"p": NaN}}', 400, "invalid_value", "'p'"),
    ("seed negative", {**OK, "seed": -1}, 400, "invalid_value", "seed"),
    ("seed over 64 bits", {**OK, "seed": 2**64}, 400, "invalid_value", "seed"),
    ("seed a float", {**OK, "seed": 1.5}, 400, "invalid_type", "seed"),
    ("budget over int32", {**OK, "budgets": {"max_steps": 2**40}}, 400, "invalid_value", "budgets.max_steps"),
    ("budget negative", {**OK, "budgets": {"step_tokens": -3}}, 400, "invalid_value", "budgets.step_tokens"),
    ("budget unknown", {**OK, "budgets": {"steps": 3}}, 400, "invalid_value", "unknown budgets"),
    ("top_k huge", {**OK, "entropy_top_k": 10**12}, 400, "invalid_value", "entropy_top_k"),
    ("top_k over the router's", {**OK, "entropy_top_k": 5000}, 400, "invalid_value", "top_k"),
    ("unknown entropy", {**OK, "entropy": "shannon"}, 400, "invalid_value", "entropy"),
    ("unknown glimpse_mode", {**OK, "glimpse_mode": "psychic"}, 400, "invalid_value", "glimpse_mode"),
    ("unknown answer_by", {**OK, "answer_by": "robot"}, 400, "invalid_value", "answer_by"),
    ("unknown policy", {**OK, "policy": "coin-flip"}, 400, "invalid_value", "unknown policy"),
    ("policy a number", {**OK, "policy": 7}, 400, "invalid_type", "policy"),
    ("stream a string", {**OK, "stream": "yes"}, 400, "invalid_type", "stream"),
    ("n=2", {**OK, "n": 2}, 400, "invalid_value", "n=1"),
    ("body over the limit", {"messages": msg(HUGE_TEXT)}, 400, "request_too_large", "exceeds"),
    ("prompt over the context", {"messages": msg(LONG_TEXT)}, 400, "invalid_value", "context holds 256"),
    ("bad session id", None, 400, "invalid_value", "session_id"),
]


@pytest.mark.parametrize("name, body, status, code, words", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_gateway_refuses_bad_input_clearly(svc, name, body, status, code, words):
    url = svc["gateway"] + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if name == "bad session id":
        headers["X-GlimpRouter-Session"] = "../../etc/passwd"
        body = {"messages": msg()}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url, content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert words in err["message"], err
    assert httpx.get(svc["gateway"] + "/healthz", timeout=5).status_code == 200


def test_gateway_serves_after_all_that(svc):
    r = httpx.post(svc["gateway"] + "/v1/chat/completions", json=OK, timeout=30)
    assert r.status_code == 200 and r.json()["glimprouter"]["steps"]["total"] == 2


# ---- router (gRPC) ---------------------------------------------------------------------------------------
REASON = "/glimprouter.v1.Router/Reason"


def _reason(**kw) -> bytes:
    return rpb.ReasonRequest(**kw).SerializeToString()


ROUTER_CASES = [
    # (name, serialized request, status, words)
    ("invalid utf-8 in prompt", bytes([0x1A, 0x02, 0xFF, 0xFE]), "INVALID_ARGUMENT", "not a valid protobuf message"),
    ("invalid utf-8 in a message", _reason(messages=[rpb.Message(role="user", content="x")]).replace(b"x", b"\xc3\x28"),
     "INVALID_ARGUMENT", "UTF-8"),
    ("truncated bytes", _reason(prompt="hello there")[:-4], "INVALID_ARGUMENT", "not a valid protobuf message"),
    ("prompt sent as a varint", bytes([0x18, 0x05]), "INVALID_ARGUMENT", "messages is empty"),
    ("empty request", b"", "INVALID_ARGUMENT", "messages is empty"),
    ("empty message", _reason(messages=[rpb.Message(role="user", content="")]), "INVALID_ARGUMENT", "empty"),
    ("unknown role", _reason(messages=[rpb.Message(role="root", content="hi")]), "INVALID_ARGUMENT", "role"),
    ("unknown answer_by", _reason(prompt="hi", answer_by=99), "INVALID_ARGUMENT", "answer_by"),
    ("unknown glimpse_mode", _reason(prompt="hi", routing=rpb.RoutingOptions(glimpse_mode=7)), "INVALID_ARGUMENT", "glimpse_mode"),
    ("unknown entropy", _reason(prompt="hi", routing=rpb.RoutingOptions(entropy=9)), "INVALID_ARGUMENT", "entropy"),
    ("threshold NaN", _reason(prompt="hi", routing=rpb.RoutingOptions(threshold=float("nan"))), "INVALID_ARGUMENT", "finite"),
    ("threshold inf", _reason(prompt="hi", routing=rpb.RoutingOptions(threshold=float("inf"))), "INVALID_ARGUMENT", "finite"),
    ("param NaN", _reason(prompt="hi", routing=rpb.RoutingOptions(policy="random", params={"p": float("nan")})),
     "INVALID_ARGUMENT", "'p'"),
    ("temperature inf", _reason(prompt="hi", sampling=rpb.SamplingOptions(temperature=float("inf"))), "INVALID_ARGUMENT", "temperature"),
    ("top_p NaN", _reason(prompt="hi", sampling=rpb.SamplingOptions(top_p=float("nan"))), "INVALID_ARGUMENT", "top_p"),
    ("top_k huge", _reason(prompt="hi", routing=rpb.RoutingOptions(top_k=2**31 - 1)), "INVALID_ARGUMENT", "top_k"),
    ("negative budget", _reason(prompt="hi", budgets=rpb.Budgets(step_tokens=-1)), "INVALID_ARGUMENT", "step_tokens"),
    ("session id too long", _reason(session_id="s" * 300), "INVALID_ARGUMENT", "session_id"),
    ("session id with a slash", _reason(session_id="a/b"), "INVALID_ARGUMENT", "session_id"),
    ("unknown session", _reason(session_id="0" * 32), "NOT_FOUND", "not found"),
    ("prompt over the context", _reason(prompt=LONG_TEXT), "INVALID_ARGUMENT", "context holds 256"),
    ("message over the size limit", _reason(prompt=HUGE_TEXT), "RESOURCE_EXHAUSTED", "larger than max"),
    ("too many messages", _reason(messages=[rpb.Message(role="user", content="x")] * 1500), "INVALID_ARGUMENT", "1024"),
]


@pytest.mark.parametrize("name, payload, code, words", ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES])
def test_router_refuses_bad_input_clearly(svc, name, payload, code, words):
    with pytest.raises(grpc.RpcError) as err:
        raw_call(svc["router_ch"], REASON, payload)
    assert err.value.code().name == code, (err.value.code(), err.value.details())
    assert words in err.value.details(), err.value.details()
    still_serving(svc["router_ch"])


def test_router_refuses_a_malformed_owner_and_serves_after_all_that(svc):
    with pytest.raises(grpc.RpcError) as err:
        raw_call(svc["router_ch"], REASON, _reason(prompt="hi"), metadata=(("x-glimprouter-owner", "not-hex"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-glimprouter-owner" in err.value.details()
    ok = rpb.ReasonResponse.FromString(raw_call(svc["router_ch"], REASON, _reason(prompt="hi", answer_by=rpb.ANSWER_BY_NONE)))
    assert ok.stats.steps > 0


# ---- worker (gRPC) ----------------------------------------------------------------------------------------
W = "/glimprouter.v1.ModelWorker/"


def _ids(ids) -> wpb.Prompt:
    return wpb.Prompt(token_ids=wpb.TokenIds(ids=ids))


def _glimpse(**kw) -> bytes:
    return wpb.GlimpseRequest(**kw).SerializeToString()


def _step(**kw) -> bytes:
    return wpb.StepRequest(**{"prompt": _ids([1, 300]), **kw}).SerializeToString()


def _gen(**kw) -> bytes:
    return wpb.GenerateRequest(**{"prompt": _ids([1, 300]), **kw}).SerializeToString()


WORKER_CASES = [
    ("invalid utf-8 text", "Tokenize", bytes([0x0A, 0x03, 0x61, 0xFF, 0x62]), "INVALID_ARGUMENT", "not a valid protobuf message"),
    ("invalid utf-8 prompt text", "Glimpse", bytes([0x0A, 0x04, 0x12, 0x02, 0xED, 0xA0]), "INVALID_ARGUMENT", "UTF-8"),
    ("no prompt", "Glimpse", _glimpse(), "INVALID_ARGUMENT", "prompt: is required"),
    ("empty token ids", "Glimpse", _glimpse(prompt=_ids([])), "INVALID_ARGUMENT", "is empty"),
    ("empty prompt text", "Glimpse", _glimpse(prompt=wpb.Prompt(text="")), "INVALID_ARGUMENT", "prompt.text: is empty"),
    ("huge token id", "Glimpse", _glimpse(prompt=_ids([1, 2**31 - 1])), "INVALID_ARGUMENT", "out of range"),
    ("negative token id", "Glimpse", _glimpse(prompt=_ids([-7])), "INVALID_ARGUMENT", "out of range"),
    ("prompt over the context", "Glimpse", _glimpse(prompt=_ids([300] * (CONTEXT + 10))), "INVALID_ARGUMENT", "context holds 256"),
    ("text prompt over the context", "Generate", _gen(prompt=wpb.Prompt(text=LONG_TEXT)), "INVALID_ARGUMENT", "context holds 256"),
    ("top_k huge", "Glimpse", _glimpse(prompt=_ids([1]), top_k=10**6), "INVALID_ARGUMENT", "top_k"),
    ("threshold NaN", "Step", _step(threshold=float("nan")), "INVALID_ARGUMENT", "NaN"),
    ("unknown entropy method", "Step", _step(entropy_method=42), "INVALID_ARGUMENT", "unknown entropy method"),
    ("temperature NaN", "Generate", _gen(sampling=wpb.Sampling(temperature=float("nan"))), "INVALID_ARGUMENT", "temperature"),
    ("temperature inf", "Generate", _gen(sampling=wpb.Sampling(temperature=float("inf"))), "INVALID_ARGUMENT", "temperature"),
    ("top_p NaN", "Generate", _gen(sampling=wpb.Sampling(top_p=float("nan"))), "INVALID_ARGUMENT", "top_p"),
    ("max_tokens 0", "Generate", _gen(sampling=wpb.Sampling(max_tokens=0)), "INVALID_ARGUMENT", "max_tokens"),
    ("too many stop strings", "Generate", _gen(stop=wpb.StopCondition(stop=["x"] * 17)), "INVALID_ARGUMENT", "stop"),
    ("empty stop string", "Generate", _gen(stop=wpb.StopCondition(stop=[""])), "INVALID_ARGUMENT", "stop[0]"),
    ("session id too long", "Generate", _gen(session_id="s" * 300), "INVALID_ARGUMENT", "session_id"),
    ("no messages", "RenderPrompt", wpb.RenderPromptRequest().SerializeToString(), "INVALID_ARGUMENT", "messages"),
    ("unknown role", "RenderPrompt", wpb.RenderPromptRequest(messages=[wpb.ChatMessage(role="x", content="y")]).SerializeToString(),
     "INVALID_ARGUMENT", "role"),
    ("too many messages", "RenderPrompt",
     wpb.RenderPromptRequest(messages=[wpb.ChatMessage(role="user", content="y")] * 1100).SerializeToString(),
     "INVALID_ARGUMENT", "1024"),
    ("over the size limit", "Tokenize", wpb.TokenizeRequest(text=HUGE_TEXT).SerializeToString(), "RESOURCE_EXHAUSTED", "larger than max"),
]


@pytest.mark.parametrize("name, method, payload, code, words", WORKER_CASES, ids=[c[0] for c in WORKER_CASES])
def test_worker_refuses_bad_input_clearly(svc, name, method, payload, code, words):
    with pytest.raises(grpc.RpcError) as err:
        raw_call(svc["worker_ch"], W + method, payload)
    assert err.value.code().name == code, (err.value.code(), err.value.details())
    assert words in err.value.details(), err.value.details()
    still_serving(svc["worker_ch"])


def test_worker_serves_after_all_that(svc):
    stub = worker_pb2_grpc.ModelWorkerStub(svc["worker_ch"])
    g = stub.Glimpse(wpb.GlimpseRequest(prompt=_ids([1, 300, 301])), timeout=10)
    assert g.entropy_full >= 0
