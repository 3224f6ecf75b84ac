"""The worker's side of Multiplex: many calls over one stream, results batched.

Each call on the stream runs as its own task through the servicer's method of the
same name (so validation, metrics, cancellation and draining are the per-call
RPCs' own); its results go to one outbox, and the stream's writer sends whatever
piled up while it was sending the previous message, with consecutive chunks of
one call merged. A call's chunks between its first and its last may also wait up
to the call's `coalesce_ms` for more (the caller's choice: how fresh it needs
them); anything else goes out at once. A router with many sessions on this
worker therefore pays per batch and per coalescing window, not per call or per
token. A call's prompt may come as a delta against the same session's previous
call on the stream (prompt_delta.py): it is made whole here, before the call runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from glimprouter.v1 import worker_pb2 as pb
from services.common import telemetry
from services.worker.prompt_delta import Receiver

log = logging.getLogger("glimprouter.worker")
_tracer = trace.get_tracer("glimprouter.worker")

# MuxCall field -> (servicer method, MuxResult field, streams)
_CALLS = {
    "render_prompt": ("RenderPrompt", "render_prompt", False),
    "tokenize": ("Tokenize", "tokenize", False),
    "glimpse": ("Glimpse", "glimpse", False),
    "step": ("StepStream", "step", True),
    "generate": ("GenerateStream", "chunk", True),
    "extend": ("Extend", "extend", False),
}
_PROMPTED = ("glimpse", "step", "generate", "extend")  # calls whose prompt may come as a delta


MAX_BATCH_BYTES = 4 * 1024 * 1024  # a message stays well under the channels' limit


def split(items: list, max_bytes: int) -> list[list]:
    """`items` (protobuf messages) in order, cut into runs of at most `max_bytes` (one item
    larger than that goes alone)."""
    out: list[list] = [[]] if items else []
    size = 0
    for item in items:
        n = item.ByteSize() if len(items) > 1 else 0
        if out[-1] and size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class _CallContext:
    """What the servicer's methods use of a ServicerContext, for one multiplexed call."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)


def merge(results: list[pb.MuxResult]) -> list[pb.MuxResult]:
    """Consecutive chunks of one call merged into one (ids, text and entropies joined;
    the finish fields are the later chunk's), the calls' order kept."""
    out: list[pb.MuxResult] = []
    last: dict[int, pb.MuxResult] = {}  # call id -> its latest chunk result in `out`
    for r in results:
        kind = r.WhichOneof("result")
        chunk = r.chunk if kind == "chunk" else (r.step.chunk if kind == "step" and r.step.HasField("chunk") else None)
        prev = last.get(r.id)
        if kind is None and prev is not None:  # the bare end of a stream: it ends the chunk before it
            prev.last = r.last
            continue
        if chunk is not None and prev is not None:
            into = prev.chunk if kind == "chunk" else prev.step.chunk
            into.token_ids.extend(chunk.token_ids)
            into.text += chunk.text
            into.entropies.extend(chunk.entropies)
            if chunk.finish_reason:
                into.finish_reason = chunk.finish_reason
                into.usage.CopyFrom(chunk.usage)
                into.timings.CopyFrom(chunk.timings)
                into.matched_stop = chunk.matched_stop
            prev.last = r.last
            continue
        out.append(r)
        if chunk is not None:
            last[r.id] = r
        else:
            last.pop(r.id, None)  # a head or an error: later chunks start a new result
    return out


