"""Traces and metrics of real runs: sim workers, routers and a gateway as child
processes export spans over OTLP/gRPC to a TraceService in this process; metrics
are scraped over HTTP.

The sim workers script steps 1 and 3 as hard (high first-token entropy), so a run
has both small and large steps.
"""
from __future__ import annotations

import json
import math
import secrets
import signal
import time
import urllib.request

import grpc
import httpx
import pytest

from cli.__main__ import main as cli_main
from glimprouter.v1 import router_pb2 as pb
from glimprouter.v1 import router_pb2_grpc
from glimprouter.v1 import worker_pb2 as wpb
from glimprouter.v1 import worker_pb2_grpc

MARKER = "Zanzibar-quokka-7731"  # prompt text that must not leak into spans
PROMPT = f"{MARKER}: add 2 and 3."
DECISION = {pb.DECISION_SMALL: "small", pb.DECISION_LARGE: "large"}
WORKER_METHODS = ("Glimpse", "StepStream", "Generate", "GenerateStream")


def stub(svc) -> router_pb2_grpc.RouterStub:
    return router_pb2_grpc.RouterStub(grpc.insecure_channel(svc.address))


def expected_decision(policy: str, step: pb.StepEvent) -> str:
    d = DECISION[step.decision]
    if policy == "verify":
        return "accept" if d == "small" else "reject"
    return d


def session_span(spans, sid):
    found = [s for s in spans if s.name == "session" and s.attributes.get("glimprouter.session.id") == sid]
    return found[0] if len(found) == 1 else None


def ancestors(span, by_id):
    out = []
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        out.append(span)
    return out


def all_text(spans) -> list[str]:
    """Every string in every span attribute (lists flattened)."""
    out = []
    for s in spans:
        for v in s.attributes.values():
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, str):
                    out.append(x)
    return out


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def wait_for_run(receiver, sid: str, n_steps: int, answer: bool, services: tuple[str, ...] = (),
                 names: tuple[str, ...] = ()):
    """The run's spans once its session span and the router's server span above it,
    every step span with the worker spans under it, `services` and spans named `names`
    are in. Each process exports on its own schedule, and a span is exported when it
    ends: the server spans that wrap a call end after everything in it."""

    def ready(spans):
        s = session_span(spans, sid)
        if s is None:
            return None
        mine = [x for x in spans if x.trace_id == s.trace_id]
        by_id = {x.span_id: x for x in mine}
        steps = [x for x in mine if x.name.startswith("step ")]
        workers = [x for x in mine if x.service == "glimprouter-worker"]
        under = {a.span_id for w in workers for a in ancestors(w, by_id)}
        answered = not answer or any(x.name.endswith("/GenerateStream") and any(
            a.name.startswith("answer ") for a in ancestors(x, by_id)) for x in workers)
        if (len(steps) >= n_steps and all(x.span_id in under for x in steps) and answered and s.parent_id in by_id
                and set(services) <= {x.service for x in mine} and set(names) <= {x.name for x in mine}):
            return s, mine
        return None

    return receiver.wait_for(ready)


