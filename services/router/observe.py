"""The router's Prometheus metrics and OpenTelemetry spans.

Spans of one Reason call (the gRPC server span of the call is their parent):

  session                        one per Reason/ReasonStream call
    RenderPrompt, Tokenize ...   worker calls that set the session up
    EVALSHA create ...           Redis (opentelemetry-instrumentation-redis)
    step <decision>              one per step: "step small", "step large",
      Step / Glimpse / Generate    ("step accept" / "step reject" for verify)
        (the worker's server span)
      EVALSHA append             the step's write to Redis
    answer <role>                the answer after the steps
      GenerateStream

The worker calls are children of the step span because the step span is the
current span while the policy runs, and the gRPC client instrumentation puts the
current context into each call's metadata (W3C traceparent).

Prompt, step and answer text go into spans only when telemetry.trace_content().
Everything here is cheap when nothing is exported: spans are non-recording and
the attribute work is skipped.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Counter, Gauge, Histogram

from services.common import telemetry
from services.router.policies import POLICIES

if TYPE_CHECKING:
    from services.router.policies import Policy
    from services.router.types import ReasonRequest, Record, SessionOptions, Started, Stats

_tracer = trace.get_tracer("glimprouter.router")

# ---- metrics -----------------------------------------------------------------------------
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SESSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
# Nats. ln 2 = 0.69, ln 20 = 3.0 (the top-20 maximum); the paper's tau sits near 1.
_ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0)

REQUESTS = Counter("glimprouter_router_requests_total", "Router calls by method and gRPC status code", ["method", "code"])
DECISIONS = Counter(
    "glimprouter_router_decisions_total",
    "Routing decisions by policy and decision (small/large; accept/reject for verify)",
    ["policy", "decision"],
)
GLIMPSE_ENTROPY = Histogram(
    "glimprouter_router_glimpse_entropy_nats",
    "First-token entropy of the small model's glimpse at each step, by policy and method (top_k or full)",
    ["policy", "method"],
    buckets=_ENTROPY_BUCKETS,
)
STEP_DURATION = Histogram(
    "glimprouter_router_step_duration_seconds",
    "Time of one step (routing, writing and storing it) by the model that wrote it",
    ["model", "role"],
    buckets=_STEP_BUCKETS,
)
SESSION_DURATION = Histogram(
    "glimprouter_router_session_duration_seconds",
    "Time of one Reason call (a session's turn) by policy and gRPC status code",
    ["policy", "code"],
    buckets=_SESSION_BUCKETS,
)
TTFAT = Histogram(
    "glimprouter_router_time_to_first_answer_token_seconds",
    "From the start of a Reason call to the first answer text, by the model writing the answer",
    ["model"],
    buckets=_SESSION_BUCKETS,
)
TOKENS = Counter(
    "glimprouter_router_tokens_total",
    "Tokens by model and phase: glimpse (one per glimpse), step, answer, discarded (drafts thrown away)",
    ["model", "phase"],
)
ACTIVE = Gauge("glimprouter_router_active_sessions", "Sessions this router is working on now")
WORKER_CALLS = Counter(
    "glimprouter_router_worker_calls_total", "Calls to workers by role, endpoint, method and gRPC status code",
    ["role", "endpoint", "method", "code"],
)
WORKER_CALL_DURATION = Histogram(
    "glimprouter_router_worker_call_duration_seconds", "Time of one worker call as the router sees it",
    ["role", "method"], buckets=_STEP_BUCKETS,
)
WORKER_PROMPT_TOKENS = Counter(
    "glimprouter_router_worker_prompt_tokens_total",
    "Prompt tokens the router's calls had each worker prefill, or found in its KV cache (kind=cached)",
    ["role", "endpoint", "kind"],
)
RETRIES = Counter(
    "glimprouter_router_worker_retries_total", "Worker calls retried on another replica, by role and method", ["role", "method"]
)

# What each policy compares with its threshold (the step's "entropy" field).
_SIGNALS = {
    "glimpse": "glimpse_entropy",
    "adaptive": "glimpse_entropy",
    "step-entropy": "step_mean_entropy",
    "verify": "verify_score",
    "random": "random_draw",
}


def decision_label(policy: str, writer: str) -> str:
    """small/large, except verify's: the large model accepted the draft or rejected it."""
    if policy == "verify":
        return "accept" if writer == "small" else "reject"
    return writer


def setup() -> bool:
    """Tracing for the router process (before its gRPC server and channels exist):
    gRPC in and out, and every Redis command."""
    exporting = telemetry.setup("glimprouter-router")
    if not exporting:
        return False
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    inst = RedisInstrumentor()
    if not inst.is_instrumented_by_opentelemetry:
        inst.instrument(request_hook=_name_script)
    return exporting


