"""Requests that do not parse are INVALID_ARGUMENT, not UNKNOWN.

gRPC deserializes a request before any servicer code runs; bytes that are not
a valid message (a string field holding invalid UTF-8, a truncated varint) make
the grpc library answer UNKNOWN "Unexpected DecodeError", which reads like a
server bug and tells a client nothing it can act on. `add_servicer` registers a
generated servicer with deserializers that catch the parse error and hand the
method a marker instead, which is refused as INVALID_ARGUMENT naming the
message type and what was wrong. Valid requests take exactly the usual path.
"""
from __future__ import annotations

import inspect
from typing import Callable

import grpc


class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe_deserializer(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or anything a parser raises on hostile bytes
            return Undecodable(f"the request is not a valid protobuf message: {exc}")

    return parse


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.request_streaming or handler.request_deserializer is None:
        return handler  # no client-streaming calls in our contracts; left as they are
    if handler.response_streaming:
        inner_stream = handler.unary_stream
        if not inspect.isasyncgenfunction(inner_stream):
            # A handler that writes its responses with context.write(): wrapped as a coroutine.
            async def unary_stream_writer(request, context):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                await inner_stream(request, context)

            return handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer),
                                    unary_stream=unary_stream_writer)

        async def unary_stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            async for item in inner_stream(request, context):
                yield item

        return handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer), unary_stream=unary_stream)
    inner = handler.unary_unary

    async def unary_unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await inner(request, context)

    return handler._replace(request_deserializer=_safe_deserializer(handler.request_deserializer), unary_unary=unary_unary)


class _GuardedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        name = handler_call_details.method
        if name not in self._cache:
            handler = self.inner.service(handler_call_details)
            if handler is None:
                return None
            self._cache[name] = _guard(handler)
        return self._cache[name]


class _GuardingServer:
    """What a generated add_*Servicer_to_server sees instead of the server."""

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, handlers: dict) -> None:
        self._server.add_registered_method_handlers(service_name, {k: _guard(h) for k, h in handlers.items()})

    def __getattr__(self, name: str):
        return getattr(self._server, name)


def add_servicer(add_to_server: Callable, servicer, server: grpc.aio.Server) -> None:
    """`add_to_server(servicer, server)` (a generated function), with parse errors refused as INVALID_ARGUMENT."""
    add_to_server(servicer, _GuardingServer(server))
