"""The HTTP layer: routes, auth, body limits, SSE, and client-disconnect handling.

Everything about what a request means and what a response contains lives in the
plain modules (chat.py, completions.py, errors.py); this module only moves bytes
between HTTP and the router's gRPC stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import AsyncIterator

import grpc
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.auth import KeyStore, bearer_token
from gateway.chat import parse_chat_request
from gateway.completions import CompletionBuilder
from gateway.config import GatewaySettings
from gateway.errors import APIError, bad_request, from_rpc_error
from gateway.metrics import Metrics
from gateway.tracing import TracingMiddleware
from services.common import owner as owners
from services.common import tls
from services.router.api.client import ReasonCall, RouterClient
from services.router.api.jsonview import session_json
from services.router.api.types import AnswerDelta, Event, Started, StepDelta

log = logging.getLogger("glimprouter.gateway")

SESSION_HEADER = "X-GlimpRouter-Session"
# Closed by the client before the response: nginx's convention, seen only in metrics.
CLIENT_CLOSED = 499


class Gateway:
    """What the routes share: settings, the router client, keys, metrics."""

    def __init__(self, settings: GatewaySettings, router: RouterClient | None = None) -> None:
        self.settings = settings
        self.router = router
        self.keys = KeyStore(settings.api_keys, settings.api_keys_file)
        self.metrics = Metrics()
        self.in_flight = 0
        self.created = int(time.time())

    def authorize(self, request: Request) -> str:
        """Checks the API key; returns the caller's owner id for the router ("" without keys):
        sessions belong to the key that created them."""
        if not self.keys.enabled:
            return ""
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key")
        if not self.keys.check(token):
            raise APIError(401, "incorrect API key provided", None, "invalid_api_key")
        return owners.owner_id(token)


def _gw(request: Request) -> Gateway:
    return request.app.state.gateway


async def read_json(request: Request, limit: int) -> object:
    too_big = bad_request(f"the request body exceeds {limit} bytes", None, "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_big
    if not buf:
        raise bad_request("the request body is empty; send a JSON object", None, "invalid_json")
    try:
        return json.loads(buf)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        raise bad_request("the request body nests too deeply", None, "invalid_json") from None


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class _Clock:
    """Time to first token and inter-token latency of one completion, as the gateway
    receives text from the router; the first text is also an event on the request's span."""

    def __init__(self, metrics: Metrics, stream: bool) -> None:
        self.label = "true" if stream else "false"
        self.metrics = metrics
        self.t0 = time.perf_counter()
        self.last: float | None = None
        self.span = trace.get_current_span()

    def feed(self, ev: Event) -> None:
        if not isinstance(ev, (StepDelta, AnswerDelta)) or not ev.text:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.label).observe(now - self.t0)
            if self.span.is_recording():
                self.span.add_event("first_token", {"glimprouter.time_to_first_token_s": now - self.t0})
        else:
            self.metrics.itl.labels(self.label).observe((now - self.last) / max(1, ev.tokens))
        self.last = now


class _Call:
    """One router call bound to one HTTP request: cancelled when the client goes
    away, and released (in-flight count, watcher) exactly once."""

    def __init__(self, gw: Gateway, request: Request, call: ReasonCall) -> None:
        self.gw, self.call = gw, call
        self.disconnected = False
        self.released = False
        self.watcher = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                break
        if not self.call.done():
            self.disconnected = True
            self.gw.metrics.disconnects.inc()
            log.info("client went away: cancelling its router call")
            self.call.cancel()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.watcher.cancel()
        self.call.cancel()  # a no-op when it finished
        self.gw.in_flight -= 1
        self.gw.metrics.in_flight.dec()