def _script_names() -> dict[str, str]:
    # The store runs its writes as Lua scripts (EVALSHA <sha>): name them in spans.
    from services.router import store

    out = {}
    for attr, name in (("_APPEND", "append"), ("_CREATE", "create"), ("_RENEW", "renew"), ("_STATUS", "set_status"),
                       ("_RELEASE", "release"), ("_CANCEL", "cancel"), ("_TRACE", "add_trace")):
        src = getattr(store, attr, None)
        if src is not None:
            out[hashlib.sha1(src.encode()).hexdigest()] = name
    return out


_SCRIPTS: dict[str, str] | None = None


def _name_script(span, instance, args, kwargs) -> None:
    global _SCRIPTS
    if not span.is_recording() or len(args) < 2 or str(args[0]).upper() not in ("EVALSHA", "EVAL"):
        return
    if _SCRIPTS is None:
        _SCRIPTS = _script_names()
    sha = args[1].decode() if isinstance(args[1], bytes) else str(args[1])
    name = _SCRIPTS.get(sha) or _SCRIPTS.get(hashlib.sha1(sha.encode()).hexdigest())
    if name:
        span.update_name(f"{args[0]} {name}")
        span.set_attribute("glimprouter.redis.script", name)


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """No spans for what runs inside (background loops: lease renewals, readiness pings)."""
    with suppress_instrumentation():
        yield


def untraced_context() -> contextvars.Context:
    """A copy of the current context with instrumentation suppressed, for
    asyncio.create_task(..., context=...): a background loop started there makes no spans."""
    ctx = contextvars.copy_context()
    ctx.run(lambda: otel_context.attach(otel_context.set_value(otel_context._SUPPRESS_INSTRUMENTATION_KEY, True)))
    return ctx


def current_trace_id() -> str:
    """The current trace id as 32 hex digits ("" when there is no trace)."""
    sc = trace.get_current_span().get_span_context()
    return format(sc.trace_id, "032x") if sc.is_valid else ""


def _finite(attrs: dict, key: str, value: float) -> None:
    if value is not None and not (math.isnan(value) or math.isinf(value)):
        attrs[key] = float(value)


# ---- per session -------------------------------------------------------------------------
@dataclass
class _Session:
    span: trace.Span
    started: float = field(default_factory=time.perf_counter)
    policy: str = ""
    first_answer: bool = False
    active: bool = False


_SESSION: contextvars.ContextVar[_Session | None] = contextvars.ContextVar("glimprouter_session_obs", default=None)


