"""The gateway's translation code without any server: request parsing, the proto it
builds, the completion/chunk shapes, error mapping and API keys."""
from __future__ import annotations

import json
import math
import os
import re

import grpc
import pytest

from gateway.auth import KeyStore, bearer_token, parse_keys
from gateway.chat import parse_chat_request
from gateway.completions import CompletionBuilder, _TagFilter, _Trim, finish_reason
from gateway.errors import APIError, from_grpc
from glimprouter.v1 import router_pb2 as pb
from services.router.api import (
    AnswerBy, AnswerDelta, Budgets, CatchUp, Decision, Done, Entropy, GlimpseMode, Message, ReasonRequest, Role, RoleStats,
    RoutingOptions, SamplingOptions, Started, Stats, Step, StepDelta, StepStart,
)
from services.router.api import protomap

MSG = [{"role": "user", "content": "hi"}]


def parse(body, session_id=""):
    return parse_chat_request(body, model_name="glimprouter", session_id=session_id)


# ---- request parsing ---------------------------------------------------------------------
def test_minimal_request_uses_router_defaults():
    r = parse({"model": "glimprouter", "messages": MSG})
    assert r.reason == ReasonRequest(messages=[Message("user", "hi")]) and not r.stream


def test_all_extra_fields():
    r = parse({
        "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "policy": "random", "threshold": 1.2, "params": {"p": 0.3}, "glimpse_mode": "separate", "entropy": "full",
        "entropy_top_k": 10, "catch_up": "lazy", "budgets": {"max_steps": 4, "step_tokens": 64}, "max_tokens": 100, "temperature": 0,
        "top_p": 0.9, "seed": 7, "answer_by": "large", "think": True, "stream": True, "stream_options": {"include_usage": True},
    })
    q = r.reason
    assert q.messages == [Message("system", "be brief"), Message("user", "ab")]
    assert q.routing == RoutingOptions("random", 1.2, {"p": 0.3}, GlimpseMode.SEPARATE, Entropy.FULL, 10, CatchUp.LAZY)
    assert q.budgets == Budgets(step_tokens=64, answer_tokens=100, max_steps=4)
    assert q.sampling == SamplingOptions(0.0, 0.9, 7)
    assert (q.answer_by, q.think, r.stream, r.include_usage) == (AnswerBy.LARGE, True, True, True)


def test_budget_answer_tokens_wins_over_max_tokens():
    assert parse({"messages": MSG, "max_tokens": 5, "budgets": {"answer_tokens": 9}}).reason.budgets == Budgets(answer_tokens=9)


BAD = [
    ([1, 2], None, "invalid_type"),
    ({}, "messages", "missing_required_parameter"),
    ({"messages": None}, "messages", "missing_required_parameter"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "invalid_type"),
    ({"messages": MSG, "temperature": "hot"}, "temperature", "invalid_type"),
    ({"messages": MSG, "temperature": True}, "temperature", "invalid_type"),
    ({"messages": MSG, "temperature": 5}, "temperature", "invalid_value"),
    ({"messages": MSG, "threshold": "x"}, "threshold", "invalid_type"),
    ({"messages": MSG, "policy": 3}, "policy", "invalid_type"),
    ({"messages": MSG, "params": {"p": "x"}}, "params", "invalid_type"),
    ({"messages": MSG, "params": [1]}, "params", "invalid_type"),
    ({"messages": MSG, "glimpse_mode": "both"}, "glimpse_mode", "invalid_value"),
    ({"messages": MSG, "catch_up": "sometimes"}, "catch_up", "invalid_value"),
    ({"messages": MSG, "budgets": {"max_steps": 0}}, "budgets.max_steps", "invalid_value"),
    ({"messages": MSG, "budgets": {"max_steps": 1.5}}, "budgets.max_steps", "invalid_type"),
    ({"messages": MSG, "budgets": {"steps": 3}}, "budgets.steps", "invalid_value"),
    ({"messages": MSG, "budgets": 3}, "budgets", "invalid_type"),
    ({"messages": MSG, "max_tokens": -1}, "max_tokens", "invalid_value"),
    ({"messages": MSG, "seed": -1}, "seed", "invalid_value"),
    ({"messages": MSG, "seed": 2**64}, "seed", "invalid_value"),
    ({"messages": MSG, "stream": "yes"}, "stream", "invalid_type"),
    ({"messages": MSG, "stream_options": []}, "stream_options", "invalid_type"),
    ({"messages": MSG, "n": 2}, "n", "invalid_value"),
    ({"messages": MSG, "tools": [{"type": "function"}]}, "tools", "invalid_value"),
    ({"messages": MSG, "stop": ["\n"]}, "stop", "invalid_value"),
    ({"messages": MSG, "answer_by": "nobody"}, "answer_by", "invalid_value"),
]