class Multiplexer:
    def __init__(self, servicer, request_iterator, context: grpc.aio.ServicerContext) -> None:
        self.servicer = servicer
        self.requests = request_iterator
        self.context = context
        self.outbox: list[pb.MuxResult] = []
        self.wake = asyncio.Event()
        self.tasks: dict[int, asyncio.Task] = {}
        self.reading = True
        self.urgent = False  # something in the outbox must go out now
        self.timer: asyncio.TimerHandle | None = None  # when chunks that may wait are due
        self.prompts = Receiver()  # the sessions' last prompts on this stream (prompt_delta.py)

    async def serve(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            while True:
                if not (self.outbox and self.urgent):
                    if not self.outbox and not self.reading and not self.tasks:
                        break
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                batch, self.outbox, self.urgent = self.outbox, [], False
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                for part in split(merge(batch), MAX_BATCH_BYTES):
                    await self.context.write(pb.MuxReply(results=part))
        finally:
            reader.cancel()
            for task in list(self.tasks.values()):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(reader, *self.tasks.values(), return_exceptions=True)

    def _put(self, result: pb.MuxResult, wait_s: float = 0.0) -> None:
        """Queue a result; `wait_s`: how long it may wait for the ones after it."""
        self.outbox.append(result)
        if wait_s <= 0:
            self.urgent = True
            self.wake.set()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(wait_s, self._due)

    def _due(self) -> None:
        self.timer = None
        self.urgent = True
        self.wake.set()

    async def _read(self) -> None:
        try:
            async for req in self.requests:
                for call in req.calls:
                    kind = call.WhichOneof("call")
                    if kind == "cancel":
                        task = self.tasks.pop(call.id, None)
                        if task is not None:
                            task.cancel()
                    elif kind in _CALLS and call.id not in self.tasks:
                        # In the order the calls came: a delta is against the one before it.
                        why = self._resolve(getattr(call, kind)) if kind in _PROMPTED else ""
                        if why:
                            self._error(call.id, "FAILED_PRECONDITION", why)
                        else:
                            self.tasks[call.id] = asyncio.create_task(self._run(call, kind))
                    else:
                        self._put(pb.MuxResult(id=call.id, last=True, error=pb.MuxStatus(
                            code="INVALID_ARGUMENT", message=f"call {call.id}: no call, an unknown kind, or an id in use")))
        finally:
            self.reading = False  # the caller closed its side: finish the calls under way, then end
            self.wake.set()

    def _resolve(self, request) -> str:
        return self.prompts.resolve(request.session_id, request.prompt)

    async def _run(self, call: pb.MuxCall, kind: str) -> None:
        method, field, streams = _CALLS[kind]
        request = getattr(call, kind)
        ctx = _CallContext()
        sent_last = False
        try:
            with _span(method, call.traceparent):
                async with asyncio.timeout(call.timeout_ms / 1000 if call.timeout_ms > 0 else None):
                    if streams:
                        wait_s, first = call.coalesce_ms / 1000, True
                        async for msg in getattr(self.servicer, method)(request, ctx):
                            chunk = msg if field == "chunk" else (msg.chunk if msg.HasField("chunk") else None)
                            # The first chunk (time to first token) and the last go at once.
                            middle = chunk is not None and not first and not chunk.finish_reason
                            first = first and chunk is None
                            self._put(pb.MuxResult(id=call.id, **{field: msg}), wait_s if middle else 0.0)
                    else:
                        msg = await getattr(self.servicer, method)(request, ctx)
                        self._put(pb.MuxResult(id=call.id, last=True, **{field: msg}))
                        sent_last = True
        except _Abort as exc:
            self._error(call.id, exc.code.name, exc.details)
            sent_last = True
        except TimeoutError:
            self._error(call.id, "DEADLINE_EXCEEDED", f"the call took more than its {call.timeout_ms} ms")
            sent_last = True
        except asyncio.CancelledError:
            sent_last = True  # cancelled by its caller: nothing more is sent for it
            raise
        except Exception:
            log.exception("multiplexed %s failed", method)
            self._error(call.id, "INTERNAL", "internal error in the model worker (see its log)")
            sent_last = True
        finally:
            self.tasks.pop(call.id, None)
            if not sent_last:
                self._put(pb.MuxResult(id=call.id, last=True))
            self.wake.set()  # the writer ends the stream once the caller is gone and no call is left

    def _error(self, call_id: int, code: str, message: str) -> None:
        self._put(pb.MuxResult(id=call_id, last=True, error=pb.MuxStatus(code=code, message=message)))


@contextlib.contextmanager
def _span(method: str, traceparent: str):
    """The worker's span of one multiplexed call, continuing the caller's (as the gRPC
    server instrumentation does for a call of its own)."""
    if not traceparent or not telemetry.exporting():
        yield None
        return
    parent = propagate.extract({"traceparent": traceparent})
    with _tracer.start_as_current_span(f"/glimprouter.v1.ModelWorker/{method}", context=parent, kind=SpanKind.SERVER,
                                       attributes={"rpc.system": "grpc", "rpc.service": "glimprouter.v1.ModelWorker",
                                                   "rpc.method": method}) as span:
        yield span
