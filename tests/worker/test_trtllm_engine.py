"""TrtLlmEngine. Three layers:
- without tensorrt_llm: the module imports and the constructor names the fix;
- the engine's glue against a fake `tensorrt_llm` that follows the documented LLM API
  (streamed cumulative token_ids, stop_token_ids, end_id, abort, raw logprobs) and the
  upstream rules read in NVIDIA/TensorRT-LLM (max_num_tokens without chunked prefill,
  MAX_TOP_LOGPROBS, no logprobs_mode before PR #9675, seeds ignored by TorchSampler,
  perf metrics);
- `@pytest.mark.trtllm`: the real thing, on a GPU node with GLIMPROUTER_TRTLLM_TEST_MODEL.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import logging
import json
import math
import os
import sys
import types

import numpy as np
import pytest

from prometheus_client import REGISTRY

from services.worker import entropy as ent
from services.worker.backends import trtllm_limits as lim
from services.worker.backends import trtllm_mapping as m
from services.worker.backends.trtllm import TrtLlmEngine
from services.worker.engine import CancelToken, EngineError
from services.worker.types import (ChatMessage, Chunk, Decided, Decision, EntropyMethod, FinishReason, Gate,
                                  GenerateRequest, SamplingParams, StopParams, Usage)

PIECES = ["<|endoftext|>", "Hello", "Ġworld", ".", "ĊĊ", ".ĊĊ", "Ċ", "Wait", "Ġis", "Ġ", "<think>", "</think>"]
ADDED = {0, 10, 11}
V = len(PIECES)
GREEDY, STOP = SamplingParams(max_tokens=64), StopParams()


def request(prompt, sampling=GREEDY, stop=STOP, session="s", **kw) -> GenerateRequest:
    return GenerateRequest(prompt, sampling, stop, session, **kw)


def test_missing_tensorrt_llm_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails even where it is installed
    with pytest.raises(EngineError, match=r"pip install 'glimprouter\[trtllm\]'") as info:
        TrtLlmEngine("/models/none")
    assert isinstance(info.value, ImportError)  # the worker CLI prints ImportErrors in one line


# ---- a fake of the documented API ---------------------------------------------------


class LogprobMode(str, enum.Enum):
    RAW, PROCESSED = "raw", "processed"


@dataclasses.dataclass(kw_only=True)
class FakeSamplingParams:
    end_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list | None = None
    include_stop_str_in_output: bool = False
    logprobs_mode: LogprobMode = LogprobMode.RAW
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    logprobs: int | None = None
    return_generation_logits: bool = False
    ignore_eos: bool = False
    detokenize: bool = True
    return_perf_metrics: bool = False

    def __post_init__(self):
        # check_logprobs_limit in SamplingParams._validate (sampling_params.py, later releases)
        cap = getattr(sys.modules.get(type(self).__module__), "MAX_TOP_LOGPROBS", None)
        if cap is not None and (self.logprobs or 0) > cap:
            raise ValueError(f"logprobs must be less than or equal to {cap}")
        # tests/unittest/_torch/sampler/test_return_top_k_logprobs.py: refused with top-k sampling
        if (self.top_k or 0) > 1 and (self.logprobs or 0) > self.top_k:
            raise ValueError(f"logprobs ({self.logprobs}) cannot exceed top_k ({self.top_k})")


# A 1.2.x SamplingParams without PR #9675's logprobs_mode (logprobs follow the sampling
# parameters) and, older still, without return_perf_metrics.
def _release_without(*names):
    return dataclasses.make_dataclass(
        "SamplingParams",
        [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(FakeSamplingParams)
         if f.name not in names],
        namespace={"__post_init__": FakeSamplingParams.__post_init__}, kw_only=True,
    )


NoModeSamplingParams = _release_without("logprobs_mode")
OldSamplingParams = _release_without("logprobs_mode", "return_perf_metrics")


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclasses.dataclass
class Seq:
    token_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    generation_logits: object = None
    finish_reason: str | None = None
    stop_reason: object = None
    request_perf_metrics: object = None


class FakeResult:
    def __init__(self, llm, prompt, p, cached):
        self.llm, self.prompt, self.p, self.cached_tokens = llm, prompt, p, cached
        self.ctx, self.outputs, self.finished, self.aborted = list(prompt), [Seq()], False, False
        # TorchSampler before PR #17172: one generator for the executor, request seeds ignored.
        self.rng = np.random.default_rng(p.seed) if llm.seeded else llm.rng
        if getattr(p, "return_perf_metrics", False):  # timedeltas on the executor's steady clock
            arrival = datetime.timedelta(seconds=1000 + len(llm.history))
            timing = types.SimpleNamespace(arrival_time=arrival,
                                           first_scheduled_time=arrival + datetime.timedelta(seconds=llm.queue_s))
            self.outputs[0].request_perf_metrics = types.SimpleNamespace(timing_metrics=timing)

    def abort(self):
        self.aborted = True

    def _step(self):
        seq, p = self.outputs[0], self.p
        if self.aborted:
            seq.finish_reason, self.finished = "cancelled", True
            return
        z = self.llm.logits(self.ctx)
        lp = z - np.log(np.exp(z).sum())
        if p.top_k == 1 or p.temperature == 0:
            t = int(np.argmax(z))
        else:
            w = np.exp((z - z.max()) / p.temperature)
            t = int(self.rng.choice(V, p=w / w.sum()))
        if getattr(p, "logprobs_mode", None) != "raw" and p.temperature:
            # "processed": after temperature (releases without logprobs_mode, or PROCESSED)
            lp = z / p.temperature - np.log(np.exp(z / p.temperature).sum())
        order = [int(i) for i in np.argsort(-lp, kind="stable")]
        row = {i: Logprob(float(lp[i]), r + 1) for r, i in enumerate(order[: p.logprobs or 0])}
        row.setdefault(t, Logprob(float(lp[t]), order.index(t) + 1))
        self.ctx.append(t)
        keep = True
        if t == p.end_id and not p.ignore_eos:  # END_ID first, and without the token: the harder case
            seq.finish_reason, keep = "stop", False
        elif t in (p.stop_token_ids or ()):
            seq.finish_reason, seq.stop_reason, keep = "stop", t, p.include_stop_str_in_output
        if keep:
            seq.token_ids.append(t)
            seq.logprobs += [row] if p.logprobs else []
            if p.return_generation_logits:
                seq.generation_logits = z[None, :]
        if seq.finish_reason is None and len(seq.token_ids) >= p.max_tokens:
            seq.finish_reason = "length"
        self.finished = seq.finish_reason is not None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(self.llm.token_delay)
        self._step()
        return self

    async def aresult(self):
        while not self.finished:
            await self.__anext__()
        return self


class FakeLLM:
    def __init__(self, **kwargs):
        self.kwargs, self.chain, self.flat, self.history, self.requests = kwargs, {}, set(), [], []
        self.token_delay, self.queue_s, self.refuse = 0.0, 0.0, None
        self.seeded, self.rng = True, np.random.default_rng(42)

    def logits(self, ctx):
        """A Markov chain on the last token, peaked on `chain[last]`; flat after `flat`."""
        if ctx[-1] in self.flat:
            return np.zeros(V)
        z = np.linspace(0.0, -3.0, V)
        z[self.chain.get(ctx[-1], 1)] += 6.0
        return z

    def generate_async(self, prompt, params, streaming=False):
        assert dataclasses.is_dataclass(params) and all(isinstance(t, int) for t in prompt)
        if self.refuse is not None:
            raise self.refuse
        # BaseLLM._check_arguments, tensorrt_llm/llmapi/llm.py (PyTorch backend)
        max_num_tokens = self.kwargs.get("max_num_tokens", lim.DEFAULT_MAX_NUM_TOKENS)
        if not self.kwargs.get("enable_chunked_prefill") and len(prompt) > max_num_tokens:
            raise ValueError(f"The sum of prompt length ({float(len(prompt))}), query length (0) should not "
                             f"exceed max_num_tokens ({max_num_tokens})")
        lcp = max((next((i for i, (a, b) in enumerate(zip(prompt, h)) if a != b), min(len(prompt), len(h)))
                   for h in self.history), default=0)
        self.history.append(list(prompt))
        self.requests.append(FakeResult(self, list(prompt), params, min(lcp, len(prompt) - 1)))
        return self.requests[-1]

    def shutdown(self):
        pass


class FakeTokenizer:
    eos_token_id, bos_token_id, chat_template = 0, None, None

    def __len__(self):
        return V

    @property
    def backend_tokenizer(self):
        return types.SimpleNamespace(to_str=lambda: json.dumps({"decoder": {"type": "ByteLevel"}}))

    def convert_ids_to_tokens(self, ids):
        return [PIECES[i] for i in ids]

    def get_added_vocab(self):
        return {PIECES[i]: i for i in ADDED}

    def encode(self, text, add_special_tokens=False):
        words = {m.piece_to_bytes(p, m.BYTE_LEVEL).decode(): i for i, p in enumerate(PIECES) if i not in ADDED}
        ids, rest = [], text
        while rest:
            best = max((w for w in words if rest.startswith(w)), key=len, default=None)
            ids, rest = (ids + [words[best]], rest[len(best):]) if best else (ids, rest[1:])
        return ids


@pytest.fixture
def make_engine(monkeypatch):
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)

    async def make(chain=None, sp=FakeSamplingParams, cap=20, **kw):
        """`sp`: the release's SamplingParams; `cap`: its module's MAX_TOP_LOGPROBS (None: absent)."""
        trt = types.ModuleType("tensorrt_llm")
        trt.LLM, trt.SamplingParams = FakeLLM, sp
        sp_module = types.ModuleType("tensorrt_llm.sampling_params")  # where the real class lives
        sp_module.SamplingParams = sp
        if cap is not None:
            sp_module.MAX_TOP_LOGPROBS = cap
        monkeypatch.setattr(sp, "__module__", sp_module.__name__)
        monkeypatch.setitem(sys.modules, "tensorrt_llm", trt)
        monkeypatch.setitem(sys.modules, sp_module.__name__, sp_module)
        engine = TrtLlmEngine("/models/fake", tokenizer=FakeTokenizer(), **kw)
        await engine.start()
        engine._llm.chain, engine._llm.requests = dict(chain or {}), []
        return engine, engine._llm

    return make


def steps_counted(model: str, path: lim.StepPath) -> float:
    labels = {"model": model, "path": path.value}
    return REGISTRY.get_sample_value("glimprouter_worker_trtllm_steps_total", labels) or 0.0


def raw_logprobs(llm, ctx):
    z = llm.logits(ctx)
    return z - np.log(np.exp(z).sum())


def topk_entropy(lp, k):
    top = np.sort(lp)[::-1][:k]
    p = np.exp(top) / np.exp(top).sum()
    return float(-(p * np.log(p)).sum())


async def test_model_info_and_llm_arguments(make_engine):
    engine, llm = await make_engine(exact_entropy=True, kv_free_fraction=0.5)
    assert (engine.info.backend, engine.info.vocab_size, engine.info.eos_token_ids) == ("trtllm", V, (0,))
    assert (engine.info.think_start, engine.info.think_end) == ("<think>", "</think>")
    assert engine.info.tokenizer_fingerprint == m.tokenizer_fingerprint(engine._pieces, (0,), -1)
    kv = llm.kwargs["kv_cache_config"]
    assert kv.enable_block_reuse is True and kv.free_gpu_memory_fraction == 0.5
    assert llm.kwargs["gather_generation_logits"] is True
    assert "gather_generation_logits" not in (await make_engine())[1].kwargs


async def test_glimpse_reads_raw_top_k(make_engine):
    engine, llm = await make_engine({1: 2})
    g = await engine.glimpse([1], 5, "s", CancelToken())
    p = llm.requests[0].p
    assert (p.max_tokens, p.logprobs, p.logprobs_mode, p.temperature) == (1, 5, "raw", 1.0)
    assert g.token_id == 2 and g.token_text == " world" and g.entropy_full == -1.0
    assert g.entropy_top_k == pytest.approx(topk_entropy(raw_logprobs(llm, [1]), 5), abs=1e-9)
    assert g.usage.generated_tokens == 0 and g.usage.prompt_tokens == 1


async def test_exact_glimpse_uses_generation_logits(make_engine):
    engine, llm = await make_engine({1: 2}, exact_entropy=True)
    g = await engine.glimpse([1], 5, "s", CancelToken())
    lp = raw_logprobs(llm, [1])
    assert llm.requests[0].p.return_generation_logits and not llm.requests[0].p.logprobs
    assert g.entropy_full == pytest.approx(float(-(np.exp(lp) * lp).sum()), rel=1e-6)
    assert g.entropy_top_k == pytest.approx(topk_entropy(lp, 5), rel=1e-6)


async def test_merged_boundary_token_ends_the_step(make_engine):
    engine, llm = await make_engine({1: 2, 2: 5, 5: 7})
    gen = await engine.generate_full(request([1]), CancelToken())
    assert (gen.token_ids, gen.text, gen.finish_reason) == ([2, 5], " world.\n\n", FinishReason.STEP_END)
    p = llm.requests[0].p
    assert {0, 4, 5} <= set(p.stop_token_ids) and p.include_stop_str_in_output and len(llm.requests) == 1


async def test_blank_boundary_continues_with_a_new_request(make_engine):
    engine, llm = await make_engine({9: 4, 4: 1, 1: 2, 2: 5})
    gen = await engine.generate_full(request([9]), CancelToken())
    assert (gen.token_ids, gen.finish_reason) == ([4, 1, 2, 5], FinishReason.STEP_END)
    assert [r.prompt for r in llm.requests] == [[9], [9, 4]]
    assert llm.requests[1].p.max_tokens == GREEDY.max_tokens - 1


async def test_boundary_across_tokens_cuts_and_aborts(make_engine):
    engine, llm = await make_engine({1: 3, 3: 6, 6: 6})
    gen = await engine.generate_full(request([1]), CancelToken())
    assert (gen.token_ids, gen.text, gen.finish_reason) == ([3, 6, 6], ".\n\n", FinishReason.STEP_END)
    assert llm.requests[0].aborted


async def test_streaming_equals_unary(make_engine):
    engine, _ = await make_engine({1: 2, 2: 8, 8: 7, 7: 3, 3: 6, 6: 6})
    chunks = [c async for c in engine.generate(request([1]), CancelToken())]
    final = chunks[-1].final
    assert sum((c.token_ids for c in chunks), []) == final.token_ids == [2, 8, 7, 3, 6, 6]
    assert "".join(c.text for c in chunks) == final.text == engine.token_text(final.token_ids)
    assert (await engine.generate_full(request([1]), CancelToken())).token_ids == final.token_ids


async def test_eos_is_returned_even_when_trt_drops_it(make_engine):
    engine, _ = await make_engine({1: 2, 2: 0})
    gen = await engine.generate_full(request([1]), CancelToken())
    assert (gen.token_ids, gen.finish_reason, gen.text) == ([2, 0], FinishReason.EOS, " world")
    no_eos = request([1], SamplingParams(max_tokens=4), StopParams(stop_on_eos=False))
    gen = await engine.generate_full(no_eos, CancelToken())
    assert (gen.token_ids, gen.finish_reason) == ([2, 0, 1, 2], FinishReason.LENGTH)


async def test_max_tokens_stop_strings_and_entropies(make_engine):
    engine, llm = await make_engine({1: 2, 2: 8, 8: 2})
    with_entropies = request([1], SamplingParams(max_tokens=3), return_entropies=True, top_k=4)
    gen = await engine.generate_full(with_entropies, CancelToken())
    assert (gen.token_ids, gen.finish_reason) == ([2, 8, 2], FinishReason.LENGTH)
    want = [topk_entropy(raw_logprobs(llm, [1, 2, 8, 2][: i + 1]), 4) for i in range(3)]
    assert gen.entropies == pytest.approx(want)
    gen = await engine.generate_full(request([1], GREEDY, StopParams(stop=("is",))), CancelToken())
    assert (gen.token_ids, gen.finish_reason, gen.matched_stop) == ([2, 8], FinishReason.STOP, "is")


async def test_cached_tokens_are_reported(make_engine):
    engine, _ = await make_engine({1: 2, 2: 5})
    await engine.generate_full(request([1, 2, 8, 7]), CancelToken())
    gen = await engine.generate_full(request([1, 2, 8, 7]), CancelToken())
    assert (gen.usage.cached_tokens, gen.usage.prefilled_tokens, gen.usage.prompt_tokens) == (3, 1, 4)


async def test_step_escalates_on_a_flat_distribution(make_engine):
    engine, llm = await make_engine({1: 2})
    llm.flat = {1}
    r = await engine.step_full(request([1], top_k=20), Gate(EntropyMethod.TOP_K, 1.0), CancelToken())
    assert r.decision is Decision.ESCALATE and r.generation is None
    assert r.entropy == pytest.approx(math.log(V)) and len(llm.requests) == 1


async def test_step_keeps_the_sampled_first_token(make_engine):
    engine, llm = await make_engine({1: 2, 2: 5})
    sampling = SamplingParams(temperature=0.7, top_p=0.95, seed=1, max_tokens=16)
    r = await engine.step_full(request([1], sampling, top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    first = llm.requests[0]
    assert (first.p.temperature, first.p.logprobs_mode, first.p.seed) == (0.7, "raw", 1)
    assert r.entropy == pytest.approx(topk_entropy(raw_logprobs(llm, [1]), 5))  # not the T=0.7 one
    t = first.outputs[0].token_ids[0]
    assert r.decision is Decision.KEEP and r.generation.token_ids[0] == t
    assert llm.requests[1].prompt == [1, t] and llm.requests[1].p.seed == 2
    assert r.generation.usage.prompt_tokens == 1


async def test_greedy_step_continues_from_the_argmax(make_engine):
    engine, llm = await make_engine({1: 2, 2: 5})
    r = await engine.step_full(request([1], top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    assert r.generation.token_ids == [2, 5] and llm.requests[1].prompt == [1, 2]
    with pytest.raises(EngineError, match="exact-entropy"):
        await engine.step_full(request([1], top_k=5), Gate(EntropyMethod.FULL, 5.0), CancelToken())


async def test_cancel_and_closing_the_stream_abort_the_request(make_engine):
    engine, llm = await make_engine({1: 2, 2: 8, 8: 2})
    llm.token_delay = 0.002
    cancel = CancelToken()
    chunks = []
    async for c in engine.generate(request([1], SamplingParams(max_tokens=5000)), cancel):
        chunks.append(c)
        if len(chunks) == 3:
            cancel.cancel()
    assert chunks[-1].final.finish_reason is FinishReason.CANCELLED and llm.requests[0].aborted
    stream = engine.generate(request([1], SamplingParams(max_tokens=5000)), CancelToken())
    await stream.__anext__()
    await stream.aclose()
    assert llm.requests[1].aborted


# ---- the streamed Step ----------------------------------------------------------------


async def test_step_streams_the_decision_first_then_the_chunks(make_engine):
    engine, llm = await make_engine({1: 2, 2: 8, 8: 7, 7: 3, 3: 6, 6: 6})
    stream = engine.step(request([1], top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    head = await stream.__anext__()
    assert isinstance(head, Decided) and head.decision is Decision.KEEP
    assert head.entropy == pytest.approx(topk_entropy(raw_logprobs(llm, [1]), 5)) and head.glimpse.token_id == 2
    assert len(llm.requests) == 1  # decided on the one-token request, before the step is written
    chunks = [c async for c in stream]
    assert all(isinstance(c, Chunk) for c in chunks) and [c.final is not None for c in chunks].count(True) == 1
    final = chunks[-1].final
    assert chunks[0].token_ids == [head.glimpse.token_id]  # the step starts with the glimpsed token
    assert sum((c.token_ids for c in chunks), []) == final.token_ids == [2, 8, 7, 3, 6, 6]
    assert "".join(c.text for c in chunks) == final.text == engine.token_text(final.token_ids)
    assert final.finish_reason is FinishReason.STEP_END and final.usage == Usage(1, 0, 1, 6)
    unary = await engine.step_full(request([1], top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    assert (unary.decision, unary.generation.token_ids, unary.generation.text) == (
        Decision.KEEP, final.token_ids, final.text)


async def test_sampled_step_streams_from_the_token_its_first_request_drew(make_engine):
    engine, llm = await make_engine({1: 2, 2: 5})
    sampling = SamplingParams(temperature=0.7, seed=3, max_tokens=16)
    stream = engine.step(request([1], sampling, top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    items = [x async for x in stream]
    drawn, final = llm.requests[0].outputs[0].token_ids[0], items[-1].final
    assert isinstance(items[0], Decided) and items[1].token_ids == [drawn]
    assert sum((c.token_ids for c in items[1:]), []) == final.token_ids and final.token_ids[0] == drawn


async def test_escalated_step_streams_only_the_decision(make_engine):
    engine, llm = await make_engine({1: 2})
    llm.flat = {1}
    items = [x async for x in engine.step(request([1], top_k=20), Gate(EntropyMethod.TOP_K, 1.0), CancelToken())]
    assert len(items) == 1 and isinstance(items[0], Decided) and items[0].decision is Decision.ESCALATE
    assert items[0].entropy == pytest.approx(math.log(V)) and len(llm.requests) == 1  # nothing written
    with pytest.raises(EngineError, match="exact-entropy"):  # refused before any request
        await engine.step(request([1]), Gate(EntropyMethod.FULL, 1.0), CancelToken()).__anext__()
    assert len(llm.requests) == 1


async def test_cancelling_mid_step_stops_it(make_engine):
    engine, llm = await make_engine({1: 2, 2: 8, 8: 2})  # never reaches a boundary
    llm.token_delay = 0.002
    cancel = CancelToken()
    items = []
    async for x in engine.step(request([1], SamplingParams(max_tokens=5000)), Gate(), cancel):
        items.append(x)
        if len(items) == 4:  # the decision and three chunks
            cancel.cancel()
    final = items[-1].final
    assert isinstance(items[0], Decided) and final.finish_reason is FinishReason.CANCELLED
    assert len(final.token_ids) < 100 and llm.requests[1].aborted
    assert sum((c.token_ids for c in items[1:]), []) == final.token_ids


async def test_closing_a_step_stream_aborts_its_request(make_engine):
    engine, llm = await make_engine({1: 2, 2: 8, 8: 2})
    llm.token_delay = 0.002
    stream = engine.step(request([1], SamplingParams(max_tokens=5000)), Gate(), CancelToken())
    assert isinstance(await stream.__anext__(), Decided)
    await stream.__anext__()  # the first token's chunk
    await stream.__anext__()  # the continuation is streaming
    await stream.aclose()
    assert len(llm.requests) == 2 and llm.requests[1].aborted
    stream = engine.step(request([1], SamplingParams(max_tokens=5000)), Gate(), CancelToken())
    await stream.__anext__()
    await stream.aclose()  # gone after the decision: the step is never written
    assert len(llm.requests) == 3


async def test_describe_says_what_the_engine_runs_with(make_engine):
    engine, llm = await make_engine(exact_entropy=True, max_seq_len=4096, max_batch_size=128)
    assert engine.describe() == lim.describe(llm.kwargs, 4096, True)
    assert "context=4096 chunked_prefill=on" in engine.describe() and "max_batch_size=128" in engine.describe()
    assert "exact_entropy=on" in engine.describe()


async def test_render_prompt_without_template(make_engine):
    engine, _ = await make_engine()
    ids, text = engine.render_prompt([ChatMessage("user", "Hello world."), ChatMessage("assistant", "Wait")],
                                     False, True)
    assert text == "Hello world.Wait" and ids == [1, 2, 3, 7] and engine.tokenize("Hello is") == [1, 8]


# ---- what a read of the upstream source found (docs/trtllm.md) ------------------------


async def test_long_prompts_get_in_with_chunked_prefill(make_engine):
    engine, llm = await make_engine({1: 2, 2: 5}, max_seq_len=32768)
    assert llm.kwargs["enable_chunked_prefill"] is True and engine.info.context_length == 32768
    prompt = [1] * 9000  # past TRT's default max_num_tokens of 8192
    gen = await engine.generate_full(request(prompt), CancelToken())
    assert gen.finish_reason is FinishReason.STEP_END


async def test_without_chunked_prefill_the_advertised_context_is_what_trt_accepts(make_engine):
    engine, llm = await make_engine({1: 2, 2: 8, 8: 2}, max_seq_len=32768, chunked_prefill=False, max_num_tokens=64)
    assert llm.kwargs["enable_chunked_prefill"] is False and llm.kwargs["max_num_tokens"] == 64
    assert engine.info.context_length == 65
    longest = [1] * (engine.info.context_length - 1)  # the longest prompt validation lets through
    gen = await engine.generate_full(request(longest, SamplingParams(max_tokens=8)), CancelToken())
    assert (len(gen.token_ids), gen.finish_reason) == (1, FinishReason.CONTEXT)
    # A prompt past it is refused by TRT with ValueError: reported as an engine error.
    with pytest.raises(EngineError, match=r"max_num_tokens \(64\).*--trtllm-chunked-prefill"):
        await engine.glimpse([1] * 65, 5, "s", CancelToken())


async def test_refused_requests_are_engine_errors_and_others_are_not(make_engine):
    class RequestError(RuntimeError):
        pass

    RequestError.__module__ = "tensorrt_llm.executor.utils"
    engine, llm = await make_engine({1: 2})
    for refusal in (ValueError("best_of (2) cannot exceed max_batch_size (1)"), RequestError("too long")):
        llm.refuse = refusal
        with pytest.raises(EngineError, match="TensorRT-LLM refused a request of 1 prompt tokens"):
            await engine.glimpse([1], 5, "s", CancelToken())
        with pytest.raises(EngineError, match="refused"):
            await engine.generate_full(request([1]), CancelToken())
        with pytest.raises(EngineError, match="refused"):
            await engine.step_full(request([1], top_k=5), Gate(EntropyMethod.TOP_K, 9.0), CancelToken())
    llm.refuse = RuntimeError("CUDA error: an illegal memory access")  # a fault, not the request's: INTERNAL
    with pytest.raises(RuntimeError, match="CUDA"):
        await engine.glimpse([1], 5, "s", CancelToken())


async def test_sampled_step_path_is_detected_logged_and_counted(make_engine, caplog):
    sampling = SamplingParams(temperature=0.7, seed=1, max_tokens=16)
    caplog.set_level(logging.INFO, logger="services.worker.backends.trtllm")
    engine, llm = await make_engine({1: 2, 2: 5}, sp=NoModeSamplingParams, model_id="no-mode")
    assert engine._raw_mode is None
    assert any("two requests" in r.getMessage() and "#9675" in r.getMessage() for r in caplog.records)
    before = steps_counted("no-mode", lim.StepPath.NO_LOGPROBS_MODE)
    r = await engine.step_full(request([1], sampling, top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    glimpse = llm.requests[0].p
    assert (glimpse.temperature, glimpse.logprobs) == (1.0, 5) and not hasattr(glimpse, "logprobs_mode")
    # the raw entropy, although this release reports logprobs after temperature
    assert r.entropy == pytest.approx(topk_entropy(raw_logprobs(llm, [1]), 5))
    assert llm.requests[1].prompt == [1] and llm.requests[1].p.temperature == 0.7  # regenerated from the boundary
    assert steps_counted("no-mode", lim.StepPath.NO_LOGPROBS_MODE) == before + 1

    engine, llm = await make_engine({1: 2, 2: 5}, model_id="raw-mode")
    counted = {p: steps_counted("raw-mode", p) for p in lim.StepPath}
    await engine.step_full(request([1], sampling, top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    await engine.step_full(request([1], top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    llm.requests = []
    cut = SamplingParams(temperature=0.7, top_k=3, max_tokens=16)  # logprobs 5 > top_k 3: TRT refuses
    r = await engine.step_full(request([1], cut, top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    assert llm.requests[0].p.top_k == 0 and r.generation.token_ids[0] == llm.requests[1].outputs[0].token_ids[0]
    for path, n in ((lim.StepPath.RAW_LOGPROBS, 1), (lim.StepPath.GREEDY, 1), (lim.StepPath.REFUSED, 1),
                    (lim.StepPath.NO_LOGPROBS_MODE, 0)):
        assert steps_counted("raw-mode", path) == counted[path] + n, path


async def test_top_k_past_the_logprobs_cap_is_refused_naming_it(make_engine):
    engine, llm = await make_engine({1: 2, 2: 5}, cap=4)  # 20, or 100 since PR #16851; 4 to fit V
    with pytest.raises(EngineError, match=r"top_k 5 .*at most 4.*--trtllm-exact-entropy"):
        await engine.glimpse([1], 5, "s", CancelToken())
    with pytest.raises(EngineError, match="at most 4"):
        await engine.step_full(request([1], SamplingParams(temperature=0.7), top_k=5), Gate(EntropyMethod.TOP_K, 5.0),
                               CancelToken())
    with pytest.raises(EngineError, match="at most 4") as info:
        await engine.generate_full(request([1], return_entropies=True, top_k=5), CancelToken())
    assert "exact-entropy" not in str(info.value)  # generation entropies come from logprobs either way
    assert llm.requests == []  # refused before TRT saw them
    assert (await engine.glimpse([1], 4, "s", CancelToken())).top[0].token_id == 2
    engine, _ = await make_engine({1: 2}, cap=4, exact_entropy=True)  # entropy from the logits: no cap
    assert len((await engine.glimpse([1], V, "s", CancelToken())).top) == V
    engine, _ = await make_engine({1: 2}, cap=None)  # a release without MAX_TOP_LOGPROBS
    assert len((await engine.glimpse([1], V, "s", CancelToken())).top) == V


async def test_queue_time_is_read_from_perf_metrics(make_engine):
    engine, llm = await make_engine({1: 2, 2: 5})
    llm.queue_s, llm.token_delay = 0.004, 0.005  # TRT's clock says 4 ms queued; 5 ms pass per token
    g = await engine.glimpse([1], 5, "s", CancelToken())
    assert llm.requests[0].p.return_perf_metrics is True
    assert g.timings.queue_ms == pytest.approx(4.0) and g.timings.total_ms >= g.timings.queue_ms
    gen = await engine.generate_full(request([1]), CancelToken())
    assert gen.timings.queue_ms == pytest.approx(4.0)
    r = await engine.step_full(request([1], top_k=5), Gate(EntropyMethod.TOP_K, 5.0), CancelToken())
    assert r.generation.timings.queue_ms == pytest.approx(8.0)  # the glimpse's and the continuation's
    engine, llm = await make_engine({1: 2}, sp=OldSamplingParams)  # no return_perf_metrics: not sent
    assert (await engine.glimpse([1], 5, "s", CancelToken())).timings.queue_ms == 0.0


async def test_steps_do_not_rely_on_seeds(make_engine):
    """TorchSampler before PR #17172 ignores the request's seed: the step's first token
    is the one its first request sampled, never re-derived from the seed."""
    engine, llm = await make_engine({1: 2, 2: 5})
    llm.seeded = False
    llm.flat = {1}
    sampling = SamplingParams(temperature=1.0, seed=7, max_tokens=3)
    firsts = []
    for _ in range(6):
        llm.requests = []
        r = await engine.step_full(request([1], sampling, top_k=5), Gate(EntropyMethod.TOP_K, 99.0), CancelToken())
        first = llm.requests[0].outputs[0].token_ids[0]
        assert r.generation.token_ids[0] == first
        assert all(req.prompt[:2] == [1, first] for req in llm.requests[1:])  # written on from it
        firsts.append(first)
    assert len(set(firsts)) > 1  # same seed, different draws: nothing above depended on it


async def test_exact_entropy_cost_is_logged_and_batch_size_passed(make_engine, caplog):
    caplog.set_level(logging.INFO, logger="services.worker.backends.trtllm")
    _, llm = await make_engine(exact_entropy=True, max_batch_size=128)
    assert llm.kwargs["max_batch_size"] == 128 and llm.kwargs["gather_generation_logits"] is True
    expected = f"{lim.logits_buffer_bytes(128, V) / 2**20:.0f} MiB"
    assert any(expected in r.getMessage() and "--trtllm-max-batch-size" in r.getMessage() for r in caplog.records)


def test_worker_flags_reach_the_engine(monkeypatch):
    from services.worker import backends
    from services.worker.backends import trtllm
    from services.worker.config import WorkerSettings

    seen = {}
    monkeypatch.setattr(trtllm, "TrtLlmEngine", lambda model, **kw: seen.update(kw, model=model) or "engine")
    s = WorkerSettings(backend="trtllm", model="/models/x", trtllm_max_batch_size=64, trtllm_max_num_tokens=16384,
                       trtllm_chunked_prefill=False)
    assert backends.create_engine(s) == "engine"
    assert (seen["max_batch_size"], seen["max_num_tokens"], seen["chunked_prefill"]) == (64, 16384, False)
    seen.clear()
    backends.create_engine(WorkerSettings(backend="trtllm", model="/models/x"))
    assert (seen["max_batch_size"], seen["max_num_tokens"], seen["chunked_prefill"]) == (None, None, True)


# ---- on a GPU node ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_engine():
    pytest.importorskip("tensorrt_llm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible")
    path = os.environ.get("GLIMPROUTER_TRTLLM_TEST_MODEL") or pytest.skip("set GLIMPROUTER_TRTLLM_TEST_MODEL")
    engine = TrtLlmEngine(path, exact_entropy=True, kv_free_fraction=0.4)
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.close())


def gpu_prompt(engine):
    msgs = [ChatMessage("user", "List three facts about the Moon, separated by blank lines.")]
    return engine.render_prompt(msgs, True, False)[0]


@pytest.mark.trtllm
async def test_gpu_glimpse_entropy_matches_exact_logits(gpu_engine):
    e, prompt = gpu_engine, gpu_prompt(gpu_engine)
    g = await e.glimpse(prompt, 20, "t", CancelToken())  # from the generation logits
    assert 0.0 <= g.entropy_top_k <= math.log(20) + 1e-6 and g.entropy_full >= 0.0
    for temperature in (1.0, 0.6):  # raw logprobs must not depend on the temperature
        if temperature != 1.0 and e._raw_mode is None:
            continue
        kw = m.sampling_kwargs(SamplingParams(temperature=temperature), max_tokens=1, logprobs=20,
                               raw_mode=e._raw_mode, ignore_eos=True)
        out = await e._one_token(prompt, e._params(kw), CancelToken())
        pairs = m.top_logprobs(out.outputs[0].logprobs[-1], 20)
        assert pairs[0][0] == g.token_id
        assert ent.top_k_entropy([lp for _, lp in pairs]) == pytest.approx(g.entropy_top_k, abs=2e-2)


@pytest.mark.trtllm
async def test_gpu_step_keep_and_escalate(gpu_engine):
    e, prompt = gpu_engine, gpu_prompt(gpu_engine)
    r = await e.step_full(request(prompt, session="t", top_k=20), Gate(EntropyMethod.FULL, 0.0), CancelToken())
    assert r.decision is Decision.ESCALATE and r.generation is None
    r = await e.step_full(request(prompt, session="t", top_k=20), Gate(EntropyMethod.TOP_K, 1e9), CancelToken())
    gen = r.generation
    assert r.decision is Decision.KEEP and gen.token_ids[0] == r.glimpse.token_id
    assert gen.text == e.token_text(gen.token_ids)
    sampled = SamplingParams(temperature=0.6, top_p=0.95, seed=7, max_tokens=32)
    r = await e.step_full(request(prompt, sampled, session="t", top_k=20), Gate(EntropyMethod.TOP_K, 1e9),
                          CancelToken())
    assert r.entropy == pytest.approx(r.glimpse.entropy_top_k)  # from the raw logits, not T=0.6
    g = await e.glimpse(prompt, 20, "t", CancelToken())
    assert r.entropy == pytest.approx(g.entropy_top_k, abs=2e-2)
    assert r.generation.token_ids[0] in {t.token_id for t in g.top}  # drawn from the glimpsed distribution
    if gen.finish_reason is FinishReason.STEP_END:  # cut at the token that completed "\n\n"
        assert "\n\n" in gen.text and "\n\n" not in e.token_text(gen.token_ids[:-1]).lstrip()
    items = [x async for x in e.step(request(prompt, session="t", top_k=20), Gate(EntropyMethod.TOP_K, 1e9),
                                     CancelToken())]
    assert isinstance(items[0], Decided) and items[1].token_ids[:1] == [items[0].glimpse.token_id]
    assert sum((c.token_ids for c in items[1:]), []) == items[-1].final.token_ids


@pytest.mark.trtllm
async def test_gpu_streaming_equals_unary(gpu_engine):
    e, prompt = gpu_engine, gpu_prompt(gpu_engine)
    whole = request(prompt, GREEDY, StopParams(step_boundary=""), session="t")
    chunks = [c async for c in e.generate(whole, CancelToken())]
    final = chunks[-1].final
    assert sum((c.token_ids for c in chunks), []) == final.token_ids
    assert "".join(c.text for c in chunks) == final.text
    unary = await e.generate_full(whole, CancelToken())
    assert unary.token_ids == final.token_ids and unary.usage.cached_tokens >= 0


async def test_extend_prefills_the_prefix_so_the_next_call_finds_it_cached(make_engine):
    engine, llm = await make_engine({1: 2, 2: 5})
    before = len(llm.history)
    ext = await engine.extend([1, 2, 8, 7], "s", CancelToken())
    assert len(llm.history) == before + 1 and llm.requests[-1].p.max_tokens == 1  # one throwaway token
    assert ext.usage.prompt_tokens == 4 and ext.usage.generated_tokens == 0
    gen = await engine.generate_full(request([1, 2, 8, 7, 3]), CancelToken())
    assert gen.usage.cached_tokens == 4  # the block cache kept what Extend prefilled
