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
from services.worker import convert, observe, validation as v
from services.worker.engine import CancelToken, Engine, EngineError

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

    async def GetModelInfo(self, request, context):
        return convert.model_info(self.engine.info)

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
            out.append(convert.glimpse(await self.engine.glimpse(prompt, k, sid, CancelToken())))
            return out[-1]

    async def Step(self, request: pb.StepRequest, context):
        async with self._call(context, "Step") as out:
            args = (
                self._prompt(request.prompt),
                v.entropy_method(request.entropy_method),
                v.threshold(request.threshold),
                v.top_k(request.top_k),
                v.sampling(request.sampling),
                v.stop(request.stop),
                v.session_id(request.session_id),
            )
            cancel = CancelToken()
            try:
                out.append(convert.step(await self.engine.step(*args, cancel)))
                return out[-1]
            finally:
                cancel.cancel()  # a cancelled RPC stops the decode loop between tokens

    def _generate_args(self, request: pb.GenerateRequest):
        return (
            self._prompt(request.prompt),
            v.sampling(request.sampling),
            v.stop(request.stop),
            v.session_id(request.session_id),
        )

    async def Generate(self, request: pb.GenerateRequest, context):
        async with self._call(context, "Generate") as out:
            prompt, sampling, stop, sid = self._generate_args(request)
            cancel = CancelToken()
            try:
                gen = await self.engine.generate_full(
                    prompt, sampling, stop, sid, cancel, request.return_entropies, v.top_k(request.top_k)
                )
            finally:
                cancel.cancel()
            out.append(convert.generation(gen))
            return out[-1]

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        async with self._call(context, "GenerateStream") as out:
            prompt, sampling, stop, sid = self._generate_args(request)
            cancel = CancelToken()
            stream = self.engine.generate(prompt, sampling, stop, sid, cancel, request.return_entropies, v.top_k(request.top_k))
            try:
                async for c in stream:
                    out[:] = [convert.chunk(c)]  # metrics read the last (final) chunk
                    yield out[-1]
            finally:
                cancel.cancel()
                await stream.aclose()