@pytest.mark.parametrize("body,param,code", BAD)
def test_bad_requests_are_400_naming_the_param(body, param, code):
    with pytest.raises(APIError) as e:
        parse(body)
    assert e.value.status == 400 and e.value.param == param and e.value.code == code
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    assert e.value.body()["error"]["type"] == "invalid_request_error"


def test_other_model_is_404():
    with pytest.raises(APIError) as e:
        parse({"model": "gpt-4o", "messages": MSG})
    assert e.value.status == 404 and e.value.code == "model_not_found"


def test_continued_session_sends_only_the_new_turn():
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert parse({"messages": conv}, session_id="abc").reason.messages == [Message("user", "q2")]
    # Nothing after the last answer (or nothing at all): resume the interrupted turn.
    assert parse({"messages": conv[:3]}, session_id="abc").reason.messages == []
    assert parse({"messages": []}, session_id="abc").reason.messages == []


# ---- the proto sent to the router ----------------------------------------------------------
def test_reason_request_leaves_unset_groups_absent():
    out = protomap.request_to_pb(ReasonRequest(messages=[Message("user", "x")], session_id="s"))
    assert out.session_id == "s" and [(m.role, m.content) for m in out.messages] == [("user", "x")]
    assert not out.HasField("routing") and not out.HasField("budgets") and not out.HasField("sampling")
    assert not out.HasField("think") and out.answer_by == pb.ANSWER_BY_UNSPECIFIED


def test_reason_request_carries_every_option():
    req = parse({"messages": MSG, "policy": "random", "threshold": 0.5, "params": {"p": 0.3}, "glimpse_mode": "separate",
                 "entropy": "full", "entropy_top_k": 5, "budgets": {"max_steps": 2}, "temperature": 0, "seed": 3,
                 "answer_by": "none", "think": False})
    out = protomap.request_to_pb(req.reason)
    assert protomap.request_from_pb(out) == req.reason  # and back, as the router reads it
    r = out.routing
    assert (r.policy, r.threshold, dict(r.params), r.glimpse_mode, r.entropy, r.top_k) == (
        "random", 0.5, {"p": pytest.approx(0.3)}, pb.GLIMPSE_MODE_SEPARATE, pb.ENTROPY_FULL, 5)
    assert out.budgets.HasField("max_steps") and not out.budgets.HasField("step_tokens")
    assert out.sampling.HasField("temperature") and out.sampling.temperature == 0 and out.sampling.seed == 3
    assert not out.sampling.HasField("top_p")
    assert out.answer_by == pb.ANSWER_BY_NONE and out.HasField("think") and out.think is False


def test_events_from_proto():
    ev = pb.ReasonEvent(step=pb.StepEvent(index=2, role=pb.ROLE_LARGE, decision=pb.DECISION_LARGE, entropy=float("nan"), text="t"))
    step = protomap.event_from_pb(ev)
    assert isinstance(step, Step) and step.role is Role.LARGE and math.isnan(step.entropy)
    assert step.routing()["entropy"] is None and "text" not in step.routing()
    done = protomap.event_from_pb(pb.ReasonEvent(done=pb.Done(session_id="s", answer="a", stats=pb.Stats(steps=3, small=pb.RoleStats(steps=2)))))
    assert done.stats.steps == 3 and done.stats.small.steps == 2
    assert protomap.event_from_pb(pb.ReasonEvent()) is None


@pytest.mark.parametrize("ev", [
    Started("s", 2, None, 1, "S", "L", True),
    StepStart(4, 1, Role.SMALL, "S", Decision.SMALL, 0.25, 0.9, attempt=2),
    StepDelta(4, "te", 2, [7, 8]),
    Step(4, 1, Role.LARGE, "L", Decision.LARGE, 1.5, 0.9, "text", 3, 1, 2, 5, 9.5, 8.0, "step_end", [1, 2, 3]),
    AnswerDelta("a", Role.LARGE, 1),
    Done("s", "ans", Stats(latency_ms=3.0, steps=2, small=RoleStats(steps=1, worker_ms=2.5), thinking_end="eos")),
])
def test_every_event_maps_to_proto_and_back(ev):
    assert protomap.event_from_pb(pb.ReasonEvent.FromString(protomap.event_to_pb(ev).SerializeToString())) == ev