def _code_of(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    code = getattr(exc, "code", None)
    if isinstance(code, str):  # RouterError
        return code
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        return "CANCELLED"
    if "redis" in type(exc).__module__:
        return "UNAVAILABLE"
    return "INTERNAL"


def _fail(span: trace.Span, exc: BaseException | None) -> None:
    # A caller that went away is not an error of this span.
    if exc is None or isinstance(exc, (GeneratorExit, asyncio.CancelledError)) or getattr(exc, "code", "") == "CANCELLED":
        return
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
    span.record_exception(exc)


@contextlib.contextmanager
def session_span(req: "ReasonRequest") -> Iterator["SessionObs"]:
    """The span of one Reason call, current while it runs; times the session."""
    attrs: dict = {"gen_ai.operation.name": "reason", "glimprouter.session.resumed_request": bool(req.session_id)}
    if req.session_id:
        attrs["gen_ai.conversation.id"] = attrs["glimprouter.session.id"] = req.session_id
    r = req.options.routing
    # A metric label only ever holds a known name: requests can send anything.
    policy = r.policy if r.policy in POLICIES else "unknown"
    attrs.update({"glimprouter.request.policy": r.policy[:64], "glimprouter.request.glimpse_mode": r.glimpse_mode[:16]})
    if telemetry.trace_content() and req.messages:
        attrs["gen_ai.input.messages"] = json.dumps(
            [{"role": m.role, "parts": [{"type": "text", "content": m.content}]} for m in req.messages]
        )
    with _tracer.start_as_current_span(
        "session", kind=SpanKind.INTERNAL, attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        obs = SessionObs(_Session(span, policy=policy))
        token = _SESSION.set(obs.s)
        exc: BaseException | None = None
        try:
            yield obs
        except BaseException as e:
            exc = e
            raise
        finally:
            code = _code_of(exc)
            if obs.s.active:
                ACTIVE.dec()
            SESSION_DURATION.labels(obs.s.policy, code).observe(time.perf_counter() - obs.s.started)
            _fail(span, exc)
            span.set_attribute("rpc.grpc.status_code", code)
            with contextlib.suppress(ValueError):  # finalized from another context (interpreter exit)
                _SESSION.reset(token)


class SessionObs:
    def __init__(self, s: _Session) -> None:
        self.s = s

    def started(self, ev: "Started") -> None:
        self.s.active = True
        ACTIVE.inc()
        if self.s.span.is_recording():
            self.s.span.set_attributes({
                "gen_ai.conversation.id": ev.session_id,
                "glimprouter.session.id": ev.session_id,
                "glimprouter.session.turn": ev.turn,
                "glimprouter.session.prefix_mode": ev.prefix_mode,
                "glimprouter.session.resumed_steps": ev.resumed_steps,
                "glimprouter.small.model": ev.small_model,
                "glimprouter.large.model": ev.large_model,
            })

    def finished(self, stats: "Stats", answer: str) -> None:
        span = self.s.span
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


def turn_started(options: "SessionOptions", policy: "Policy") -> None:
    """The loop's options are the session's (a resumed session's come from Redis)."""
    s = _SESSION.get()
    if s is None:
        return
    s.policy = policy.name
    if s.span.is_recording():
        r = options.routing
        attrs = {
            "glimprouter.routing.policy": policy.name,
            "glimprouter.routing.glimpse_mode": r.glimpse_mode,
            "glimprouter.routing.entropy_method": r.entropy,
            "glimprouter.routing.top_k": r.top_k,
            "gen_ai.request.temperature": options.sampling.temperature,
            "gen_ai.request.top_p": options.sampling.top_p,
        }
        if policy.uses_threshold:
            attrs["glimprouter.routing.threshold"] = policy.threshold
        if options.sampling.seed is not None:
            attrs["gen_ai.request.seed"] = options.sampling.seed
        s.span.set_attributes(attrs)


# ---- per step: which worker calls it made ------------------------------------------------------
@dataclass
class _Calls:
    endpoints: dict[str, str] = field(default_factory=dict)  # role -> endpoint of its last call
    retries: int = 0
    calls: int = 0


_CALLS: contextvars.ContextVar[_Calls | None] = contextvars.ContextVar("glimprouter_step_calls", default=None)


def _usage(response):
    """The usage a worker reported for this call (the worker's own metrics use the same rule)."""
    from glimprouter.v1 import worker_pb2 as wpb

    if isinstance(response, wpb.StepResponse):
        return response.generation.usage if response.HasField("generation") else response.glimpse.usage
    if isinstance(response, (wpb.GlimpseResponse, wpb.GenerateResponse, wpb.GenerateChunk)):
        return response.usage
    return None


def worker_call(role: str, endpoint: str, method: str, code: str, seconds: float, response=None) -> None:
    """A worker call ended (workers.py): OK with its response, or a gRPC code name."""
    WORKER_CALLS.labels(role, endpoint, method, code).inc()
    WORKER_CALL_DURATION.labels(role, method).observe(seconds)
    usage = _usage(response) if response is not None else None
    if usage is not None:
        WORKER_PROMPT_TOKENS.labels(role, endpoint, "prefilled").inc(usage.prefilled_tokens)
        WORKER_PROMPT_TOKENS.labels(role, endpoint, "cached").inc(usage.cached_tokens)
    calls = _CALLS.get()
    if calls is not None:
        calls.calls += 1
        if code == "OK":
            calls.endpoints[role] = endpoint


def worker_retry(role: str, method: str) -> None:
    RETRIES.labels(role, method).inc()
    calls = _CALLS.get()
    if calls is not None:
        calls.retries += 1


class StepObs:
    def __init__(self, span: trace.Span, calls: _Calls) -> None:
        self.span, self.calls = span, calls
        self.record: "Record | None" = None

    def done(self, record: "Record") -> None:
        self.record = record


@contextlib.contextmanager
def step_span(policy: "Policy", options: "SessionOptions", session_id: str, turn: int, index: int,
              small_model: str) -> Iterator[StepObs]:
    """One step's span, current while the policy calls the workers and the step is
    stored; named for the decision once it is known; the step's metrics."""
    t0 = time.perf_counter()
    calls = _Calls()
    calls_token = _CALLS.set(calls)
    with _tracer.start_as_current_span("step", record_exception=False, set_status_on_exception=False) as span:
        obs = StepObs(span, calls)
        exc: BaseException | None = None
        try:
            yield obs
        except BaseException as e:
            exc = e
            raise
        finally:
            with contextlib.suppress(ValueError):
                _CALLS.reset(calls_token)
            if obs.record is not None:
                _step_done(span, obs.record, policy, options, session_id, turn, small_model, calls, time.perf_counter() - t0)
            elif span.is_recording():
                span.set_attributes({"glimprouter.session.id": session_id, "glimprouter.step.index": index,
                                     "glimprouter.routing.policy": policy.name, "glimprouter.step.retries": calls.retries})
            _fail(span, exc)


def _step_done(span, record: "Record", policy: "Policy", options: "SessionOptions", session_id: str, turn: int,
               small_model: str, calls: _Calls, seconds: float) -> None:
    name = policy.name
    decision = decision_label(name, record.decision)
    signal = _SIGNALS.get(name, "none")
    method = options.routing.entropy
    DECISIONS.labels(name, decision).inc()
    if signal == "glimpse_entropy" and not math.isnan(record.entropy):
        GLIMPSE_ENTROPY.labels(name, method).observe(record.entropy)
    STEP_DURATION.labels(record.model_id, record.role).observe(seconds)
    TOKENS.labels(record.model_id, "step").inc(record.tokens)
    # Glimpses and discarded drafts are the small model's work whoever wrote the step.
    if record.glimpses:
        TOKENS.labels(small_model, "glimpse").inc(record.glimpses)
    if record.discarded_tokens:
        TOKENS.labels(small_model, "discarded").inc(record.discarded_tokens)
    if not span.is_recording():
        return
    span.update_name(f"step {decision}")
    attrs: dict = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.conversation.id": session_id,
        "gen_ai.request.model": record.model_id,
        "gen_ai.usage.output_tokens": record.tokens,
        "gen_ai.usage.input_tokens": record.prefilled_tokens + record.cached_tokens,
        "gen_ai.usage.cache_read.input_tokens": record.cached_tokens,
        "gen_ai.response.finish_reasons": [record.finish_reason] if record.finish_reason else [],
        "glimprouter.session.id": session_id,
        "glimprouter.session.turn": turn,
        "glimprouter.step.index": record.index,
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
        "glimprouter.routing.policy": name,
        "glimprouter.routing.decision": decision,
        "glimprouter.routing.signal": signal,
        "glimprouter.routing.glimpse_mode": options.routing.glimpse_mode,
        "glimprouter.worker.endpoint": calls.endpoints.get(record.role, ""),
    }
    _finite(attrs, "glimprouter.routing.value", record.entropy)
    _finite(attrs, "glimprouter.routing.threshold", record.threshold)
    if signal == "glimpse_entropy":
        _finite(attrs, "glimprouter.glimpse.entropy", record.entropy)
        attrs["glimprouter.glimpse.entropy_method"] = method
    if record.end_reason:
        attrs["glimprouter.step.end_reason"] = record.end_reason
    if telemetry.trace_content():
        attrs["glimprouter.step.text"] = record.text
    span.set_attributes(attrs)


# ---- the answer ---------------------------------------------------------------------------
class AnswerObs:
    def __init__(self, span: trace.Span, model: str) -> None:
        self.span, self.model = span, model
        self.t0 = time.perf_counter()
        self.first = False

    def text(self, text: str) -> None:
        if self.first or not text:
            return
        self.first = True
        s = _SESSION.get()
        if s is not None and not s.first_answer:
            s.first_answer = True
            TTFAT.labels(self.model).observe(time.perf_counter() - s.started)
        if self.span.is_recording():
            self.span.set_attribute("gen_ai.response.time_to_first_chunk", time.perf_counter() - self.t0)

    def done(self, record: "Record | None") -> None:
        if record is None:
            return
        TOKENS.labels(record.model_id, "answer").inc(record.tokens)
        if not self.span.is_recording():
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
        self.span.set_attributes(attrs)


@contextlib.contextmanager
def answer_span(role: str, model: str, session_id: str) -> Iterator[AnswerObs]:
    calls_token = _CALLS.set(_Calls())
    attrs = {"gen_ai.operation.name": "text_completion", "gen_ai.request.model": model, "gen_ai.conversation.id": session_id,
             "glimprouter.session.id": session_id, "glimprouter.answer.writer": role}
    with _tracer.start_as_current_span(
        f"answer {role}", attributes=attrs, record_exception=False, set_status_on_exception=False
    ) as span:
        exc: BaseException | None = None
        try:
            yield AnswerObs(span, model)
        except BaseException as e:
            exc = e
            raise
        finally:
            _fail(span, exc)
            with contextlib.suppress(ValueError):
                _CALLS.reset(calls_token)


# ---- router gRPC calls by status code ------------------------------------------------------
class RequestMetrics(grpc.aio.ServerInterceptor):
    """Counts the router's own calls by method and status code (health and reflection left out)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                code = "OK"
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    code = _status(context, exc)
                    raise
                finally:
                    REQUESTS.labels(method, code).inc()

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                code = "OK"
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except BaseException as exc:
                    code = _status(context, exc)
                    raise
                finally:
                    REQUESTS.labels(method, code).inc()

            return handler._replace(unary_stream=unary_stream)
        return handler


def _status(context, exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
        return "CANCELLED"
    return "UNKNOWN"