# ---- traces ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy,mode,entropy",
    [("glimpse", "fused", "top_k"), ("glimpse", "separate", "full"), ("verify", "fused", "top_k")],
)
def test_one_trace_from_router_to_workers_with_a_span_per_step(traced, receiver, policy, mode, entropy):
    routing = pb.RoutingOptions(policy=policy, glimpse_mode=pb.GlimpseMode.Value(f"GLIMPSE_MODE_{mode.upper()}"),
                                entropy=pb.Entropy.Value(f"ENTROPY_{entropy.upper()}"))
    if policy == "glimpse":
        routing.threshold = 1.0
    resp = stub(traced.router).Reason(pb.ReasonRequest(prompt=PROMPT, routing=routing), timeout=60)
    assert resp.steps
    if policy == "glimpse":  # (the sim judge gives no digit: verify rejects every draft)
        assert {s.decision for s in resp.steps} == {pb.DECISION_SMALL, pb.DECISION_LARGE}
    session, mine = wait_for_run(receiver, resp.session_id, len(resp.steps), answer=resp.stats.answer_tokens > 0)
    by_id = {s.span_id: s for s in receiver.spans()}
    trace_id = session.trace_id

    # The router's server span of the call is the session span's parent.
    server = by_id[session.parent_id]
    assert server.service == "glimprouter-router" and server.name == "/glimprouter.v1.Router/Reason"
    assert session.attributes["glimprouter.routing.policy"] == policy
    assert session.attributes["glimprouter.session.steps"] == len(resp.steps)

    # Exactly one span per step, under the session span, named for its decision,
    # carrying what the router returned for that step.
    steps = sorted((s for s in mine if s.name.startswith("step ")), key=lambda s: s.attributes["glimprouter.step.index"])
    assert [s.attributes["glimprouter.step.index"] for s in steps] == [e.index for e in resp.steps]
    endpoints = {traced.small.address, traced.large.address}
    for span, ev in zip(steps, resp.steps):
        a = span.attributes
        want = expected_decision(policy, ev)
        assert span.name == f"step {want}" and a["glimprouter.routing.decision"] == want
        assert a["glimprouter.step.writer"] == DECISION[ev.decision]
        assert span.parent_id == session.span_id and span.trace_id == trace_id
        assert a["gen_ai.request.model"] == ev.model_id
        assert a["glimprouter.session.id"] == a["gen_ai.conversation.id"] == resp.session_id
        assert a["glimprouter.routing.policy"] == policy
        assert a["glimprouter.routing.value"] == pytest.approx(ev.entropy, abs=0, rel=1e-12)
        assert a["glimprouter.routing.threshold"] == pytest.approx(ev.threshold)
        assert a["gen_ai.usage.output_tokens"] == a["glimprouter.step.tokens"] == ev.tokens
        assert a["gen_ai.usage.cache_read.input_tokens"] == a["glimprouter.step.cached_tokens"] == ev.cached_tokens
        assert a["glimprouter.step.finish_reason"] == ev.finish_reason
        assert a["glimprouter.step.retries"] == 0
        assert a["glimprouter.worker.endpoint"] in endpoints
        if policy == "glimpse":
            assert a["glimprouter.glimpse.entropy"] == pytest.approx(ev.entropy, abs=0, rel=1e-12)
            assert a["glimprouter.glimpse.entropy_method"] == entropy
            assert a["glimprouter.routing.signal"] == "glimpse_entropy"
        else:
            assert "glimprouter.glimpse.entropy" not in a and a["glimprouter.routing.signal"] == "verify_score"

    # The workers' server spans are in the same trace, below the step that made them.
    step_ids = {s.span_id for s in steps}
    workers = [s for s in mine if s.service == "glimprouter-worker"]
    assert workers
    for w in workers:
        chain = ancestors(w, by_id)
        assert session in chain, w.name
        if w.name.rsplit("/", 1)[-1] in ("Glimpse", "StepStream", "Generate", "GenerateStream"):
            # A step's calls are under its span; the answer's (GenerateStream) under the answer's.
            assert step_ids & {c.span_id for c in chain} or any(c.name.startswith("answer ") for c in chain), w.name
    for s in steps:  # every step called a worker, and the calls are its children's children
        assert any(s in ancestors(w, by_id) for w in workers)
        assert any(w.attributes.get("gen_ai.request.model") == s.attributes["gen_ai.request.model"]
                   for w in workers if s in ancestors(w, by_id))
    if mode == "separate":
        assert any(w.name.endswith("/Glimpse") for w in workers)

    # Redis: the session's creation under the session span, each step's write under its step.
    redis = [s for s in mine if s.name.startswith("EVALSHA")]
    assert any(s.name == "EVALSHA create" and s.parent_id == session.span_id for s in redis)
    for s in steps:
        assert any(r.name == "EVALSHA append" and r.parent_id == s.span_id for r in redis)
    for r in redis:  # commands only: keys and values (step text, token ids) sanitized away
        statement = r.attributes["db.statement"].split()
        assert statement[0] == "EVALSHA" and set(statement[1:]) == {"?"}

    # Every span that names the session is in this one trace.
    assert {s.trace_id for s in receiver.spans() if s.attributes.get("glimprouter.session.id") == resp.session_id} == {trace_id}


def test_no_health_checks_and_no_content_in_spans_by_default(traced, receiver):
    resp = stub(traced.router).Reason(pb.ReasonRequest(prompt=PROMPT), timeout=60)
    _, mine = wait_for_run(receiver, resp.session_id, len(resp.steps), answer=resp.stats.answer_tokens > 0)
    time.sleep(1.5)  # several health-check rounds (0.5 s) of the router against the workers
    spans = receiver.spans()
    assert not [s.name for s in spans if "grpc.health" in s.name or s.name.endswith("/Check") or s.name.endswith("/Watch")]
    assert not [s.name for s in spans if s.name in ("PING", "EVALSHA renew")]  # background loops are untraced
    texts = all_text(spans)
    assert not [t for t in texts if MARKER in t]
    step_texts = [s.text.strip() for s in resp.steps if len(s.text.strip()) > 8]
    assert step_texts and not [t for t in texts if any(st in t for st in step_texts)]
    assert not any(k.endswith(".text") or k == "gen_ai.input.messages" for s in mine for k in s.attributes)


