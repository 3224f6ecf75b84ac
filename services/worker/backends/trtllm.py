"""The production GPU backend: an Engine over TensorRT-LLM's LLM API (written against
the documented API of 1.2.x, with fallbacks for 1.0; docs/trtllm.md says what has run).
Decisions that are not engine calls live in `trtllm_mapping` and `trtllm_limits`,
tested without a GPU.

TRT batches concurrent requests itself (in-flight batching), so this engine does not go
through the scheduler that batches for llama.cpp and sim (scheduler.py): every call is a
TRT request of its own, and queue time is read from each request's perf metrics.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from prometheus_client import Counter

from services.worker.backends import trtllm_limits as lim
from services.worker.backends import trtllm_mapping as m
from services.worker.engine import CancelToken, Engine, EngineError
from services.worker.stepcut import StepCutter
from services.worker.types import (ChatMessage, Chunk, Decided, Decision, Extension, FinishReason, Gate, GenerateRequest,
                                  Generation, Glimpse, ModelInfo, SamplingParams, StopParams, Timings)

log = logging.getLogger(__name__)

INSTALL_HINT = "install the trtllm extra on a GPU node: pip install 'glimprouter[trtllm]'"
_POLL_S = 0.02  # how often a request checks its CancelToken

STEPS = Counter(
    "glimprouter_worker_trtllm_steps_total",
    "Steps on the TensorRT-LLM backend by how the first token was obtained (trtllm_limits.StepPath)",
    ["model", "path"],
)


class TrtLlmUnavailable(EngineError, ImportError):
    """tensorrt_llm does not import here; an ImportError so the worker's CLI reports it
    in one line like any other missing backend."""


def _import_trtllm() -> tuple[Any, Any, Any]:
    try:
        import tensorrt_llm
        from tensorrt_llm.llmapi import KvCacheConfig
    except ImportError as exc:
        raise TrtLlmUnavailable(f"the TensorRT-LLM backend needs tensorrt_llm ({exc}); {INSTALL_HINT}") from exc
    return tensorrt_llm.LLM, tensorrt_llm.SamplingParams, KvCacheConfig


def _fields(sampling_params_cls: Any) -> dict[str, Any]:
    """SamplingParams' fields and their defaults (a dataclass on 1.x), read once so the
    release's capabilities are detected without private module paths."""
    try:
        return {f.name: f.default for f in dataclasses.fields(sampling_params_cls)}
    except TypeError:
        return {n: p.default for n, p in inspect.signature(sampling_params_cls).parameters.items()}


def _module_constant(cls: Any, name: str) -> Any:
    """A constant of the module that defines `cls` (tensorrt_llm.sampling_params for
    SamplingParams), or None."""
    return getattr(sys.modules.get(getattr(cls, "__module__", "")), name, None)


def _to_numpy(t: Any) -> Any:
    return t.detach().float().cpu().numpy() if hasattr(t, "detach") else t