async def chat_completions(request: Request) -> Response:
    gw = _gw(request)
    s = gw.settings
    owner = gw.authorize(request)
    body = await read_json(request, s.max_body_bytes)
    session_id = request.headers.get(SESSION_HEADER, "").strip()
    req = parse_chat_request(body, model_name=s.model_name, session_id=session_id)
    if gw.in_flight >= s.max_concurrent:
        raise APIError(429, f"the gateway is serving {gw.in_flight} requests, its limit; retry later", None, "rate_limit_exceeded")
    gw.in_flight += 1
    gw.metrics.in_flight.inc()
    bound = _Call(gw, request, gw.router.reason_stream(req.reason, timeout=s.request_timeout_s, owner=owner))
    builder = CompletionBuilder(f"chatcmpl-{uuid.uuid4().hex}", s.model_name, include_usage=req.include_usage)
    clock = _Clock(gw.metrics, req.stream)
    events = _timed(bound.call.__aiter__(), clock)
    handed_off = False
    try:
        # The first event decides the status: a refusal (bad policy, unknown
        # session, overload) is an HTTP error, not an error inside a 200 stream.
        first = await anext(events, None)
        if first is None:
            raise APIError(502, "the router ended the stream without any event", None, "bad_gateway")
        headers = {SESSION_HEADER: first.session_id} if isinstance(first, Started) else {}
        if req.stream:
            handed_off = True
            return StreamingResponse(
                _stream(gw, bound, builder, first, events),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        builder.feed(first)
        async for ev in events:
            builder.feed(ev)
        if builder.done is None:
            raise APIError(502, "the router ended the stream before its done event", None, "bad_gateway")
        gw.metrics.completed(builder.done)
        headers[SESSION_HEADER] = builder.done.session_id
        return JSONResponse(builder.result(), headers=headers)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
    except asyncio.CancelledError:
        if bound.disconnected:
            return Response(status_code=CLIENT_CLOSED)
        raise
    finally:
        if not handed_off:
            bound.release()


async def _timed(events: AsyncIterator[Event], clock: _Clock) -> AsyncIterator[Event]:
    async for ev in events:
        clock.feed(ev)
        yield ev


async def _stream(gw: Gateway, bound: _Call, builder: CompletionBuilder, first: Event, events: AsyncIterator[Event]):
    try:
        for chunk in builder.feed(first):
            yield _sse(chunk)
        async for ev in events:
            for chunk in builder.feed(ev):
                yield _sse(chunk)
        if builder.done is None:
            yield _sse(APIError(502, "the router ended the stream before its done event", None, "bad_gateway").body())
            return
        gw.metrics.completed(builder.done)
        yield "data: [DONE]\n\n"
    except grpc.RpcError as exc:
        # Headers are gone: the error travels as an event, which OpenAI clients raise.
        err = from_rpc_error(exc)
        log.warning("router call failed mid-stream: %s", err.message)
        yield _sse(err.body())
    finally:
        bound.release()


async def list_models(request: Request) -> Response:
    gw = _gw(request)
    gw.authorize(request)
    return JSONResponse({"object": "list", "data": [_model(gw)]})


async def get_model(request: Request) -> Response:
    gw = _gw(request)
    gw.authorize(request)
    if request.path_params["model"] != gw.settings.model_name:
        raise APIError(404, f"the model {request.path_params['model']!r} does not exist", "model", "model_not_found")
    return JSONResponse(_model(gw))


def _model(gw: Gateway) -> dict:
    return {"id": gw.settings.model_name, "object": "model", "created": gw.created, "owned_by": "glimprouter"}


async def get_session(request: Request) -> Response:
    gw = _gw(request)
    owner = gw.authorize(request)
    try:
        info = await gw.router.get_session(request.path_params["session_id"], timeout=gw.settings.ready_timeout_s * 5,
                                           owner=owner)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
    return JSONResponse(session_json(info))


async def cancel_session(request: Request) -> Response:
    gw = _gw(request)
    owner = gw.authorize(request)
    try:
        cancelled, status = await gw.router.cancel_session(request.path_params["session_id"], owner=owner)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
    return JSONResponse({"id": request.path_params["session_id"], "cancelled": cancelled, "status": status})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gw = _gw(request)
    ok, why = await gw.router.ready(gw.settings.ready_timeout_s)
    return JSONResponse({"status": "ready" if ok else "unavailable", "router": gw.settings.router, "detail": why},
                        status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    gw = _gw(request)
    return Response(gw.metrics.render(), media_type=gw.metrics.content_type)


# ---- errors: always OpenAI's format ----------------------------------------------------
async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = APIError(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(APIError(500, "internal error in the gateway", None, "internal_error").body(), status_code=500)


# ---- metrics by route --------------------------------------------------------------------
_ROUTES = {"/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics"}


def route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/v1/sessions/"):
        return "/v1/sessions/{id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class MetricsMiddleware:
    """Counts every response by route and status and times it to its last byte."""

    def __init__(self, app, gateway: Gateway) -> None:
        self.app, self.gw = app, gateway

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        route = route_label(scope["path"])
        status = {"code": CLIENT_CLOSED}
        counted = False

        def count() -> None:
            nonlocal counted
            counted = True
            m = self.gw.metrics
            m.requests.labels(route, scope["method"], str(status["code"])).inc()
            m.latency.labels(route).observe(time.perf_counter() - t0)

        async def wrapped(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") and not counted:
                # Counted before the last byte leaves: a client that reads the metrics once
                # it has its answer finds its request counted.
                count()
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except Exception:
            status["code"] = 500  # the outermost middleware answers it with a 500
            raise
        finally:
            if not counted:
                count()


def create_app(settings: GatewaySettings, router: RouterClient | None = None) -> Starlette:
    gateway = Gateway(settings, router)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # The gRPC channel belongs to the serving event loop: made here, closed here.
        own = gateway.router is None
        if own:
            client_tls = tls.ClientTLS(
                settings.router_tls_ca, settings.router_tls_cert, settings.router_tls_key, settings.router_tls_server_name
            )
            log.log(logging.INFO if client_tls.enabled else logging.WARNING, "%s", tls.describe_client(client_tls, "the router"))
            gateway.router = RouterClient(settings.router, settings.max_message_bytes, tls=client_tls)
        yield
        if own:
            await gateway.router.close()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/v1/sessions/{session_id}", get_session, methods=["GET"]),
            Route("/v1/sessions/{session_id}/cancel", cancel_session, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.add_middleware(MetricsMiddleware, gateway=gateway)
    app.add_middleware(TracingMiddleware, route_label=route_label)  # outermost: its span covers the whole response
    return app
