"""The router's OpenTelemetry spans.

Spans of one Reason call (the gRPC server span of the call is their parent):

  session                        one per Reason/ReasonStream call; a "first_token" event
    RenderPrompt, Tokenize ...   worker calls that set the session up
    EVALSHA create ...           Redis scripts, named for what they do
    step <decision>              one per step: "step small", "step large",
      StepStream / Glimpse ...     ("step accept" / "step reject" for verify)
        (the worker's server span)
      EVALSHA append             the step's write to Redis
    answer <role>                the answer after the steps
      GenerateStream

The worker calls are children of the step span because the step span is the
current span while the policy runs, and the gRPC client instrumentation puts the
current context into each call's metadata (W3C traceparent).

Every span comes from one helper, `_span`. Nothing is traced unless `setup()`
found an OTLP endpoint: then the helper hands out one shared non-recording span
and costs nothing per step. Prompt, step and answer text go into spans only when
telemetry.trace_content().
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common import telemetry

if TYPE_CHECKING:
    from services.router.api.types import ReasonRequest, Started, Stats
    from services.router.policies import Policy
    from services.router.session import Record, SessionOptions

_tracer = trace.get_tracer("glimprouter.router")
_OFF = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
ENABLED = False  # set by setup() when spans are exported


class _Untraced:
    """What every span helper returns while nothing is traced: one shared object, no
    generator per use (they run several times per step)."""

    __slots__ = ()

    def __enter__(self) -> trace.Span:
        return _OFF

    def __exit__(self, *exc) -> bool:
        return False


_NONE = _Untraced()


def _off() -> bool:
    return not ENABLED or bool(otel_context.get_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY))


def setup() -> bool:
    """Tracing for the router process (before its gRPC server and channels exist): gRPC
    in and out, and the Redis commands the store does not send as named scripts."""
    global ENABLED
    ENABLED = telemetry.setup("glimprouter-router", trace_servers=False)  # server spans: `server_call`
    if ENABLED:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        inst = RedisInstrumentor()
        if not inst.is_instrumented_by_opentelemetry:
            inst.instrument()
    return ENABLED


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """No spans for what runs inside (background loops: lease renewals, readiness pings)."""
    with suppress_instrumentation():
        yield


def untraced_context() -> contextvars.Context:
    """A copy of the current context with instrumentation suppressed, for
    asyncio.create_task(..., context=...): a background loop started there makes no spans."""
    ctx = contextvars.copy_context()
    if ENABLED:
        ctx.run(lambda: otel_context.attach(otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True)))
    return ctx


def current_trace_id() -> str:
    """The current trace id as 32 hex digits ("" when there is no trace)."""
    sc = trace.get_current_span().get_span_context()
    return format(sc.trace_id, "032x") if sc.is_valid else ""


def _is_cancel(exc: BaseException | None) -> bool:
    return isinstance(exc, (GeneratorExit, asyncio.CancelledError)) or getattr(exc, "code", "") == "CANCELLED"


def _span(name: str, attrs: dict | None = None, kind: SpanKind = SpanKind.INTERNAL):
    """The one way a span is made here: current while the block runs; an exception
    marks it failed, except a caller that went away (cancelled), which is not an error."""
    return _NONE if _off() else _recorded(name, attrs, kind)


@contextlib.contextmanager
def _recorded(name: str, attrs: dict | None, kind: SpanKind) -> Iterator[trace.Span]:
    with _tracer.start_as_current_span(name, kind=kind, attributes=attrs, record_exception=False,
                                       set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as exc:
            if not _is_cancel(exc):
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
                span.record_exception(exc)
            raise


def _finite(attrs: dict, key: str, value: float | None) -> None:
    if value is not None and not (math.isnan(value) or math.isinf(value)):
        attrs[key] = float(value)


# ---- the router's own calls ----------------------------------------------------------------------
_ERROR_CODES = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}


def server_call(service: str, method: str, metadata):
    """The server span of one call to the router, continuing the caller's trace (W3C
    traceparent in the metadata). Made here rather than by OpenTelemetry's gRPC server
    wrapper, which cannot wrap a handler that writes its stream with context.write."""
    return _NONE if _off() else _server_call(service, method, metadata)


@contextlib.contextmanager
def _server_call(service: str, method: str, metadata) -> Iterator[trace.Span]:
    carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
    attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    with _tracer.start_as_current_span(f"/{service}/{method}", context=propagate.extract(carrier), kind=SpanKind.SERVER,
                                       attributes=attrs, record_exception=False, set_status_on_exception=False) as span:
        yield span


def call_ended(span: trace.Span, code: str) -> None:
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code)
        if code in _ERROR_CODES:
            span.set_status(Status(StatusCode.ERROR, code))


# ---- the session ---------------------------------------------------------------------------------
def session(req: "ReasonRequest"):
    """The span of one Reason call, current while it runs."""
    if _off():
        return _NONE
    attrs = {"gen_ai.operation.name": "reason", "glimprouter.session.resumed_request": bool(req.session_id)}
    if req.session_id:
        attrs["gen_ai.conversation.id"] = attrs["glimprouter.session.id"] = req.session_id
    r = req.routing
    if r is not None:
        attrs["glimprouter.request.policy"] = (r.policy or "")[:64]
        if r.glimpse_mode is not None:
            attrs["glimprouter.request.glimpse_mode"] = r.glimpse_mode.value
    if telemetry.trace_content() and req.messages:
        attrs["gen_ai.input.messages"] = json.dumps(
            [{"role": m.role, "parts": [{"type": "text", "content": m.content}]} for m in req.messages]
        )
    return _span("session", attrs)


def started(span: trace.Span, ev: "Started") -> None:
    if span.is_recording():
        span.set_attributes({
            "gen_ai.conversation.id": ev.session_id,
            "glimprouter.session.id": ev.session_id,
            "glimprouter.session.turn": ev.turn,
            "glimprouter.session.prefix_mode": ev.prefix_mode.value if ev.prefix_mode else "",
            "glimprouter.session.resumed_steps": ev.resumed_steps,
            "glimprouter.small.model": ev.small_model,
            "glimprouter.large.model": ev.large_model,
        })


def turn(span: trace.Span, options: "SessionOptions", policy: "Policy") -> None:
    """The options the turn runs with (a resumed session's come from Redis)."""
    if not span.is_recording():
        return
    r, s = options.routing, options.sampling
    attrs = {
        "glimprouter.routing.policy": policy.name,
        "glimprouter.routing.glimpse_mode": r.glimpse_mode.value,
        "glimprouter.routing.entropy_method": r.entropy.value,
        "glimprouter.routing.top_k": r.top_k,
        "gen_ai.request.temperature": s.temperature,
        "gen_ai.request.top_p": s.top_p,
    }
    if policy.uses_threshold:
        attrs["glimprouter.routing.threshold"] = policy.threshold
    if s.seed is not None:
        attrs["gen_ai.request.seed"] = s.seed
    span.set_attributes(attrs)


def first_token(span: trace.Span, seconds: float, where: str) -> None:
    if span.is_recording():
        span.add_event("first_token", {"glimprouter.time_to_first_token_s": seconds, "glimprouter.first_token.in": where})


def finished(span: trace.Span, stats: "Stats", answer: str) -> None:
    if not span.is_recording():
        return
    attrs = {
        "glimprouter.session.steps": stats.steps,
        "glimprouter.session.small_steps": stats.small.steps,
        "glimprouter.session.large_steps": stats.large.steps,
        "glimprouter.session.intervention_rate": stats.intervention_rate,
        "glimprouter.session.thinking_tokens": stats.thinking_tokens,
        "glimprouter.session.answer_tokens": stats.answer_tokens,
        "glimprouter.session.thinking_end": stats.thinking_end,
        "glimprouter.session.answer_end": stats.answer_end,
        "gen_ai.usage.output_tokens": stats.small.generated_tokens + stats.large.generated_tokens,
    }
    if telemetry.trace_content():
        attrs["glimprouter.answer.text"] = answer
    span.set_attributes(attrs)


def failed(span: trace.Span, code: str) -> None:
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code)


