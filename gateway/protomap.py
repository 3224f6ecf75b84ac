"""Conversions between the router's protobuf messages and the gateway's dataclasses.

The only module of the gateway that touches protobuf objects besides the client."""
from __future__ import annotations

import dataclasses

from glimprouter.v1 import router_pb2 as pb

from gateway.chat import ChatRequest, Routing
from gateway.events import AnswerDelta, Done, Event, RoleStats, SessionInfo, Started, Stats, Step

_GLIMPSE = {"": pb.GLIMPSE_MODE_UNSPECIFIED, "fused": pb.GLIMPSE_MODE_FUSED, "separate": pb.GLIMPSE_MODE_SEPARATE}
_ENTROPY = {"": pb.ENTROPY_UNSPECIFIED, "top_k": pb.ENTROPY_TOP_K, "full": pb.ENTROPY_FULL}
_ANSWER_BY = {
    "auto": pb.ANSWER_BY_UNSPECIFIED,
    "large": pb.ANSWER_BY_LARGE,
    "small": pb.ANSWER_BY_SMALL,
    "none": pb.ANSWER_BY_NONE,
}
_ROLE = {pb.ROLE_SMALL: "small", pb.ROLE_LARGE: "large"}
_DECISION = {pb.DECISION_SMALL: "small", pb.DECISION_LARGE: "large"}
_PREFIX = {pb.PREFIX_MODE_TOKENS: "tokens", pb.PREFIX_MODE_TEXT: "text"}


def reason_request(req: ChatRequest) -> pb.ReasonRequest:
    out = pb.ReasonRequest(session_id=req.session_id, answer_by=_ANSWER_BY[req.answer_by])
    for role, content in req.messages:
        out.messages.add(role=role, content=content)
    r = req.routing
    # Only groups the caller set are sent: on a continued session the router keeps
    # the stored options of every group left out (it checks presence).
    if r != Routing():
        out.routing.policy = r.policy
        out.routing.glimpse_mode = _GLIMPSE[r.glimpse_mode]
        out.routing.entropy = _ENTROPY[r.entropy]
        if r.threshold is not None:
            out.routing.threshold = r.threshold
        if r.top_k is not None:
            out.routing.top_k = r.top_k
        out.routing.params.update(r.params)
    for key, value in req.budgets.items():
        setattr(out.budgets, key, value)
    if req.temperature is not None:
        out.sampling.temperature = req.temperature
    if req.top_p is not None:
        out.sampling.top_p = req.top_p
    if req.seed is not None:
        out.sampling.seed = req.seed
    if req.think is not None:
        out.think = req.think
    return out


def step(s: pb.StepEvent) -> Step:
    return Step(
        index=s.index,
        turn=s.turn,
        role=_ROLE.get(s.role, ""),
        model_id=s.model_id,
        decision=_DECISION.get(s.decision, ""),
        entropy=s.entropy,
        threshold=s.threshold,
        text=s.text,
        tokens=s.tokens,
        discarded_tokens=s.discarded_tokens,
        cached_tokens=s.cached_tokens,
        prefilled_tokens=s.prefilled_tokens,
        latency_ms=s.latency_ms,
        worker_ms=s.worker_ms,
        finish_reason=s.finish_reason,
    )


def _role_stats(r: pb.RoleStats) -> RoleStats:
    return RoleStats(**{f.name: getattr(r, f.name) for f in dataclasses.fields(RoleStats)})


def stats(s: pb.Stats) -> Stats:
    # The router's dataclasses mirror its messages field for field.
    scalars = {f.name: getattr(s, f.name) for f in dataclasses.fields(Stats) if f.name not in ("small", "large")}
    return Stats(small=_role_stats(s.small), large=_role_stats(s.large), **scalars)


def event(ev: pb.ReasonEvent) -> Event | None:
    kind = ev.WhichOneof("event")
    if kind == "started":
        s = ev.started
        return Started(s.session_id, s.turn, _PREFIX.get(s.prefix_mode, ""), s.resumed_steps, s.small_model, s.large_model)
    if kind == "step":
        return step(ev.step)
    if kind == "answer":
        return AnswerDelta(ev.answer.text, _ROLE.get(ev.answer.role, ""))
    if kind == "done":
        return Done(ev.done.session_id, ev.done.answer, stats(ev.done.stats))
    return None  # an event kind newer than this gateway: skipped


def session(s: pb.Session) -> SessionInfo:
    return SessionInfo(
        session_id=s.session_id,
        status=s.status,
        prefix_mode=_PREFIX.get(s.prefix_mode, ""),
        turn=s.turn,
        small_model=s.small_model,
        large_model=s.large_model,
        options_json=s.options_json,
        steps=[step(x) for x in s.steps],
        lease_holder=s.lease_holder,
        lease_ms_left=s.lease_ms_left,
        answer=s.answer,
        stats=stats(s.stats),
        affinity=dict(s.affinity),
        created_unix_ms=s.created_unix_ms,
        updated_unix_ms=s.updated_unix_ms,
        error=s.error,
        trace_ids=list(s.trace_ids),
    )
