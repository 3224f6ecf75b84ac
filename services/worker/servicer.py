"""The ModelWorker gRPC servicer: validate, call the engine, convert. Nothing else."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

import grpc

from glimprouter.v1 import worker_pb2 as pb
from glimprouter.v1 import worker_pb2_grpc as pb_grpc
from services.worker import convert, validation as v
from services.worker.engine import CancelToken, Engine, EngineError

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _errors(context: grpc.aio.ServicerContext):
    """Map validation and engine errors to gRPC status codes; keep serving."""
    try:
        yield
    except (v.InvalidArgument, EngineError) as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except asyncio.CancelledError:
        raise
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("worker call failed")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error in the model worker (see its log)")


class WorkerServicer(pb_grpc.ModelWorkerServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.limits = v.Limits.of(engine.info)

    def _prompt(self, prompt: pb.Prompt) -> list[int]:
        return v.prompt_ids(prompt, self.limits, lambda text: self.engine.tokenize(text, add_bos=True))

    async def GetModelInfo(self, request, context):
        return convert.model_info(self.engine.info)

    async def RenderPrompt(self, request: pb.RenderPromptRequest, context):
        async with _errors(context):
            msgs = v.messages(request.messages, request.add_generation_prompt, request.continue_final_message)
            ids, text = self.engine.render_prompt(msgs, request.add_generation_prompt, request.continue_final_message)
            return pb.RenderPromptResponse(token_ids=ids, text=text)

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        async with _errors(context):
            return pb.TokenizeResponse(token_ids=self.engine.tokenize(request.text))

    async def Glimpse(self, request: pb.GlimpseRequest, context):
        async with _errors(context):
            prompt = self._prompt(request.prompt)
            k = v.top_k(request.top_k)
            sid = v.session_id(request.session_id)
            return convert.glimpse(await self.engine.glimpse(prompt, k, sid, CancelToken()))

    async def Step(self, request: pb.StepRequest, context):
        async with _errors(context):
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
                return convert.step(await self.engine.step(*args, cancel))
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
        async with _errors(context):
            prompt, sampling, stop, sid = self._generate_args(request)
            cancel = CancelToken()
            try:
                gen = await self.engine.generate_full(
                    prompt, sampling, stop, sid, cancel, request.return_entropies, v.top_k(request.top_k)
                )
            finally:
                cancel.cancel()
            return convert.generation(gen)

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        async with _errors(context):
            prompt, sampling, stop, sid = self._generate_args(request)
            cancel = CancelToken()
            stream = self.engine.generate(prompt, sampling, stop, sid, cancel, request.return_entropies, v.top_k(request.top_k))
            try:
                async for c in stream:
                    yield convert.chunk(c)
            finally:
                cancel.cancel()
                await stream.aclose()