# ---- worker calls of one step or answer --------------------------------------------------------------
def worker_call(service: str, method: str):
    """The client span of one call on a worker's Multiplex stream, a child of the current
    span (the step's) but not made current: the caller reads the call's results in
    between its own work. Its context travels with the call (mux.py)."""
    return _NONE if _off() else _worker_call(service, method)


@contextlib.contextmanager
def _worker_call(service: str, method: str) -> Iterator[trace.Span]:
    span = _tracer.start_span(f"/{service}/{method}", kind=SpanKind.CLIENT,
                              attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
    try:
        yield span
    except BaseException as exc:
        code = getattr(exc, "code", None)
        name = code().name if callable(code) else "CANCELLED" if _is_cancel(exc) else "UNKNOWN"
        span.set_attribute("rpc.grpc.status_code", name)
        if not _is_cancel(exc) and name != "CANCELLED":
            span.set_status(Status(StatusCode.ERROR, f"{name}: {exc}"[:500]))
        raise
    finally:
        span.end()


def context_of(span: trace.Span):
    return trace.set_span_in_context(span)

@dataclass
class _Calls:
    endpoints: dict[str, str] = field(default_factory=dict)  # role -> endpoint of its last call
    retries: int = 0
    calls: int = 0


_CALLS: contextvars.ContextVar[_Calls | None] = contextvars.ContextVar("glimprouter_step_calls", default=None)


def note_call(role: str, endpoint: str, ok: bool) -> None:
    """A worker call ended (workers.py): what the step's span reports."""
    calls = _CALLS.get()
    if calls is not None:
        calls.calls += 1
        if ok:
            calls.endpoints[role] = endpoint


def note_retry() -> None:
    calls = _CALLS.get()
    if calls is not None:
        calls.retries += 1


def _with_calls(name: str, attrs: dict | None):
    return _NONE if _off() else _calls_span(name, attrs)


@contextlib.contextmanager
def _calls_span(name: str, attrs: dict | None) -> Iterator[trace.Span]:
    token = _CALLS.set(_Calls())
    try:
        with _span(name, attrs) as span:
            yield span
    finally:
        with contextlib.suppress(ValueError):
            _CALLS.reset(token)


# ---- steps ---------------------------------------------------------------------------------------
def step(policy: "Policy", options: "SessionOptions", session_id: str, turn_: int, index: int):
    """One step's span, current while the policy calls the workers and the step is stored;
    named for the decision once it is known (step_done)."""
    if _off():
        return _NONE
    return _with_calls("step", {"glimprouter.session.id": session_id, "glimprouter.session.turn": turn_,
                                "glimprouter.step.index": index, "glimprouter.routing.policy": policy.name})


def restarted(span: trace.Span, attempt: int) -> None:
    if span.is_recording():
        span.add_event("step restarted", {"glimprouter.step.failed_attempt": attempt})
        span.set_attribute("glimprouter.step.attempts", attempt + 1)


def step_done(span: trace.Span, policy: "Policy", options: "SessionOptions", record: "Record", session_id: str) -> None:
    if not span.is_recording():
        return
    from services.router.api.types import Role

    calls = _CALLS.get() or _Calls()
    decision = policy.label(Role(record.role))
    span.update_name(f"step {decision}")
    attrs: dict = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.conversation.id": session_id,
        "gen_ai.request.model": record.model_id,
        "gen_ai.usage.output_tokens": record.tokens,
        "gen_ai.usage.input_tokens": record.prefilled_tokens + record.cached_tokens,
        "gen_ai.usage.cache_read.input_tokens": record.cached_tokens,
        "gen_ai.response.finish_reasons": [record.finish_reason] if record.finish_reason else [],
        "glimprouter.step.writer": record.role,
        "glimprouter.step.tokens": record.tokens,
        "glimprouter.step.cached_tokens": record.cached_tokens,
        "glimprouter.step.prefilled_tokens": record.prefilled_tokens,
        "glimprouter.step.discarded_tokens": record.discarded_tokens,
        "glimprouter.step.glimpses": record.glimpses,
        "glimprouter.step.finish_reason": record.finish_reason,
        "glimprouter.step.worker_ms": record.worker_ms,
        "glimprouter.step.retries": calls.retries,
        "glimprouter.step.worker_calls": calls.calls,
        "glimprouter.routing.decision": decision,
        "glimprouter.routing.signal": policy.signal,
        "glimprouter.routing.glimpse_mode": options.routing.glimpse_mode.value,
        "glimprouter.worker.endpoint": calls.endpoints.get(record.role, ""),
    }
    _finite(attrs, "glimprouter.routing.value", record.entropy)
    _finite(attrs, "glimprouter.routing.threshold", record.threshold)
    if policy.signal == "glimpse_entropy":
        _finite(attrs, "glimprouter.glimpse.entropy", record.entropy)
        attrs["glimprouter.glimpse.entropy_method"] = options.routing.entropy.value
    if record.end_reason:
        attrs["glimprouter.step.end_reason"] = record.end_reason
    if telemetry.trace_content():
        attrs["glimprouter.step.text"] = record.text
    span.set_attributes(attrs)


