"""The Multiplex RPC: many calls over one stream, each answered as its own RPC would
answer it, with results batched and a call's chunks merged (a sim worker process over
real gRPC; the sim is deterministic, so a multiplexed call and its RPC agree exactly)."""
from __future__ import annotations

import queue
import threading

import grpc
import pytest

from glimprouter.v1 import worker_pb2 as pb
from glimprouter.v1 import worker_pb2_grpc
from services.common import procs
from services.worker.mux import merge, split


@pytest.fixture(scope="module")
def sim():
    svc = procs.start("worker", ["services.worker", "--backend", "sim", "--model", "sim", "--port", "0",
                                 "--sim-step-tokens", "12", "--sim-token-latency-s", "0.01", "--sim-hard-steps", "1",
                                 "--metrics-port", "0"],
                      timeout=60)
    yield svc
    svc.stop()


class Mux:
    """One Multiplex call driven from a test: send calls, collect results per id."""

    def __init__(self, stub) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.results: dict[int, list[pb.MuxResult]] = {}
        self.replies = 0
        self.done = threading.Event()
        self.call = stub.Multiplex(iter(self.requests.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for reply in self.call:
            self.replies += 1
            for r in reply.results:
                self.results.setdefault(r.id, []).append(r)

    def send(self, *calls: pb.MuxCall) -> None:
        self.requests.put(pb.MuxRequest(calls=list(calls)))

    def wait(self, call_id: int, timeout: float = 30) -> list[pb.MuxResult]:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            rs = self.results.get(call_id, [])
            if rs and rs[-1].last:
                return rs
            time.sleep(0.01)
        raise AssertionError(f"call {call_id} did not finish: {self.results.get(call_id)}")

    def close(self) -> None:
        self.requests.put(None)
        self.reader.join(10)


def gen_request(prompt: list[int], max_tokens: int = 40) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prompt)),
                              sampling=pb.Sampling(max_tokens=max_tokens), stop=pb.StopCondition(step_boundary=""))


def test_calls_over_one_stream_answer_as_their_rpcs_do(sim, faults):
    with grpc.insecure_channel(sim.address) as ch:
        stub = worker_pb2_grpc.ModelWorkerStub(ch)
        prompt = list(stub.RenderPrompt(pb.RenderPromptRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], add_generation_prompt=True)).token_ids)
        alone = list(stub.GenerateStream(gen_request(prompt)))
        step = pb.StepRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prompt)), threshold=0.9, top_k=20,
                              sampling=pb.Sampling(max_tokens=40))
        step_alone = list(stub.StepStream(step))
        mux = Mux(stub)
        try:
            mux.send(
                pb.MuxCall(id=1, tokenize=pb.TokenizeRequest(text="hello world")),
                pb.MuxCall(id=2, generate=gen_request(prompt), coalesce_ms=1000),
                pb.MuxCall(id=3, step=step),
                pb.MuxCall(id=4, generate=pb.GenerateRequest(sampling=pb.Sampling(max_tokens=4))),  # no prompt
                pb.MuxCall(id=5, generate=gen_request(prompt, max_tokens=400)),
            )
            (tok,) = mux.wait(1)
            assert tok.last and list(tok.tokenize.token_ids) == list(stub.Tokenize(pb.TokenizeRequest(text="hello world")).token_ids)
            # A streamed call: its chunks add up to the RPC's; the middle ones waited (coalesce_ms)
            # for each other, so fewer results than the RPC's messages, the first and last apart.
            gen = [r.chunk for r in mux.wait(2) if r.WhichOneof("result")]
            assert [i for c in gen for i in c.token_ids] == [i for c in alone for i in c.token_ids]
            assert "".join(c.text for c in gen) == "".join(c.text for c in alone)
            assert gen[-1].finish_reason == alone[-1].finish_reason and gen[-1].usage.generated_tokens == 40
            assert 2 <= len(gen) < len(alone)
            steps = [r.step for r in mux.wait(3) if r.WhichOneof("result")]
            assert steps[0].decision == step_alone[0].decision and steps[0].entropy == step_alone[0].entropy
            assert "".join(s.chunk.text for s in steps) == "".join(s.chunk.text for s in step_alone)
            (bad,) = mux.wait(4)
            assert bad.last and bad.error.code == "INVALID_ARGUMENT" and "prompt" in bad.error.message
            # A cancelled call stops decoding (and sends nothing more).
            faults.wait_for(lambda: mux.results.get(5), 10, "call 5 to start")
            mux.send(pb.MuxCall(id=5, cancel=True))
            faults.wait_for(lambda: faults.metric(sim, "glimprouter_worker_cancelled_generations_total") >= 1, 10,
                            "the worker to stop call 5")
            assert sum(len(r.chunk.token_ids) for r in mux.results[5]) < 400 and not mux.results[5][-1].last
            mux.send(pb.MuxCall(id=6, tokenize=pb.TokenizeRequest(text="still serving")))
            assert mux.wait(6)[0].tokenize.token_ids
        finally:
            mux.close()


