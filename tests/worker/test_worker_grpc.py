"""The ModelWorker contract over real gRPC with a real model (SmolLM2 through llama.cpp)."""
from __future__ import annotations

import math
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from glimprouter.v1 import worker_pb2 as pb

CHAT = [pb.ChatMessage(role="user", content="Write two short paragraphs about why the sky is blue.")]


def render(stub, messages=CHAT) -> list[int]:
    return list(stub.RenderPrompt(pb.RenderPromptRequest(messages=messages, add_generation_prompt=True)).token_ids)


def ids(tokens) -> pb.Prompt:
    return pb.Prompt(token_ids=pb.TokenIds(ids=tokens))


def reference_logits(model_path, tokens) -> np.ndarray:
    """Logits from a separate llama.cpp instance evaluating the whole prompt from scratch."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=2048, n_threads=2, logits_all=True, verbose=False)
    llm.eval(tokens)
    out = np.array(llm.scores[len(tokens) - 1], dtype=np.float64)
    llm.close()
    return out


def test_model_info_and_health(smol_worker, worker_stub):
    info = worker_stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.backend == "llamacpp" and info.vocab_size == 49152
    assert info.context_length == 2048 and info.has_chat_template
    assert len(info.tokenizer_fingerprint) == 64 and info.eos_token_ids
    with grpc.insecure_channel(smol_worker.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", "glimprouter.v1.ModelWorker", "liveness"):
            assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert "glimprouter.v1.ModelWorker" in names and "grpc.health.v1.Health" in names


def test_glimpse_entropy_matches_independent_computation(worker_stub, smollm2_path):
    prompt = render(worker_stub)
    g = worker_stub.Glimpse(pb.GlimpseRequest(prompt=ids(prompt), top_k=20, session_id="entropy"))
    logits = reference_logits(smollm2_path, prompt)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    h_full = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    top = np.sort(p)[::-1][:20]
    q = top / top.sum()
    h_top = float(-(q * np.log(q)).sum())
    assert g.token_id == int(np.argmax(logits))
    assert math.isclose(g.entropy_full, h_full, abs_tol=2e-3)
    assert math.isclose(g.entropy_top_k, h_top, abs_tol=2e-3)
    assert len(g.top) == 20 and g.top[0].token_id == g.token_id
    assert [t.logprob for t in g.top] == sorted((t.logprob for t in g.top), reverse=True)
    assert math.isclose(g.top[0].logprob, math.log(p.max()), abs_tol=2e-3)
    assert g.usage.prompt_tokens == len(prompt) and g.usage.generated_tokens == 0


def test_step_keeps_and_writes_to_boundary_or_escalates(worker_stub):
    prompt = render(worker_stub)
    keep = worker_stub.Step(
        pb.StepRequest(prompt=ids(prompt), threshold=1e9, sampling=pb.Sampling(max_tokens=300), session_id="step")
    )
    assert keep.decision == pb.STEP_DECISION_KEEP
    gen = keep.generation
    assert gen.finish_reason == pb.FINISH_REASON_STEP_END, gen.text
    assert "\n\n" in gen.text and gen.text.strip()
    assert gen.text.rstrip("\n").count("\n\n") == 0  # cut at the first boundary
    assert gen.token_ids[0] == keep.glimpse.token_id  # greedy: first token is the glimpsed argmax
    assert gen.usage.generated_tokens == len(gen.token_ids)

    esc = worker_stub.Step(pb.StepRequest(prompt=ids(prompt), threshold=-1.0, session_id="step"))
    assert esc.decision == pb.STEP_DECISION_ESCALATE
    assert not esc.HasField("generation")
    assert esc.entropy == pytest.approx(esc.glimpse.entropy_top_k)

    full = worker_stub.Step(
        pb.StepRequest(prompt=ids(prompt), threshold=-1.0, entropy_method=pb.ENTROPY_METHOD_FULL, session_id="step")
    )
    assert full.entropy == pytest.approx(full.glimpse.entropy_full)


def test_fused_step_samples_like_generate_with_the_same_seed(worker_stub):
    prompt = render(worker_stub)
    sampling = pb.Sampling(temperature=0.6, top_p=0.95, seed=1234, max_tokens=40)
    step = worker_stub.Step(pb.StepRequest(prompt=ids(prompt), threshold=1e9, sampling=sampling))
    gen = worker_stub.Generate(pb.GenerateRequest(prompt=ids(prompt), sampling=sampling))
    assert list(step.generation.token_ids) == list(gen.token_ids)
    assert step.generation.text == gen.text


def test_kv_reuse_extending_prompt_and_interleaved_sessions(worker_stub):
    a = render(worker_stub, [pb.ChatMessage(role="user", content="Count from one to five.")])
    b = render(worker_stub, [pb.ChatMessage(role="user", content="Name three colours of the rainbow, please.")])
    sampling = pb.Sampling(max_tokens=12)
    stop = pb.StopCondition(step_boundary="")
    ga = worker_stub.Generate(pb.GenerateRequest(prompt=ids(a), sampling=sampling, stop=stop, session_id="A"))
    gb = worker_stub.Generate(pb.GenerateRequest(prompt=ids(b), sampling=sampling, stop=stop, session_id="B"))
    a2 = a + list(ga.token_ids)
    b2 = b + list(gb.token_ids)
    ra = worker_stub.Glimpse(pb.GlimpseRequest(prompt=ids(a2), session_id="A"))
    rb = worker_stub.Glimpse(pb.GlimpseRequest(prompt=ids(b2), session_id="B"))
    # Everything but the last generated token was evaluated by the previous call.
    assert ra.usage.cached_tokens == len(a2) - 1, (ra.usage, len(a2))
    assert rb.usage.cached_tokens == len(b2) - 1, (rb.usage, len(b2))
    assert ra.usage.prefilled_tokens == 1 and rb.usage.prefilled_tokens == 1


def test_streaming_concatenates_to_unary(worker_stub):
    prompt = render(worker_stub)
    req = pb.GenerateRequest(prompt=ids(prompt), sampling=pb.Sampling(max_tokens=48), stop=pb.StopCondition(step_boundary=""))
    worker_stub.Generate(req)
    # Both calls below find the prompt cached up to its last token and evaluate that
    # token alone: the same pieces, so the same greedy tokens (llama.cpp rounds a
    # prompt evaluated whole and one evaluated in pieces differently).
    unary = worker_stub.Generate(req)
    chunks = list(worker_stub.GenerateStream(req))
    assert unary.usage.cached_tokens == len(prompt) - 1
    assert sum((list(c.token_ids) for c in chunks), []) == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == unary.finish_reason == pb.FINISH_REASON_LENGTH
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_text_prompt_equals_token_prompt(worker_stub):
    r = worker_stub.RenderPrompt(pb.RenderPromptRequest(messages=CHAT, add_generation_prompt=True))
    by_text = worker_stub.Glimpse(pb.GlimpseRequest(prompt=pb.Prompt(text=r.text)))
    by_ids = worker_stub.Glimpse(pb.GlimpseRequest(prompt=ids(list(r.token_ids))))
    assert by_text.token_id == by_ids.token_id
    assert by_text.usage.prompt_tokens == len(r.token_ids)


BAD = [
    ("empty prompt", pb.GlimpseRequest(prompt=pb.Prompt(token_ids=pb.TokenIds())), "prompt.token_ids"),
    ("no prompt", pb.GlimpseRequest(), "prompt"),
    ("prompt over the context", pb.GlimpseRequest(prompt=ids([1] * 2048)), "context"),
    ("token id out of range", pb.GlimpseRequest(prompt=ids([1, 2, 49152])), "prompt.token_ids[2]"),
    ("negative token id", pb.GlimpseRequest(prompt=ids([-5])), "prompt.token_ids[0]"),
    ("top_k too large", pb.GlimpseRequest(prompt=ids([1]), top_k=5000), "top_k"),
]
BAD_GENERATE = [
    ("negative max_tokens", pb.Sampling(max_tokens=-1), "sampling.max_tokens"),
    ("negative temperature", pb.Sampling(temperature=-0.5), "sampling.temperature"),
    ("top_p zero", pb.Sampling(top_p=0.0), "sampling.top_p"),
    ("top_p above one", pb.Sampling(top_p=1.5), "sampling.top_p"),
    ("nan temperature", pb.Sampling(temperature=float("nan")), "sampling.temperature"),
]


@pytest.mark.parametrize("name,request_,field", BAD, ids=[b[0] for b in BAD])
def test_bad_glimpse_is_invalid_argument(worker_stub, name, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        worker_stub.Glimpse(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert worker_stub.GetModelInfo(pb.GetModelInfoRequest()).vocab_size == 49152  # still serving


@pytest.mark.parametrize("name,sampling,field", BAD_GENERATE, ids=[b[0] for b in BAD_GENERATE])
def test_bad_sampling_is_invalid_argument(worker_stub, name, sampling, field):
    for call in (worker_stub.Generate, lambda r: list(worker_stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.GenerateRequest(prompt=ids([1, 2, 3]), sampling=sampling))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()


def test_bad_step_fields(worker_stub):
    cases = [
        (pb.StepRequest(prompt=ids([1, 2]), entropy_method=7), "entropy_method"),
        (pb.StepRequest(prompt=ids([1, 2]), threshold=float("nan")), "threshold"),
        (pb.StepRequest(prompt=ids([1, 2]), stop=pb.StopCondition(stop=[""])), "stop.stop[0]"),
    ]
    for req, field in cases:
        with pytest.raises(grpc.RpcError) as err:
            worker_stub.Step(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        worker_stub.RenderPrompt(pb.RenderPromptRequest(messages=[pb.ChatMessage(role="wizard", content="x")]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        worker_stub.RenderPrompt(pb.RenderPromptRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages" in err.value.details()


def test_an_overflowing_prompt_is_refused_while_other_requests_go_on(worker_stub):
    prompt = render(worker_stub)
    req = pb.GenerateRequest(prompt=ids(prompt), sampling=pb.Sampling(max_tokens=40), stop=pb.StopCondition(step_boundary=""),
                             session_id="goes-on")
    stream = worker_stub.GenerateStream(req)
    first = next(stream)  # decoding, in a sequence of the batch
    with pytest.raises(grpc.RpcError) as err:
        worker_stub.Step(pb.StepRequest(prompt=ids([1] * 3000), threshold=float("inf"), session_id="too-long"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()
    rest = list(stream)
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 40
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_extend_catches_a_session_up_and_needs_its_id(worker_stub):
    prompt = render(worker_stub)
    worker_stub.Glimpse(pb.GlimpseRequest(prompt=ids(prompt), session_id="catch-up"))
    more = list(worker_stub.Tokenize(pb.TokenizeRequest(text=" The sky scatters blue light.\n\n")).token_ids)
    r = worker_stub.Extend(pb.ExtendRequest(prompt=ids(prompt + more), session_id="catch-up"))
    assert (r.usage.cached_tokens, r.usage.prefilled_tokens) == (len(prompt), len(more))
    g = worker_stub.Glimpse(pb.GlimpseRequest(prompt=ids(prompt + more + more[:1]), session_id="catch-up"))
    assert g.usage.cached_tokens == len(prompt + more)
    with pytest.raises(grpc.RpcError) as err:
        worker_stub.Extend(pb.ExtendRequest(prompt=ids(prompt)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in err.value.details()


def test_step_stream_sends_the_decision_then_the_step(worker_stub):
    prompt = render(worker_stub)
    sampling = pb.Sampling(temperature=0.7, seed=5, max_tokens=24)
    req = pb.StepRequest(prompt=ids(prompt), threshold=float("inf"), sampling=sampling, session_id="stream-a")
    msgs = list(worker_stub.StepStream(req))
    head, chunks = msgs[0], [m.chunk for m in msgs[1:]]
    assert head.decision == pb.STEP_DECISION_KEEP and head.glimpse.usage.prompt_tokens == len(prompt)
    assert not head.HasField("chunk") and all(not m.HasField("glimpse") for m in msgs[1:])
    unary = worker_stub.Step(pb.StepRequest(prompt=ids(prompt), threshold=float("inf"), sampling=sampling,
                                            session_id="stream-b"))
    assert sum((list(c.token_ids) for c in chunks), []) == list(unary.generation.token_ids)
    assert chunks[-1].finish_reason == unary.generation.finish_reason
    escalated = list(worker_stub.StepStream(pb.StepRequest(prompt=ids(prompt), threshold=0.0, session_id="stream-a")))
    assert len(escalated) == 1 and escalated[0].decision == pb.STEP_DECISION_ESCALATE


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_move_by_what_the_calls_did(smol_worker, worker_stub):
    port = int(smol_worker.ready_fields["metrics_port"])
    model = worker_stub.GetModelInfo(pb.GetModelInfoRequest()).model_id
    lab = f'model="{model}"'
    before = _scrape(port)
    prompt = render(worker_stub)
    g = worker_stub.Glimpse(pb.GlimpseRequest(prompt=ids(prompt), session_id="metrics"))
    gen = worker_stub.Generate(pb.GenerateRequest(prompt=ids(prompt), sampling=pb.Sampling(max_tokens=5),
                                                  stop=pb.StopCondition(step_boundary=""), session_id="metrics"))
    with pytest.raises(grpc.RpcError):
        worker_stub.Glimpse(pb.GlimpseRequest())
    # The server records a call after its status has gone out, so give it a moment.
    err_key = f'glimprouter_worker_requests_total{{code="INVALID_ARGUMENT",method="Glimpse",{lab}}}'
    deadline = time.monotonic() + 5
    while True:
        after = _scrape(port)
        if after.get(err_key, 0.0) > before.get(err_key, 0.0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta(f'glimprouter_worker_requests_total{{code="OK",method="Glimpse",{lab}}}') == 1
    assert delta(f'glimprouter_worker_requests_total{{code="INVALID_ARGUMENT",method="Glimpse",{lab}}}') == 1
    assert delta(f'glimprouter_worker_generated_tokens_total{{method="Generate",{lab}}}') == len(gen.token_ids) == 5
    prefilled = g.usage.prefilled_tokens + gen.usage.prefilled_tokens
    cached = g.usage.cached_tokens + gen.usage.cached_tokens
    assert delta(f'glimprouter_worker_prompt_tokens_total{{kind="prefilled",{lab}}}') == prefilled
    assert delta(f'glimprouter_worker_prompt_tokens_total{{kind="cached",{lab}}}') == cached
    assert after[f"glimprouter_worker_ready{{{lab}}}"] == 1


def test_render_continues_a_final_assistant_message(worker_stub):
    msgs = [pb.ChatMessage(role="user", content="Add 2 and 3."), pb.ChatMessage(role="assistant", content="First, 2 + 3")]
    cont = worker_stub.RenderPrompt(pb.RenderPromptRequest(messages=msgs, continue_final_message=True))
    closed = worker_stub.RenderPrompt(pb.RenderPromptRequest(messages=msgs))
    assert cont.text.endswith("First, 2 + 3")
    assert closed.text.startswith(cont.text) and len(closed.text) > len(cont.text)  # the end-of-turn tokens follow


def test_sigterm_drains_and_exits_zero(worker_factory):
    import signal

    svc = worker_factory()
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(30) == 0