# ---- completions and chunks ------------------------------------------------------------------
STEPS = [("small", 0.2, ["Fir", "st.\n\n"]), ("large", 1.7, ["Wait, ", "sec", "ond.\n\n"]), ("small", 0.1, ["Done</th", "ink>"])]


def _events(steps=STEPS, thinking=True):
    """The events of a turn: per step its start, its text in deltas, the finished step."""
    out = [Started("s1", 0, None, 0, "S", "L", thinking)]
    for i, (role, h, deltas) in enumerate(steps):
        out.append(StepStart(i, 0, Role(role), role.upper(), Decision(role), h, 0.9))
        out += [StepDelta(i, d, 1) for d in deltas]
        out.append(Step(i, 0, Role(role), role.upper(), Decision(role), h, 0.9, "".join(deltas), len(deltas)))
    return out


def _done(answer="The answer is 5.", answer_end="eos", thinking_end="think_end"):
    return Done("s1", answer, Stats(latency_ms=12.0, steps=3, intervention_rate=1 / 3, small=RoleStats(steps=2),
                                    large=RoleStats(steps=1), thinking_tokens=9, answer_tokens=5,
                                    thinking_end=thinking_end, answer_end=answer_end))


def assemble(chunks):
    """What a client gets by concatenating the deltas: the non-streaming shape."""
    content, reasoning, finish, usage, info, steps = None, None, None, None, None, []
    for c in chunks:
        if c.get("usage"):
            usage = c["usage"]
        g = c.get("glimprouter") or {}
        if "step" in g:
            steps.append(g["step"])
        if "step_done" in g:
            assert g["step_done"]["index"] == steps[-1]["index"]  # after the step's start
        for ch in c["choices"]:
            d = ch["delta"]
            if d.get("content") is not None:
                content = (content or "") + d["content"]
            if d.get("reasoning_content") is not None:
                reasoning = (reasoning or "") + d["reasoning_content"]
            if ch["finish_reason"]:
                finish, info = ch["finish_reason"], g
    return content, reasoning, finish, usage, info, steps


@pytest.mark.parametrize("deltas", [["\n\nThe answer", " is 5.", "\n"], ["", "  The", " answer is 5.  ", "\n\n"]])
def test_streamed_chunks_add_up_to_the_completion(deltas):
    b = CompletionBuilder("id1", "glimprouter", include_usage=True, created=1)
    events = [*_events(), *[AnswerDelta(d, Role.LARGE) for d in deltas], _done()]
    chunks = [c for ev in events for c in b.feed(ev)]
    json.dumps(chunks)  # all JSON-safe
    result = b.result()
    msg = result["choices"][0]["message"]
    content, reasoning, finish, usage, info, steps = assemble(chunks)
    assert msg["content"] == content == "The answer is 5."
    # One chunk per delta; the think tag split over two deltas is removed all the same.
    assert msg["reasoning_content"] == reasoning == "First.\n\nWait, second.\n\nDone"
    assert sum(1 for c in chunks for ch in c["choices"] if ch["delta"].get("reasoning_content")) == 6
    assert result["choices"][0]["finish_reason"] == finish == "stop"
    assert result["usage"] == usage == {"prompt_tokens": 0, "completion_tokens": 14, "total_tokens": 14,
                                        "completion_tokens_details": {"reasoning_tokens": 9}}
    assert result["glimprouter"] == info
    assert info["steps"] == {"total": 3, "small": 2, "large": 1} and info["session_id"] == "s1"
    # Each step's routing rides on its first chunk, before its text is written.
    assert [s["model"] for s in steps] == ["small", "large", "small"] and [s["entropy"] for s in steps] == [0.2, 1.7, 0.1]
    assert [s["model"] for s in info["step_log"]] == ["small", "large", "small"]
    assert [c["glimprouter"]["step_done"] for c in chunks if "step_done" in (c.get("glimprouter") or {})] == info["step_log"]
    assert chunks[-1]["choices"] == [] and all(c["object"] == "chat.completion.chunk" and c["id"] == "id1" for c in chunks)
    assert result["object"] == "chat.completion"


def test_plain_models_stream_their_steps_as_content_once():
    """No thinking tags: the steps are the reply. They stream as content, and nothing is
    sent twice (no reasoning_content copy, no whole-reply delta at the end)."""
    b = CompletionBuilder("id", "m")
    chunks = [c for ev in [*_events(STEPS[:2], thinking=False), _done("First.\n\nWait, second.", "none", "eos")]
              for c in b.feed(ev)]
    content, reasoning, finish, usage, info, _ = assemble(chunks)
    msg = b.result()["choices"][0]["message"]
    assert content == msg["content"] == "First.\n\nWait, second." and reasoning is None and msg["reasoning_content"] is None
    assert sum(1 for c in chunks for ch in c["choices"] if ch["delta"].get("content")) == 5  # one per delta
    assert usage is None  # only with stream_options.include_usage
    assert finish == "stop"


