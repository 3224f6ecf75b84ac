"""The router's side of Multiplex: every call to one worker over one stream.

grpcio's Python client spends more CPU starting and ending a call, and on every
streamed message, than the router spends on a step; so each worker endpoint gets
one long-lived Multiplex stream (worker.proto), and a call is a MuxCall on it.
A writer task sends every call that piled up since its last write in one
message; a reader task hands each result to its call, and a caller reading a
streamed call takes every chunk that piled up at once, merged into one. Under
load the cost per step is a share of a message, not a message per token.

A call's prompt goes as a delta against the same session's previous call on the
stream (services/worker/prompt_delta.py), so a call costs what the session added
since, not its length; a delta the worker cannot resolve is sent again whole.

A call fails as the per-call RPC would: with a grpc.aio.AioRpcError of the
worker's status code (UNAVAILABLE when the stream breaks: the worker died or
restarted), so the pool's retry and health logic (workers.py) read it the same
way. A caller that goes away cancels its call on the worker.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from typing import AsyncIterator, Sequence

import grpc
from opentelemetry import propagate

from glimprouter.v1 import worker_pb2 as pb
from services.router import metrics, spans
from services.worker.mux import merge, split
from services.worker.prompt_delta import Sender

log = logging.getLogger("glimprouter.router.workers")

# Method names (as metrics and spans name the calls) -> MuxCall fields
CALLS = {"RenderPrompt": "render_prompt", "Tokenize": "tokenize", "Glimpse": "glimpse", "StepStream": "step",
         "GenerateStream": "generate", "Extend": "extend"}
SERVICE = "glimprouter.v1.ModelWorker"
MAX_BATCH_BYTES = 4 * 1024 * 1024  # a message stays well under the channels' limit (calls carry whole prompts)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Pending:
    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None

    def push(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class MuxChannel:
    """One Multiplex stream to one worker, opened on first use and again after it breaks."""

    def __init__(self, stub, address: str, coalesce_ms: int = 0) -> None:
        self.stub, self.address, self.coalesce_ms = stub, address, coalesce_ms
        self.calls: dict[int, _Pending] = {}
        self.outbox: list[pb.MuxCall] = []
        self._ids = itertools.count(1)
        self._stream = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self.sender = Sender()  # what this stream sent of each session's prompt

    # ---- the stream ------------------------------------------------------------------------
    def _send(self, call: pb.MuxCall, prompt: Sequence[int] | None = None) -> bool:
        """Queues `call`, with `prompt` (if any) encoded for this stream as it is now;
        True when the prompt went as a delta."""
        if self._stream is None:
            self._open()
        delta = False
        if prompt is not None:
            request = getattr(call, call.WhichOneof("call"))
            delta = self.sender.encode(request.session_id, prompt, request.prompt)
        self.outbox.append(call)
        self._wake.set()
        return delta

    def forget(self, session_id: str) -> None:
        self.sender.forget(session_id)

    def _open(self) -> None:
        stream = self._stream = self.stub.Multiplex()
        self.outbox, self.sender = [], Sender()  # a new stream: the worker holds no prompts of it
        self._wake = asyncio.Event()
        # Untraced: the stream outlives every request; each call has its own span.
        ctx = spans.untraced_context()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write(stream, self._wake), context=ctx),
                       loop.create_task(self._read(stream), context=ctx)]

    async def _write(self, stream, wake: asyncio.Event) -> None:
        try:
            while True:
                await wake.wait()
                wake.clear()
                batch, self.outbox = self.outbox, []
                for part in split(batch, MAX_BATCH_BYTES):
                    await stream.write(pb.MuxRequest(calls=part))
                    metrics.message("multiplex", "sent")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: the reader fails the calls
            log.debug("Multiplex to %s: write failed: %s", self.address, exc)
            stream.cancel()

    async def _read(self, stream) -> None:
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"the worker at {self.address} closed its Multiplex stream")
        try:
            async for reply in stream:
                metrics.message("multiplex", "received")
                calls = self.calls
                for r in reply.results:
                    p = calls.get(r.id)
                    if p is not None:
                        if r.last:
                            del calls[r.id]
                        p.push(r)
        except grpc.aio.AioRpcError as exc:
            error = rpc_error(grpc.StatusCode.UNAVAILABLE if exc.code() is grpc.StatusCode.CANCELLED else exc.code(),
                              f"Multiplex to {self.address}: {exc.details()}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = rpc_error(grpc.StatusCode.UNAVAILABLE, f"Multiplex to {self.address}: {exc}")
        finally:
            if self._stream is stream:
                self._stream = None
                self.outbox = []  # (their calls fail below)
                for task in self._tasks:
                    if task is not asyncio.current_task():
                        task.cancel()
            calls, self.calls = self.calls, {}
            for p in calls.values():
                p.push(error)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    # ---- calls -------------------------------------------------------------------------------
    async def results(self, method: str, request, timeout_s: float,
                      prompt: Sequence[int] | None = None) -> AsyncIterator[pb.MuxResult]:
        """The results of one call, as they come; what piled up between two reads comes
        as one result (its chunks merged). `prompt`: the request's prompt, which this
        stream encodes (a delta when it can)."""
        call_id = next(self._ids)
        pending = self.calls[call_id] = _Pending()
        call = pb.MuxCall(id=call_id, timeout_ms=max(1, int(timeout_s * 1000)), coalesce_ms=self.coalesce_ms,
                          **{CALLS[method]: request})
        finished = False
        with spans.worker_call(SERVICE, method) as span:
            if span.is_recording():
                carrier: dict[str, str] = {}
                propagate.inject(carrier, context=spans.context_of(span))
                call.traceparent = carrier.get("traceparent", "")
            try:
                delta = self._send(call, prompt)
                loop = asyncio.get_running_loop()
                while not finished:
                    if not pending.items:
                        pending.waiter = loop.create_future()
                        await pending.waiter
                        pending.waiter = None
                    batch = []
                    while pending.items:
                        item = pending.items.popleft()
                        if isinstance(item, Exception):
                            finished = True
                            raise item
                        if item.HasField("error"):
                            if delta and item.error.code == "FAILED_PRECONDITION":
                                # The worker no longer held the session's previous prompt:
                                # the same call again, with its prompt whole.
                                self.sender.forget(getattr(call, CALLS[method]).session_id)
                                call_id = call.id = next(self._ids)
                                pending = self.calls[call_id] = _Pending()
                                delta = self._send(call, prompt)
                                break
                            finished = True
                            raise rpc_error(_code(item.error.code), item.error.message)
                        finished = finished or item.last
                        if item.WhichOneof("result") is not None:
                            batch.append(item)
                    for item in merge(batch) if len(batch) > 1 else batch:
                        yield item
            finally:
                if not finished and self.calls.pop(call_id, None) is not None and self._stream is not None:
                    self._send(pb.MuxCall(id=call_id, cancel=True))  # the caller went away: stop the work

    async def call(self, method: str, request, timeout_s: float, prompt: Sequence[int] | None = None):
        """A unary call: its one result's message."""
        async with contextlib.aclosing(self.results(method, request, timeout_s, prompt)) as results:
            async for item in results:
                return getattr(item, item.WhichOneof("result"))
        raise rpc_error(grpc.StatusCode.INTERNAL, f"{method} on {self.address} ended without a result")


def _code(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