def test_content_in_spans_when_the_operator_turns_it_on(traced, receiver):
    resp = stub(traced.content_router).Reason(pb.ReasonRequest(prompt=PROMPT), timeout=60)
    session, mine = wait_for_run(receiver, resp.session_id, len(resp.steps), answer=resp.stats.answer_tokens > 0)
    messages = json.loads(session.attributes["gen_ai.input.messages"])
    assert messages == [{"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]
    steps = sorted((s for s in mine if s.name.startswith("step ")), key=lambda s: s.attributes["glimprouter.step.index"])
    assert [s.attributes["glimprouter.step.text"] for s in steps] == [e.text for e in resp.steps]
    if resp.answer:
        assert resp.answer in session.attributes["glimprouter.answer.text"]


def test_an_incoming_traceparent_at_the_gateway_is_the_trace_of_the_router_and_workers(traced, receiver):
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    gw = f"http://{traced.gateway.address}"
    before = httpx.get(gw + "/metrics").text
    r = httpx.post(gw + "/v1/chat/completions", timeout=60,
                   headers={"traceparent": f"00-{trace_id}-{parent}-01"},
                   json={"model": "glimprouter", "messages": [{"role": "user", "content": PROMPT}]})
    assert r.status_code == 200, r.text
    sid = r.headers["x-glimprouter-session"]
    assert r.headers["traceresponse"].startswith(f"00-{trace_id}-")
    n_steps = len(r.json()["glimprouter"]["step_log"])
    session, mine = wait_for_run(receiver, sid, n_steps, answer=False, services=("glimprouter-gateway",),
                                 names=("POST /v1/chat/completions",))
    assert session.trace_id == trace_id
    by_id = {s.span_id: s for s in receiver.spans()}
    http = [s for s in mine if s.service == "glimprouter-gateway" and s.name == "POST /v1/chat/completions"]
    assert len(http) == 1 and http[0].parent_id == parent
    assert http[0].attributes["http.response.status_code"] == 200
    assert http[0].attributes["glimprouter.session.id"] == sid
    assert http[0] in ancestors(session, by_id)  # gateway -> its gRPC client span -> router server span -> session
    assert {s.service for s in mine} >= {"glimprouter-gateway", "glimprouter-router", "glimprouter-worker"}
    after = httpx.get(gw + "/metrics").text

    def value(text, name):
        return next((float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + " ")), 0.0)

    ok = 'glimprouter_gateway_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
    assert value(after, ok) - value(before, ok) == 1
    dur = 'glimprouter_gateway_request_duration_seconds_count{route="/v1/chat/completions"}'
    assert value(after, dur) - value(before, dur) == 1


# ---- metrics -------------------------------------------------------------------------------------------
def test_metrics_move_by_what_the_run_did(traced):
    router_port = int(traced.router.ready_fields["metrics_port"])
    worker_ports = {w.address: int(w.ready_fields["metrics_port"]) for w in (traced.small, traced.large)}
    models = {}
    for role, w in (("small", traced.small), ("large", traced.large)):
        models[role] = worker_pb2_grpc.ModelWorkerStub(grpc.insecure_channel(w.address)).GetModelInfo(
            wpb.GetModelInfoRequest()).model_id
    before, wbefore = scrape(router_port), {a: scrape(p) for a, p in worker_ports.items()}
    resp = stub(traced.router).Reason(pb.ReasonRequest(prompt=PROMPT), timeout=60)
    with pytest.raises(grpc.RpcError) as err:
        stub(traced.router).Reason(pb.ReasonRequest(prompt="x", routing=pb.RoutingOptions(policy="nope")), timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    after, wafter = scrape(router_port), {a: scrape(p) for a, p in worker_ports.items()}

    def d(name):
        return delta(before, after, name)

    by_decision = {"small": 0, "large": 0}
    for s in resp.steps:
        by_decision[DECISION[s.decision]] += 1
    for decision, n in by_decision.items():
        assert d(f'glimprouter_router_decisions_total{{decision="{decision}",policy="glimpse"}}') == n
    st = resp.stats
    for role, rs in (("small", st.small), ("large", st.large)):
        m = models[role]
        step = d(f'glimprouter_router_tokens_total{{model="{m}",phase="step"}}')
        answer = d(f'glimprouter_router_tokens_total{{model="{m}",phase="answer"}}')
        assert step + answer == rs.generated_tokens
        assert d(f'glimprouter_router_step_duration_seconds_count{{model="{m}",role="{role}"}}') == rs.steps
    assert d(f'glimprouter_router_tokens_total{{model="{models["small"]}",phase="glimpse"}}') == st.small.glimpses
    assert d('glimprouter_router_glimpse_entropy_nats_count{method="top_k",policy="glimpse"}') == st.steps
    assert d('glimprouter_router_requests_total{code="OK",method="Reason"}') == 1
    assert d('glimprouter_router_requests_total{code="INVALID_ARGUMENT",method="Reason"}') == 1
    assert d('glimprouter_router_session_duration_seconds_count{code="OK",policy="glimpse"}') == 1
    assert d(f'glimprouter_router_time_to_first_answer_token_seconds_count{{model="{models["large"]}"}}') == (
        1 if st.answer_tokens else 0)
    assert after["glimprouter_router_active_sessions"] == 0
    # Prompt tokens per worker: what the router counted for each endpoint is what that worker counted.
    for addr, role in ((traced.small.address, "small"), (traced.large.address, "large")):
        for kind in ("prefilled", "cached"):
            mine = d(f'glimprouter_router_worker_prompt_tokens_total{{endpoint="{addr}",kind="{kind}",role="{role}"}}')
            theirs = delta(wbefore[addr], wafter[addr], f'glimprouter_worker_prompt_tokens_total{{kind="{kind}",model="{models[role]}"}}')
            assert mine == theirs
        assert d(f'glimprouter_router_worker_prompt_tokens_total{{endpoint="{addr}",kind="prefilled",role="{role}"}}') > 0
    assert d(f'glimprouter_router_worker_calls_total{{code="OK",endpoint="{traced.small.address}",method="StepStream",role="small"}}') == st.steps
    # Time to first token and inter-token latency, from the events the call streamed.
    assert d('glimprouter_router_time_to_first_token_seconds_count{policy="glimpse"}') == 1
    assert d('glimprouter_router_inter_token_latency_seconds_count{policy="glimpse"}') > 0
    assert not any(k.startswith("glimprouter_router_worker_retries_total") and d(k) for k in after)


# ---- glimprouter session show ----------------------------------------------------------------------
def test_session_show_prints_the_steps_and_the_trace_ids(traced, receiver, capsys):
    client = stub(traced.router)
    first = client.Reason(pb.ReasonRequest(prompt=PROMPT), timeout=60)
    second = client.Reason(pb.ReasonRequest(session_id=first.session_id, prompt="And 4 more?"), timeout=60)
    sid = first.session_id
    traces = []
    for resp in (first, second):
        def check(spans, resp=resp):
            found = [s for s in spans if s.name == "session" and s.attributes.get("glimprouter.session.id") == sid
                     and s.attributes.get("glimprouter.session.turn") == resp.turn]
            return found[0] if found else None
        traces.append(receiver.wait_for(check).trace_id)
    assert traces[0] != traces[1]
    assert list(client.GetSession(pb.GetSessionRequest(session_id=sid)).trace_ids) == traces

    assert cli_main(["session", "show", sid, "--router", traced.router.address, "--color", "never"]) == 0
    out = capsys.readouterr().out
    header = next(ln for ln in out.splitlines() if ln.lstrip().startswith("#"))
    assert header.split()[:8] == ["#", "turn", "model", "entropy", "tau", "decision", "tokens", "latency"]
    rows = [ln.split() for ln in out.splitlines() if ln[:4].strip().isdigit()]
    steps = list(first.steps) + list(second.steps)
    assert [int(r[0]) for r in rows] == [s.index for s in steps]
    for r, s in zip(rows, steps):
        assert r[2] == DECISION[s.role] and r[5] == DECISION[s.decision] and int(r[6]) == s.tokens
        assert math.isclose(float(r[3]), s.entropy, abs_tol=1e-3)
    assert f"trace {traces[1]}  (latest request; earlier: {traces[0]})" in out

    assert cli_main(["session", "show", sid, "--router", traced.router.address, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["trace_ids"] == traces


# ---- nothing configured: nothing exported --------------------------------------------------------
def test_without_an_otlp_endpoint_nothing_is_exported_and_everything_works(spawn, private_redis, monkeypatch):
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "GLIMPROUTER_TRACE_CONTENT"):
        monkeypatch.delenv(var, raising=False)
    # Listen where an SDK with no endpoint would send by default (localhost:4317),
    # when that port is free, so a wrong default would be seen here.
    receiver = spawn.receiver()
    try:
        receiver.start(4317)
    except (OSError, RuntimeError):
        receiver.start(0)
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    started = []
    try:
        small = spawn.sim("sim-small", env)
        started.append(small)
        large = spawn.sim("sim-large", env)
        started.append(large)
        router = spawn.router([small], large, private_redis.url, "obs-off:", env)
        started.append(router)
        resp = stub(router).Reason(pb.ReasonRequest(prompt=PROMPT), timeout=60)
        assert resp.steps and resp.session_id
        assert not stub(router).GetSession(pb.GetSessionRequest(session_id=resp.session_id)).trace_ids
        metrics = scrape(int(router.ready_fields["metrics_port"]))
        assert metrics['glimprouter_router_requests_total{code="OK",method="Reason"}'] == 1
        time.sleep(0.5)
    finally:
        codes = [svc.stop() for svc in reversed(started)]  # a graceful stop flushes spans, if there were any
        receiver.stop()
    assert codes == [0, 0, 0]
    assert receiver.requests == []
    assert not any("Exception while exporting" in ln or "Failed to export" in ln for svc in started for ln in svc.log_tail)


# ---- retries -------------------------------------------------------------------------------------------
def test_a_retried_worker_call_is_counted_and_shown_in_the_step(traced, receiver, spawn, private_redis, faults):
    """Two small replicas; one is draining (SIGTERM while a call is in flight on it: it
    keeps its connections and refuses new calls with UNAVAILABLE). The first call sent to
    it fails UNAVAILABLE and is retried on the other: one retry in the metrics and in that
    step's span, where the failed call is a child span with its status.

    (A replica that dies outright is no such case: its channel loses its connection, the
    router's reconnect fails, and the replica is marked down before a call is sent to it.)"""
    doomed = spawn.sim("sim-small", spawn.env(receiver), "--sim-token-latency-s", "0.05", "--sim-steps", "100")
    router = None
    busy = grpc.insecure_channel(doomed.address)
    try:
        # A slow health loop: the draining replica is found by a call, not by a health check.
        router = spawn.router([traced.small, doomed], traced.large, private_redis.url, "obs-retry:", spawn.env(receiver),
                              health_interval_s=60)
        # Up to 20 s of decoding (400 tokens x 0.05 s) keeps the draining worker up for the test.
        long_call = worker_pb2_grpc.ModelWorkerStub(busy).GenerateStream(wpb.GenerateRequest(
            prompt=wpb.Prompt(token_ids=wpb.TokenIds(ids=[1, 300, 301])), sampling=wpb.Sampling(max_tokens=400),
            stop=wpb.StopCondition(step_boundary="")), timeout=60)
        next(long_call)  # its first tokens: the call is in flight, so SIGTERM drains the worker
        doomed.proc.send_signal(signal.SIGTERM)
        faults.wait_for(lambda: faults.health(doomed.address) == "NOT_SERVING", 10, "the replica to drain")
        port = int(router.ready_fields["metrics_port"])
        name = 'glimprouter_router_worker_retries_total{method="StepStream",role="small"}'
        sids = []
        for _ in range(12):  # each new session goes to the draining replica with probability 1/2
            sids.append(stub(router).Reason(pb.ReasonRequest(prompt=PROMPT), timeout=60).session_id)
            if scrape(port).get(name, 0) > 0:
                break
        metrics = scrape(port)
        assert metrics[name] == 1
        assert metrics[f'glimprouter_router_worker_calls_total{{code="UNAVAILABLE",endpoint="{doomed.address}",method="StepStream",role="small"}}'] == 1
        long_call.cancel()
    finally:
        if router is not None:
            router.stop()
        busy.close()
        doomed.kill()

    def retried(spans):
        steps = [s for s in spans if s.name.startswith("step ") and s.attributes.get("glimprouter.session.id") == sids[-1]
                 and s.attributes.get("glimprouter.step.retries") == 1]
        return steps[0] if steps else None

    step = receiver.wait_for(retried)
    if step.attributes["glimprouter.step.writer"] == "small":
        assert step.attributes["glimprouter.worker.endpoint"] == traced.small.address
    calls = [s for s in receiver.spans() if s.parent_id == step.span_id and s.name.endswith("/StepStream")]
    assert sorted(s.status_code for s in calls) == [0, 2]  # one unset (OK), one ERROR (UNAVAILABLE)