def _restart(new_deltas):
    b = CompletionBuilder("id", "m")
    events = [Started("s1", 0, None, 0, "S", "L", True), StepStart(0, 0, Role.LARGE, "L", Decision.LARGE, 1.0, 0.9),
              StepDelta(0, "Wait, se", 1),  # the worker dies here
              StepStart(0, 0, Role.LARGE, "L", Decision.LARGE, 1.0, 0.9, attempt=2),
              *[StepDelta(0, d, 1) for d in new_deltas],
              Step(0, 0, Role.LARGE, "L", Decision.LARGE, 1.0, 0.9, "".join(new_deltas), 3)]
    return [c for ev in events for c in b.feed(ev)]


def test_a_restarted_step_does_not_repeat_what_was_sent():
    chunks = _restart(["Wait, ", "second.", "\n\n"])  # the same text again: only the rest is sent
    _, reasoning, *_ = assemble(chunks)
    assert reasoning == "Wait, second.\n\n"
    assert not any("restart" in (c.get("glimprouter") or {}) for c in chunks)
    chunks = _restart(["Hmm, ", "third.\n\n"])  # a different text: what was sent stays, the rest is marked
    _, reasoning, *_ = assemble(chunks)
    assert reasoning == "Wait, se" + "Hmm, third.\n\n"
    marks = [c["glimprouter"]["restart"] for c in chunks if "restart" in (c.get("glimprouter") or {})]
    assert marks == [{"index": 0, "diverged_at": 0}]


def test_tag_filter_streams_like_the_regex():
    for parts in (["<thi", "nk>a</", "think>b"], ["a<", "b", "</think", ">"], ["<think><"], ["x</think>"]):
        f = _TagFilter()
        out = "".join(f.feed(p) for p in parts) + f.flush()
        assert out == re.sub(r"</?think>", "", "".join(parts))


def test_finish_reason_length_when_cut():
    assert finish_reason(_done(answer_end="length")) == "length"
    assert finish_reason(_done(answer_end="none", thinking_end="budget")) == "length"
    assert finish_reason(_done(answer_end="none", thinking_end="eos")) == "stop"


def test_no_steps_means_no_reasoning_content():
    b = CompletionBuilder("id", "m")
    for ev in (Started("s", thinking=True), AnswerDelta("hi"), _done("hi")):
        b.feed(ev)
    assert b.result()["choices"][0]["message"]["reasoning_content"] is None


def test_result_needs_done():
    with pytest.raises(RuntimeError):
        CompletionBuilder("id", "m").result()


def test_trim_streams_like_strip():
    for parts in (["  a", " b ", "", " c  ", " "], ["\n", "\n"], ["x"], ["a\n\n", "\n", "b"]):
        t = _Trim()
        assert "".join(t.feed(p) for p in parts) == "".join(parts).strip()


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("code,status", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.NOT_FOUND, 404), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.DEADLINE_EXCEEDED, 504), (grpc.StatusCode.ABORTED, 409),
    (grpc.StatusCode.UNAUTHENTICATED, 401), (grpc.StatusCode.INTERNAL, 500), (grpc.StatusCode.UNKNOWN, 500),
])
def test_grpc_codes_map_to_http(code, status):
    err = from_grpc(code, "why")
    assert err.status == status
    body = err.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["type"]


# ---- API keys ---------------------------------------------------------------------------------
def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token(None) is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None


def test_keystore_static_and_file(tmp_path):
    assert not KeyStore().enabled
    ks = KeyStore(("k1", "k2"))
    assert ks.enabled and ks.check("k2") and not ks.check("k3") and not ks.check("")
    f = tmp_path / "keys"
    f.write_text("# team a\nfile-key\n\n")
    ks = KeyStore((), str(f))
    assert ks.check("file-key") and not ks.check("# team a")
    f.write_text("rotated-key-longer\n")
    os.utime(f, ns=(1, 10**18))  # a rotation with a new mtime
    assert ks.check("rotated-key-longer") and not ks.check("file-key")
    f.unlink()  # a secret being swapped: the last keys stay
    assert ks.check("rotated-key-longer")
    assert parse_keys(" a \n#x\n b") == ["a", "b"]


def test_keystore_missing_file_fails_at_start(tmp_path):
    with pytest.raises(SystemExit):
        KeyStore((), str(tmp_path / "absent"))
