"""The ModelWorker gRPC servicer: validate, call the engine, convert. Nothing else."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator

import grpc

from glimprouter.v1 import worker_pb2 as pb
from glimprouter.v1 import worker_pb2_grpc as pb_grpc
from services.worker import observe, protomap, validation as v
from services.worker.mux import Multiplexer
from services.worker.engine import CancelToken, Engine, EngineError
from services.worker.types import Decided, Gate, GenerateRequest

log = logging.getLogger(__name__)


class WorkerServicer(pb_grpc.ModelWorkerServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.limits = v.Limits.of(engine.info)
        # Graceful shutdown (server.py): new calls are refused once draining, and the
        # server waits for `in_flight` to reach zero before it stops.
        self.draining = False
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext, method: str):
        """Map validation and engine errors to status codes (the server keeps serving)
        and record metrics and span attributes; callers append their response."""
        if self.draining:
            # UNAVAILABLE: the router retries the call on another replica at once.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this worker is shutting down; use another replica")
        started, code, out = time.perf_counter(), "OK", []
        self.in_flight += 1
        try:
            yield out
        except (v.InvalidArgument, EngineError) as exc:
            code = "INVALID_ARGUMENT"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = "INTERNAL"
            log.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the model worker (see its log)")
        finally:
            self.in_flight -= 1
            observe.record(self.engine.info.model_id, method, code, time.perf_counter() - started, out[-1] if out else None)

    def _prompt(self, prompt: pb.Prompt) -> list[int]:
        return v.prompt_ids(prompt, self.limits, lambda text: self.engine.tokenize(text, add_bos=True))

    def _generate_request(self, request: pb.GenerateRequest | pb.StepRequest, return_entropies: bool = False) -> GenerateRequest:
        return GenerateRequest(
            prompt=self._prompt(request.prompt),
            sampling=v.sampling(request.sampling),
            stop=v.stop(request.stop),
            session_id=v.session_id(request.session_id),
            return_entropies=return_entropies,
            top_k=v.top_k(request.top_k),
        )

    def _step_args(self, request: pb.StepRequest) -> tuple[GenerateRequest, Gate]:
        req = self._generate_request(request)
        return req, Gate(v.entropy_method(request.entropy_method), v.threshold(request.threshold))

    async def GetModelInfo(self, request, context):
        return protomap.model_info_to_pb(self.engine.info)

    async def RenderPrompt(self, request: pb.RenderPromptRequest, context):
        async with self._call(context, "RenderPrompt") as out:
            msgs = v.messages(request.messages, request.add_generation_prompt, request.continue_final_message)
            ids, text = self.engine.render_prompt(msgs, request.add_generation_prompt, request.continue_final_message)
            out.append(pb.RenderPromptResponse(token_ids=ids, text=text))
            return out[-1]

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        async with self._call(context, "Tokenize") as out:
            out.append(pb.TokenizeResponse(token_ids=self.engine.tokenize(request.text)))
            return out[-1]

    async def Glimpse(self, request: pb.GlimpseRequest, context):
        async with self._call(context, "Glimpse") as out:
            prompt = self._prompt(request.prompt)
            k = v.top_k(request.top_k)
            sid = v.session_id(request.session_id)
            cancel = CancelToken()
            try:
                out.append(protomap.glimpse_to_pb(await self.engine.glimpse(prompt, k, sid, cancel)))
            finally:
                cancel.cancel()
            return out[-1]

    async def Step(self, request: pb.StepRequest, context):
        async with self._call(context, "Step") as out:
            req, gate = self._step_args(request)
            cancel = CancelToken()
            try:
                out.append(protomap.step_to_pb(await self.engine.step_full(req, gate, cancel)))
                return out[-1]
            finally:
                cancel.cancel()  # a cancelled RPC stops the decode loop between tokens

    async def StepStream(self, request: pb.StepRequest, context) -> AsyncIterator[pb.StepChunk]:
        async with self._call(context, "StepStream") as out:
            req, gate = self._step_args(request)
            cancel = CancelToken()
            stream = self.engine.step(req, gate, cancel)
            head = pb.StepChunk()
            try:
                async for item in stream:
                    if isinstance(item, Decided):
                        msg = protomap.decided_to_pb(item)
                        # Metrics read a StepResponse: the head, then the step's totals.
                        out[:] = [pb.StepResponse(decision=msg.decision, entropy=msg.entropy, glimpse=msg.glimpse)]
                    else:
                        msg = pb.StepChunk(chunk=protomap.chunk_to_pb(item))
                        if item.final is not None:
                            out[-1].generation.usage.CopyFrom(msg.chunk.usage)
                            out[-1].generation.timings.CopyFrom(msg.chunk.timings)
                    yield msg
            finally:
                cancel.cancel()
                await stream.aclose()

    async def Generate(self, request: pb.GenerateRequest, context):
        async with self._call(context, "Generate") as out:
            req = self._generate_request(request, request.return_entropies)
            cancel = CancelToken()
            try:
                gen = await self.engine.generate_full(req, cancel)
            finally:
                cancel.cancel()
            out.append(protomap.generation_to_pb(gen))
            return out[-1]

    async def Extend(self, request: pb.ExtendRequest, context):
        async with self._call(context, "Extend") as out:
            prompt = self._prompt(request.prompt)
            sid = v.session_id(request.session_id)
            if not sid:
                raise v.InvalidArgument("session_id", "is required: Extend grows that session's KV state")
            cancel = CancelToken()
            try:
                out.append(protomap.extension_to_pb(await self.engine.extend(prompt, sid, cancel)))
            finally:
                cancel.cancel()
            return out[-1]

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        async with self._call(context, "GenerateStream") as out:
            req = self._generate_request(request, request.return_entropies)
            cancel = CancelToken()
            stream = self.engine.generate(req, cancel)
            try:
                async for c in stream:
                    out[:] = [protomap.chunk_to_pb(c)]  # metrics read the last (final) chunk
                    yield out[-1]
            finally:
                cancel.cancel()
                await stream.aclose()

    async def Multiplex(self, request_iterator, context) -> None:
        # Each call runs through the method of the same name above (services/worker/mux.py).
        await Multiplexer(self, request_iterator, context).serve()
