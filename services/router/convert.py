"""Protobuf <-> router dataclasses, both directions (the servicer stays thin)."""
from __future__ import annotations

import dataclasses

import math

from glimprouter.v1 import router_pb2 as pb
from services.router.core import SessionView
from services.router.types import (
    AnswerBy,
    Budgets,
    ChatTurn,
    InvalidArgument,
    ReasonRequest,
    Record,
    RoleStats,
    RoutingOptions,
    SamplingOptions,
    SessionOptions,
    Stats,
)

_ANSWER_BY = {
    pb.ANSWER_BY_UNSPECIFIED: AnswerBy.AUTO,
    pb.ANSWER_BY_LARGE: AnswerBy.LARGE,
    pb.ANSWER_BY_SMALL: AnswerBy.SMALL,
    pb.ANSWER_BY_NONE: AnswerBy.NONE,
}
_MODE = {pb.GLIMPSE_MODE_UNSPECIFIED: "fused", pb.GLIMPSE_MODE_FUSED: "fused", pb.GLIMPSE_MODE_SEPARATE: "separate"}
_ENTROPY = {pb.ENTROPY_UNSPECIFIED: "top_k", pb.ENTROPY_TOP_K: "top_k", pb.ENTROPY_FULL: "full"}
ROLE = {"small": pb.ROLE_SMALL, "large": pb.ROLE_LARGE}
PREFIX_MODE = {"tokens": pb.PREFIX_MODE_TOKENS, "text": pb.PREFIX_MODE_TEXT}


def reason_request(r: pb.ReasonRequest) -> ReasonRequest:
    given: set[str] = set()
    routing = RoutingOptions()
    if r.HasField("routing"):
        given.add("routing")
        x = r.routing
        routing = RoutingOptions(
            policy=x.policy or routing.policy,
            threshold=x.threshold if x.HasField("threshold") else routing.threshold,
            params=dict(x.params),
            glimpse_mode=_MODE.get(x.glimpse_mode, f"<enum {x.glimpse_mode}>"),
            entropy=_ENTROPY.get(x.entropy, f"<enum {x.entropy}>"),
            top_k=x.top_k if x.HasField("top_k") else routing.top_k,
        )
    budgets = Budgets()
    if r.HasField("budgets"):
        given.add("budgets")
        for name in ("step_tokens", "thinking_tokens", "answer_tokens", "max_steps"):
            if r.budgets.HasField(name):
                setattr(budgets, name, getattr(r.budgets, name))
    sampling = SamplingOptions()
    if r.HasField("sampling"):
        given.add("sampling")
        s = r.sampling
        sampling = SamplingOptions(
            temperature=s.temperature if s.HasField("temperature") else sampling.temperature,
            top_p=s.top_p if s.HasField("top_p") else sampling.top_p,
            seed=s.seed if s.HasField("seed") else None,
        )
    if r.answer_by != pb.ANSWER_BY_UNSPECIFIED:
        given.add("answer_by")
    if r.HasField("think"):
        given.add("think")
    messages = [ChatTurn(m.role, m.content) for m in r.messages]
    if r.prompt:
        messages.append(ChatTurn("user", r.prompt))
    if r.answer_by not in _ANSWER_BY:
        # An enum value newer than this router (or garbage): refused, never read as "auto".
        raise InvalidArgument(f"answer_by: unknown value {r.answer_by} (use ANSWER_BY_LARGE, _SMALL or _NONE)")
    options = SessionOptions(
        routing=routing,
        budgets=budgets,
        sampling=sampling,
        answer_by=_ANSWER_BY[r.answer_by],
        think=r.think if r.HasField("think") else None,
    )
    return ReasonRequest(r.session_id, messages, options, frozenset(given), r.include_token_ids)


def step_event(rec: Record, token_ids: list[int] | None = None) -> pb.StepEvent:
    return pb.StepEvent(
        index=rec.index,
        turn=rec.turn,
        role=ROLE.get(rec.role, pb.ROLE_UNSPECIFIED),
        model_id=rec.model_id,
        decision=pb.DECISION_LARGE if rec.decision == "large" else pb.DECISION_SMALL,
        entropy=rec.entropy,
        threshold=rec.threshold,
        text=rec.text,
        tokens=rec.tokens,
        discarded_tokens=rec.discarded_tokens,
        cached_tokens=rec.cached_tokens,
        prefilled_tokens=rec.prefilled_tokens,
        latency_ms=rec.latency_ms,
        worker_ms=rec.worker_ms,
        finish_reason=rec.finish_reason,
        token_ids=token_ids or [],
    )


def stats(s: Stats) -> pb.Stats:
    # The dataclasses mirror the messages field for field (nested dicts fill sub-messages).
    return pb.Stats(**dataclasses.asdict(s))


def session(v: SessionView, include_prefix: bool) -> pb.Session:
    meta = v.stored.meta
    out = pb.Session(
        session_id=v.stored.session_id,
        status=meta.get("status", ""),
        prefix_mode=PREFIX_MODE.get(meta.get("mode", ""), pb.PREFIX_MODE_UNSPECIFIED),
        turn=int(meta.get("turn", "0")),
        small_model=meta.get("small_model", ""),
        large_model=meta.get("large_model", ""),
        options_json=meta.get("options", ""),
        steps=[step_event(r) for r in v.steps],
        lease_holder=v.stored.lease_holder,
        lease_ms_left=v.stored.lease_ms_left,
        answer=meta.get("answer", ""),
        stats=stats(v.stats),
        affinity={k[4:]: val for k, val in meta.items() if k.startswith("aff:")},
        created_unix_ms=int(meta.get("created_ms", "0")),
        updated_unix_ms=int(meta.get("updated_ms", "0")),
        error=meta.get("error", ""),
        trace_ids=meta.get("trace_ids", "").split(),
    )
    for name, ids in sorted(v.stored.prefixes.items()):
        out.prefixes.append(pb.PrefixView(name=name, length=len(ids), token_ids=ids if include_prefix else []))
    return out


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