def test_merge_joins_a_calls_consecutive_chunks_and_keeps_the_order():
    def chunk(i, ids, text, final=False):
        c = pb.GenerateChunk(token_ids=ids, text=text)
        if final:
            c.finish_reason = pb.FINISH_REASON_STEP_END
            c.usage.generated_tokens = 9
        return pb.MuxResult(id=i, chunk=c, last=final)

    head = pb.MuxResult(id=2, step=pb.StepChunk(decision=pb.STEP_DECISION_KEEP, entropy=0.1))
    out = merge([chunk(1, [1], "a"), head, chunk(1, [2], "b"), pb.MuxResult(id=2, step=pb.StepChunk(chunk=pb.GenerateChunk(token_ids=[7], text="x"))),
                 chunk(1, [3], "c", final=True), pb.MuxResult(id=2, last=True)])
    assert [(r.id, r.WhichOneof("result")) for r in out] == [(1, "chunk"), (2, "step"), (2, "step")]
    assert list(out[0].chunk.token_ids) == [1, 2, 3] and out[0].chunk.text == "abc" and out[0].last
    assert out[0].chunk.finish_reason == pb.FINISH_REASON_STEP_END and out[0].chunk.usage.generated_tokens == 9
    assert out[1].step.decision == pb.STEP_DECISION_KEEP and out[2].step.chunk.text == "x" and out[2].last


def test_split_bounds_a_message_and_keeps_the_order():
    calls = [pb.MuxCall(id=i, tokenize=pb.TokenizeRequest(text="x" * 1000)) for i in range(7)]
    parts = split(calls, 3000)
    assert [c.id for p in parts for c in p] == list(range(7)) and all(sum(c.ByteSize() for c in p) <= 3000 for p in parts)
    assert split(calls[:1], 10) == [calls[:1]] and split([], 10) == []


def test_a_prompt_delta_on_the_stream_answers_as_the_whole_prompt_and_nowhere_else(sim):
    def delta(keep: int, ids: list[int]) -> pb.Prompt:
        return pb.Prompt(delta=pb.PromptDelta(keep=keep, ids=ids))

    with grpc.insecure_channel(sim.address) as ch:
        stub = worker_pb2_grpc.ModelWorkerStub(ch)
        prompt = list(stub.RenderPrompt(pb.RenderPromptRequest(
            messages=[pb.ChatMessage(role="user", content="hi")], add_generation_prompt=True)).token_ids)
        longer = prompt + [prompt[0], prompt[1]]
        whole = list(stub.GenerateStream(gen_request(longer, max_tokens=8)))
        # Outside Multiplex a delta has nothing to be a delta against.
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(pb.GenerateRequest(prompt=delta(0, prompt), sampling=pb.Sampling(max_tokens=4))))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt.delta" in err.value.details()
        mux = Mux(stub)
        try:
            first = gen_request(prompt, max_tokens=8)
            first.session_id = "s"
            second = pb.GenerateRequest(prompt=delta(len(prompt), longer[len(prompt):]), session_id="s",
                                        sampling=pb.Sampling(max_tokens=8), stop=pb.StopCondition(step_boundary=""))
            stranger = pb.GenerateRequest(prompt=delta(1, [3]), session_id="never-seen", sampling=pb.Sampling(max_tokens=8))
            mux.send(pb.MuxCall(id=1, generate=first), pb.MuxCall(id=2, generate=second), pb.MuxCall(id=3, generate=stranger))
            got = [r.chunk for r in mux.wait(2) if r.WhichOneof("result")]
            assert [i for c in got for i in c.token_ids] == [i for c in whole for i in c.token_ids]
            assert got[-1].usage.prompt_tokens == len(longer)
            (refused,) = mux.wait(3)
            assert refused.error.code == "FAILED_PRECONDITION" and "never-seen" in refused.error.message
        finally:
            mux.close()