class TrtLlmEngine(Engine):
    def __init__(
        self,
        model: str,
        *,
        tokenizer: Any = None,
        model_id: str | None = None,
        exact_entropy: bool = False,
        kv_free_fraction: float = 0.85,
        max_seq_len: int | None = None,
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        chunked_prefill: bool = True,
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """`model`: a local HF model directory (or TRT checkpoint with its tokenizer).
        `tokenizer`: a directory, or an already loaded HF tokenizer. `exact_entropy`
        builds the LLM with gather_generation_logits so a glimpse can compute the
        full-vocabulary entropy (one vocab-sized copy to the host per glimpse; buffers
        that grow with `max_batch_size`, see trtllm_limits.logits_buffer_bytes).
        `chunked_prefill` lets prompts longer than `max_num_tokens` in. `llm_kwargs`
        go to tensorrt_llm.LLM last, overriding the rest. The model is loaded by start()."""
        self._LLM, self._SP, self._KvCacheConfig = _import_trtllm()
        sp_fields = _fields(self._SP)
        # Detected once: which path sampled Steps take, and how many logprobs TRT returns.
        self._raw_mode = lim.raw_logprobs_mode(sp_fields)
        self._logprobs_cap = lim.logprobs_cap(_module_constant(self._SP, "MAX_TOP_LOGPROBS"))
        self._perf_metrics = "return_perf_metrics" in sp_fields
        self._exact = exact_entropy
        self._llm_args = lim.llm_kwargs(
            model,
            # Block reuse is what makes Step's continuation and a router's growing
            # prompts cheap: the shared prefix is not prefilled again.
            kv_cache_config=self._KvCacheConfig(enable_block_reuse=True, free_gpu_memory_fraction=kv_free_fraction),
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            exact_entropy=exact_entropy,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens,
            chunked_prefill=chunked_prefill,
            extra=llm_kwargs,
        )
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer  # a dependency of tensorrt_llm

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or model), trust_remote_code=trust_remote_code)
        self._llm_args.setdefault("tokenizer", tokenizer)
        self._tok = tokenizer
        config = m.read_json(Path(model) / "config.json")
        gen_config = m.read_json(Path(model) / "generation_config.json")
        vocab_size = int(config.get("vocab_size") or len(tokenizer))
        self._pieces = m.hf_vocab_bytes(tokenizer, vocab_size)
        self._texts: dict[int, str] = {}
        self._stop_ids = m.StopIds(self._pieces)
        eos = m.eos_token_ids(tokenizer.eos_token_id, gen_config)
        self._eos, self._end_id = frozenset(eos), (eos[0] if eos else None)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else -1
        think = m.think_delimiters(tokenizer.get_added_vocab())
        self.info = ModelInfo(
            model_id=model_id or Path(model).name,
            backend="trtllm",
            vocab_size=vocab_size,
            # The length TRT accepts with these arguments, not only the model's own.
            context_length=lim.context_length(self._llm_args, config),
            eos_token_ids=eos,
            bos_token_id=bos,
            has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
            tokenizer_fingerprint=m.tokenizer_fingerprint(self._pieces, eos, bos),
            think_start=think[0],
            think_end=think[1],
        )
        self._llm: Any = None
        self._log_capabilities()

    def _log_capabilities(self) -> None:
        args = self._llm_args
        log.info("TensorRT-LLM worker %s: context length %d (chunked prefill %s, max_num_tokens %s)",
                 self.info.model_id, self.info.context_length, "on" if args.get("enable_chunked_prefill") else "off",
                 args.get("max_num_tokens") or f"default {lim.DEFAULT_MAX_NUM_TOKENS}")
        log.info("TensorRT-LLM worker %s: %s", self.info.model_id,
                 lim.describe_sampled_steps(self._exact, self._raw_mode))
        log.info("TensorRT-LLM worker %s: top-k logprobs capped at %s; %s", self.info.model_id,
                 self._logprobs_cap or "no known limit", lim.SEED_NOTE)
        if self._exact:
            mib = lim.logits_buffer_bytes(args.get("max_batch_size"), self.info.vocab_size) / 2**20
            log.info("TensorRT-LLM worker %s: exact entropy keeps generation logits; about %.0f MiB of buffers "
                     "(max_batch_size x vocab x 4 bytes, an estimate; lower --trtllm-max-batch-size to shrink)",
                     self.info.model_id, mib)

    def describe(self) -> str:
        return lim.describe(self._llm_args, self.info.context_length, self._exact)

    # ---- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        if self._llm is None:
            try:  # loading takes minutes: keep the loop free for health checks
                self._llm = await asyncio.to_thread(self._LLM, **self._llm_args)
            except ValueError as exc:  # a release that installs signal handlers while loading
                if "main thread" not in str(exc):
                    raise
                self._llm = self._LLM(**self._llm_args)
        await self.glimpse(self.tokenize("Hello", add_bos=True), 1, "__warmup__", CancelToken())

    async def close(self) -> None:
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
            self._llm = None

    # ---- text helpers ------------------------------------------------------------
    def _token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""

    def _text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._token_bytes(token_id).decode("utf-8", errors="replace")
        return text

    def token_text(self, token_ids: Sequence[int]) -> str:
        return b"".join(self._token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False))
        bos = self.info.bos_token_id
        return [bos] + ids if add_bos and bos >= 0 and ids[:1] != [bos] else ids

    def render_prompt(
        self, messages: Sequence[ChatMessage], add_generation_prompt: bool, continue_final_message: bool
    ) -> tuple[list[int], str]:
        template = self._apply_template if self.info.has_chat_template else None
        text = m.render_chat(template, messages, add_generation_prompt, continue_final_message)
        # A rendered template carries its own BOS; plain joined text gets one, as the
        # scheduler's backends give it (services/worker/prompts.py).
        return self.tokenize(text, add_bos=template is None), text

    def _apply_template(self, msgs: list[dict], add_generation_prompt: bool) -> str:
        return self._tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ---- the three calls -----------------------------------------------------------
    def _params(self, kwargs: dict[str, Any]) -> Any:
        try:
            return self._SP(**kwargs)
        except (TypeError, ValueError) as exc:
            raise EngineError(f"TensorRT-LLM rejected the sampling parameters: {exc}") from exc

    def _sampling_kwargs(self, sampling: SamplingParams | None, **kw: Any) -> dict[str, Any]:
        return m.sampling_kwargs(sampling, raw_mode=self._raw_mode, perf_metrics=self._perf_metrics, **kw)

    def _check_logprobs(self, top_k: int, *, glimpse: bool) -> None:
        try:
            lim.check_logprobs(top_k, self._logprobs_cap, exact_entropy_helps=glimpse and not self._exact)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc

    def _one_token_params(self, sampling: SamplingParams | None, top_k: int) -> Any:
        # With generation logits everything comes from the raw logits and no logprobs
        # are asked for (some releases then return only the sampled token's logprob:
        # examples/llm-api/llm_inference_logprob.py).
        if not self._exact:
            self._check_logprobs(top_k, glimpse=True)
        return self._params(self._sampling_kwargs(
            sampling, max_tokens=1, logprobs=None if self._exact else top_k,
            generation_logits=self._exact, ignore_eos=True,
        ))

    def _submit(self, prompt: list[int], params: Any, streaming: bool) -> Any:
        """generate_async, with the requests TRT refuses up front (prompt too long for
        max_num_tokens, parameters it will not combine) reported as EngineError, which
        the servicer returns as INVALID_ARGUMENT rather than INTERNAL."""
        self._require_started()
        try:
            return self._llm.generate_async(list(prompt), params, streaming=streaming)
        except Exception as exc:
            if lim.is_refusal(exc):
                raise EngineError(lim.refusal_message(exc, len(prompt))) from exc
            raise

    async def _one_token(self, prompt: list[int], params: Any, cancel: CancelToken) -> Any:
        req = self._submit(prompt, params, streaming=False)
        watcher = asyncio.create_task(self._watch(cancel, req))
        try:
            return await req.aresult()
        finally:
            watcher.cancel()
            self._abort(req)  # only does something when our caller was cancelled

    def _to_glimpse(self, out: Any, top_k: int, prompt_len: int, started: float) -> Glimpse:
        seq = out.outputs[0]
        if seq.finish_reason == "cancelled":
            raise EngineError("the request was cancelled")
        usage = m.usage(prompt_len, getattr(out, "cached_tokens", 0), 0)
        ms = (time.perf_counter() - started) * 1e3
        queue = m.queue_ms(getattr(seq, "request_perf_metrics", None))
        timings = Timings(queue, max(0.0, ms - queue), 0.0, ms)
        try:
            if self._exact and seq.generation_logits is not None:
                return m.glimpse_from_logits(_to_numpy(seq.generation_logits), top_k, self._text, usage, timings)
            return m.glimpse_from_logprobs((seq.logprobs or [{}])[-1], top_k, self._text, usage, timings)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc

    async def extend(self, prompt: list[int], session_id: str, cancel: CancelToken) -> Extension:
        """Catch-up prefill: a one-token request for the prefix, whose output is thrown
        away. TRT's KV block reuse keeps the prefix's blocks, so the session's next
        real call finds them cached (enable_block_reuse; blocks are shared by content,
        not by session, and may be evicted under memory pressure like any cached block)."""
        started = time.perf_counter()
        params = self._params(self._sampling_kwargs(None, max_tokens=1, ignore_eos=True))
        out = await self._one_token(prompt, params, cancel)
        usage = m.usage(len(prompt), getattr(out, "cached_tokens", 0), 0)
        ms = (time.perf_counter() - started) * 1e3
        queue = m.queue_ms(getattr(out.outputs[0], "request_perf_metrics", None))
        return Extension(usage, Timings(queue, max(0.0, ms - queue), 0.0, ms))

    async def glimpse(self, prompt: list[int], top_k: int, session_id: str, cancel: CancelToken) -> Glimpse:
        started = time.perf_counter()
        out = await self._one_token(prompt, self._one_token_params(None, top_k), cancel)
        return self._to_glimpse(out, top_k, len(prompt), started)

    async def step(self, req: GenerateRequest, gate: Gate, cancel: CancelToken) -> AsyncIterator[Decided | Chunk]:
        """The Decided as soon as the one-token request has decided, then (on KEEP) the
        step's chunks as TRT streams them, starting with the token already sampled."""
        sampling, top_k = req.sampling, req.top_k
        try:
            lim.check_gate(gate.method, self._exact)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        if not self._exact:
            self._check_logprobs(top_k, glimpse=True)  # before any fallback: both paths need them
        started = time.perf_counter()
        # One call that samples the step's first token with the step's parameters
        # while reporting the raw distribution, when the release can report it.
        path = lim.step_path(sampling.greedy, self._exact, self._raw_mode)
        single = path in (lim.StepPath.LOGITS, lim.StepPath.RAW_LOGPROBS)
        try:
            params = self._one_token_params(sampling if single else None, top_k)
        except EngineError:  # e.g. a release refusing logprobs > top_k; two calls still work
            single, path = False, lim.StepPath.REFUSED
            params = self._one_token_params(None, top_k)
        STEPS.labels(self.info.model_id, path.value).inc()
        prompt = list(req.prompt)
        out = await self._one_token(prompt, params, cancel)
        g = self._to_glimpse(out, top_k, len(prompt), started)
        decided = m.decide(g, gate)
        if decided.decision is Decision.ESCALATE:
            yield decided
            return
        seq = out.outputs[0]
        first = m.step_first_tokens(single, sampling.greedy, g.token_id, seq.token_ids, seq.finish_reason, self._end_id)
        yield decided
        # No per-token entropies: StepRequest asks for none, and the first token's
        # distribution is the glimpse's. Closing this stream (the caller went away)
        # closes the inner one at once, whose `finally` aborts the TRT request.
        async with contextlib.aclosing(
            self._stream(prompt, sampling, req.stop, cancel, False, top_k, first, started)
        ) as chunks:
            async for chunk in chunks:
                if chunk.final is not None:
                    chunk = dataclasses.replace(chunk, final=m.step_generation(g, chunk.final))
                yield chunk

    def generate(self, req: GenerateRequest, cancel: CancelToken) -> AsyncIterator[Chunk]:
        return self._stream(list(req.prompt), req.sampling, req.stop, cancel, req.return_entropies, req.top_k, [],
                            time.perf_counter())

    # ---- internals -------------------------------------------------------------------
    def _require_started(self) -> None:
        if self._llm is None:
            raise EngineError("the TensorRT-LLM engine is not started")

    @staticmethod
    def _abort(req: Any) -> None:
        try:
            if not req.finished:
                req.abort()  # GenerationResult.abort, tensorrt_llm/executor/result.py
        except Exception:  # already finished or executor gone: nothing left to stop
            pass

    async def _watch(self, cancel: CancelToken, req: Any) -> None:
        while not cancel.cancelled:
            await asyncio.sleep(_POLL_S)
        self._abort(req)

    async def _stream(
        self, prompt: list[int], sampling: SamplingParams, stop: StopParams, cancel: CancelToken,
        return_entropies: bool, top_k: int, first: list[int], started: float,
    ) -> AsyncIterator[Chunk]:
        """Generate with TRT stopping on stop ids and us cutting on decoded text;
        `first` is a token already sampled (Step) that the step starts with."""
        if return_entropies:
            self._check_logprobs(top_k, glimpse=False)
        eos = self._eos if stop.stop_on_eos else frozenset()
        stop_ids = self._stop_ids.for_request(stop.step_boundary, stop.stop, eos)
        cutter = StepCutter(self._token_bytes, stop.step_boundary, stop.stop)
        room = self.info.context_length - len(prompt)
        produced: list[int] = []
        hs: list[float] = []
        cached: Any = None
        first_at: float | None = None
        queued: list[float] = []  # per request: TRT's arrival -> first scheduled
        finish: FinishReason | None = None
        if first:
            fed = m.feed_tokens(cutter, first, eos)
            produced += first[: fed.taken]
            finish = fed.finish
            yield Chunk(first[: fed.taken], fed.text)
        # A Step's first token was drawn with the step's seed: later requests move on
        # from it rather than replaying the same random stream (where seeds are
        # honoured at all: trtllm_limits.SEED_NOTE).
        rounds = 1 if first else 0
        while finish is None:
            finish = m.budget_finish(len(produced), sampling.max_tokens, room)
            if finish is not None:
                break
            if cancel.cancelled:
                finish = FinishReason.CANCELLED
                break
            params = self._params(self._sampling_kwargs(
                sampling, max_tokens=min(sampling.max_tokens, room) - len(produced),
                logprobs=top_k if return_entropies else None,
                stop_token_ids=stop_ids, end_id=self._end_id, ignore_eos=not stop.stop_on_eos, seed_offset=rounds,
            ))
            req = self._submit(prompt + produced, params, streaming=True)
            watcher = asyncio.create_task(self._watch(cancel, req))
            sent, trt_finish, stop_reason = 0, None, None
            queued.append(0.0)
            try:
                async for out in req:
                    seq = out.outputs[0]
                    if cached is None:
                        cached = getattr(out, "cached_tokens", 0)
                    first_at = first_at or time.perf_counter()
                    queued[-1] = m.queue_ms(getattr(seq, "request_perf_metrics", None)) or queued[-1]
                    new = list(seq.token_ids[sent:])
                    fed = m.feed_tokens(cutter, new, eos)
                    h = m.entropies(seq.logprobs, sent, len(new), fed.taken, top_k) if return_entropies else []
                    sent += len(new)
                    produced += new[: fed.taken]
                    hs += h
                    if fed.taken or fed.text:
                        yield Chunk(new[: fed.taken], fed.text, h)
                    trt_finish, stop_reason = seq.finish_reason, seq.stop_reason
                    if fed.finish is not None:
                        finish = fed.finish
                        break
            finally:
                watcher.cancel()
                self._abort(req)  # we cut the step, or the caller stopped reading
            if finish is None:
                outcome = m.after_stream(trt_finish, stop_reason, sent, len(produced), sampling.max_tokens)
                if cancel.cancelled:
                    outcome = FinishReason.CANCELLED
                if outcome == FinishReason.EOS and stop.stop_on_eos:
                    tail = m.eos_tail(produced, eos, self._end_id)
                    produced += tail
                    yield Chunk(tail, cutter.flush())
                if outcome != m.CONTINUE:
                    finish = FinishReason(outcome)
            rounds += 1
        if finish not in (FinishReason.EOS, FinishReason.STEP_END, FinishReason.STOP):
            tail_text = cutter.flush()
            if tail_text:
                yield Chunk([], tail_text)
        now = time.perf_counter()
        first_at = first_at or now
        waited = queued[0] if queued else 0.0  # the part of the time to the first token spent queued
        timings = Timings(sum(queued), max(0.0, (first_at - started) * 1e3 - waited), (now - first_at) * 1e3,
                          (now - started) * 1e3)
        usage = m.usage(len(prompt), cached, len(produced))
        yield Chunk([], "", [], Generation(produced, cutter.text, finish, usage, timings, hs, cutter.matched_stop))