# ---- the answer ----------------------------------------------------------------------------------
def answer(role: str, model: str, session_id: str):
    if _off():
        return _NONE
    return _with_calls(f"answer {role}", {"gen_ai.operation.name": "text_completion", "gen_ai.request.model": model,
                                          "gen_ai.conversation.id": session_id, "glimprouter.session.id": session_id,
                                          "glimprouter.answer.writer": role})


def first_chunk(span: trace.Span, seconds: float) -> None:
    if span.is_recording():
        span.set_attribute("gen_ai.response.time_to_first_chunk", seconds)


def answer_done(span: trace.Span, record: "Record") -> None:
    if not span.is_recording():
        return
    attrs = {
        "gen_ai.usage.output_tokens": record.tokens,
        "gen_ai.usage.input_tokens": record.prefilled_tokens + record.cached_tokens,
        "gen_ai.usage.cache_read.input_tokens": record.cached_tokens,
        "gen_ai.response.finish_reasons": [record.finish_reason] if record.finish_reason else [],
        "glimprouter.answer.tokens": record.tokens,
        "glimprouter.answer.finish_reason": record.finish_reason,
    }
    calls = _CALLS.get()
    if calls is not None:
        attrs["glimprouter.worker.endpoint"] = calls.endpoints.get(record.role, "")
        attrs["glimprouter.answer.retries"] = calls.retries
    if telemetry.trace_content():
        attrs["glimprouter.answer.text"] = record.text
    span.set_attributes(attrs)


# ---- Redis -----------------------------------------------------------------------------------------
def redis_script(name: str):
    """One store script call, in its caller's span (the call itself travels in a batch)."""
    if _off():
        return _NONE
    attrs = {"db.system": "redis", "db.operation": "EVALSHA", "db.statement": "EVALSHA ?",  # keys and values never
             "glimprouter.redis.script": name}
    return _span(f"EVALSHA {name}", attrs, SpanKind.CLIENT)

