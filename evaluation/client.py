"""gRPC calls the evaluation makes, each interruptible with Ctrl-C.

The router is called through its client package (services.router.api), streamed,
so each problem's time to first token and inter-token latency are measured as a
user of the stream sees them; each call runs in its own event loop (asyncio.run),
where Ctrl-C cancels the call (the router stops the session) and propagates.

A blocking gRPC call to a worker in the main thread may hold a KeyboardInterrupt
until it returns, so those calls run as futures polled in short waits.
"""
from __future__ import annotations

import asyncio

import grpc

from glimprouter.v1 import worker_pb2 as wpb
from glimprouter.v1 import worker_pb2_grpc
from services.router.api import ReasonRequest
from services.router.api.client import Reply
from services.router.api.client import RouterClient as AsyncRouterClient

_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def wait(future, poll_s: float = 0.25):
    try:
        while True:
            try:
                return future.result(timeout=poll_s)
            except grpc.FutureTimeoutError:
                continue
    except KeyboardInterrupt:
        future.cancel()
        raise


class RouterClient:
    def __init__(self, address: str) -> None:
        self.address = address

    def reason(self, request: ReasonRequest, timeout_s: float) -> Reply:
        async def call() -> Reply:
            async with AsyncRouterClient(self.address, max_message_bytes=64 * 1024 * 1024) as client:
                return await client.reason(request, timeout=timeout_s)

        return asyncio.run(call())

    def close(self) -> None:
        pass


class WorkerClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=_OPTIONS)
        self.stub = worker_pb2_grpc.ModelWorkerStub(self.channel)
        self._info: wpb.ModelInfo | None = None

    @property
    def info(self) -> wpb.ModelInfo:
        if self._info is None:
            self._info = wait(self.stub.GetModelInfo.future(wpb.GetModelInfoRequest(), timeout=60))
        return self._info

    def render(self, messages: list[tuple[str, str]]) -> tuple[list[int], str]:
        req = wpb.RenderPromptRequest(messages=[wpb.ChatMessage(role=r, content=c) for r, c in messages],
                                      add_generation_prompt=True)
        resp = wait(self.stub.RenderPrompt.future(req, timeout=60))
        return list(resp.token_ids), resp.text

    def tokenize(self, text: str) -> list[int]:
        return list(wait(self.stub.Tokenize.future(wpb.TokenizeRequest(text=text), timeout=60)).token_ids)

    def glimpse(self, ids: list[int], top_k: int = 20, session_id: str = "") -> wpb.GlimpseResponse:
        req = wpb.GlimpseRequest(prompt=wpb.Prompt(token_ids=wpb.TokenIds(ids=ids)), top_k=top_k, session_id=session_id)
        return wait(self.stub.Glimpse.future(req, timeout=600))

    def generate(self, ids: list[int], *, max_tokens: int, step_boundary: str | None = None, stop_on_eos: bool = True,
                 stop: tuple[str, ...] = (), session_id: str = "") -> wpb.GenerateResponse:
        """Greedy generation (temperature unset = 0)."""
        return wait(self.stub.Generate.future(self._gen_request(ids, max_tokens, step_boundary, stop_on_eos, stop, session_id),
                                              timeout=600))

    def generate_stream(self, ids: list[int], *, max_tokens: int, stop: tuple[str, ...] = (), session_id: str = ""):
        """Greedy generation as a stream of chunks; cancel() the returned call to stop the model."""
        return self.stub.GenerateStream(self._gen_request(ids, max_tokens, None, True, stop, session_id), timeout=600)

    @staticmethod
    def _gen_request(ids, max_tokens, step_boundary, stop_on_eos, stop, session_id) -> wpb.GenerateRequest:
        cond = wpb.StopCondition(stop=list(stop), stop_on_eos=stop_on_eos)
        if step_boundary is not None:
            cond.step_boundary = step_boundary
        return wpb.GenerateRequest(prompt=wpb.Prompt(token_ids=wpb.TokenIds(ids=ids)),
                                   sampling=wpb.Sampling(max_tokens=max_tokens), stop=cond, session_id=session_id)

    def close(self) -> None:
        self.channel.close()
