"""What the TensorRT-LLM backend decides without calling the engine: request ->
`tensorrt_llm.SamplingParams` kwargs, stop-id sets, TRT logprobs -> Glimpse, finish
reasons, where a streamed output is cut. No tensorrt_llm import, so it is tested
anywhere. Cited files are in NVIDIA/TensorRT-LLM (LLM API of 1.2.x)."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from services.worker import entropy as ent
from services.worker.stepcut import StepCutter, boundary_token_ids
from services.worker.types import (ChatMessage, Decided, Decision, FinishReason, Gate, Generation, Glimpse,
                                  SamplingParams, Timings, TokenLogprob, Usage)
from services.worker.vocab import tokenizer_fingerprint  # noqa: F401  (used by trtllm.py as m.tokenizer_fingerprint)

# ---- vocabulary ----------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level BPE alphabet, char -> byte: printable Latin-1 bytes stand
    for themselves and the other 68 bytes are shifted to code points from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
BYTE_LEVEL, SENTENCEPIECE, UNKNOWN = "byte_level", "sentencepiece", "unknown"


def vocab_scheme(decoder: Mapping[str, Any] | None) -> str:
    """How a fast tokenizer's pieces map to bytes, read from the `decoder` section of
    its tokenizer.json (the only place the convention is stated)."""
    if not decoder:
        return UNKNOWN
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    if "ByteLevel" in kinds:
        return BYTE_LEVEL
    if {"ByteFallback", "Metaspace"} & set(kinds) or "▁" in json.dumps(decoder, ensure_ascii=False):
        return SENTENCEPIECE
    return UNKNOWN


def piece_to_bytes(piece: str, scheme: str) -> bytes:
    if scheme == BYTE_LEVEL:
        if all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        return piece.encode("utf-8")
    if scheme == SENTENCEPIECE:
        m = _SP_BYTE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


def hf_vocab_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """id -> bytes for every id the model can emit. Added/special tokens are their
    text (as llama.cpp reports them); ids past the tokenizer (padded embedding rows)
    are empty."""
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder")
    except Exception:  # a slow tokenizer has no tokenizer.json
        decoder = None
    scheme = vocab_scheme(decoder)
    known = min(vocab_size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(known)))
    added = set(tokenizer.get_added_vocab().values())
    out: list[bytes] = []
    for tid, piece in enumerate(pieces):
        if piece is None:
            out.append(b"")
        elif tid in added:
            out.append(piece.encode("utf-8"))
        elif scheme == UNKNOWN:  # lossy for tokens that are part of a UTF-8 sequence
            out.append(tokenizer.decode([tid]).encode("utf-8"))
        else:
            out.append(piece_to_bytes(piece, scheme))
    return out + [b""] * (vocab_size - known)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a hub name rather than a directory: use defaults
        return {}


def eos_token_ids(tokenizer_eos: int | None, generation_config: Mapping[str, Any]) -> tuple[int, ...]:
    """Chat models often end turns with ids that only generation_config.json lists
    (e.g. <|eot_id|> next to <|end_of_text|>); the tokenizer's own id comes first so
    it can serve as TRT's end_id."""
    ids = [tokenizer_eos] if tokenizer_eos is not None else []
    extra = generation_config.get("eos_token_id")
    ids += extra if isinstance(extra, list) else ([extra] if extra is not None else [])
    return tuple(dict.fromkeys(int(i) for i in ids))


def context_length(max_seq_len: int | None, config: Mapping[str, Any]) -> int:
    if max_seq_len:
        return int(max_seq_len)
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        if config.get(key):
            return int(config[key])
    return 4096


def think_delimiters(added_vocab: Mapping[str, int]) -> tuple[str, str]:
    return ("<think>", "</think>") if "<think>" in added_vocab and "</think>" in added_vocab else ("", "")


_SENTINEL = "\x00GLIMPROUTER_CONTINUE\x00"


def render_chat(
    template: Callable[[list[dict], bool], str] | None,
    messages: Sequence[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
) -> str:
    """Chat text with the same rules as the scheduler's backends (prompts.render_prompt).
    Continuing the final message cuts at a sentinel instead of using HF's
    continue_final_message, which drops trailing whitespace when the template strips
    it: a context that ends in the step boundary "\\n\\n" must keep it."""
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    if continue_final_message:
        msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"] + _SENTINEL}
        text = template(msgs, False) if template else "".join(m["content"] for m in msgs)
        return text[: text.index(_SENTINEL)]
    if template:
        return template(msgs, add_generation_prompt)
    return "\n\n".join(m["content"] for m in msgs)


# ---- sampling ------------------------------------------------------------------


def sampling_kwargs(
    sampling: SamplingParams | None, *, max_tokens: int, logprobs: int | None = None,
    raw_mode: Any = None, generation_logits: bool = False, stop_token_ids: Iterable[int] = (),
    end_id: int | None = None, ignore_eos: bool = False, seed_offset: int = 0, perf_metrics: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for tensorrt_llm.SamplingParams. `sampling=None` asks for the
    model's own distribution (temperature 1, no cuts): a glimpse reads logprobs and
    drops the token, and at temperature 1 without cuts "processed" logprobs equal
    "raw" ones, so the entropy is right on releases without logprobs_mode."""
    # max_tokens defaults to 32 and the sampling fields to None = "C++ runtime
    # default" (tensorrt_llm/sampling_params.py): every field we rely on is explicit,
    # also so that generation_config='auto' defaults never leak in.
    kw: dict[str, Any] = {"max_tokens": max_tokens, "detokenize": False}
    if perf_metrics:
        # The result then carries the request's timing metrics, the only place its
        # queue time is observable (queue_ms).
        kw["return_perf_metrics"] = True
    if sampling is None:
        # top_p is explicit because earlier releases refuse logprobs > 1 on a request
        # they consider greedy (tests/unittest/_torch/sampler/test_return_top_k_logprobs.py).
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
    elif sampling.greedy:
        # Greedy under the documented rule (temperature 0 or top_k 1,
        # docs/source/features/sampling.md) and under 1.0's, which only looked at
        # top_k/top_p (SamplingParams._greedy_decoding).
        kw.update(top_k=1, temperature=0.0)
    else:
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    if sampling is not None and sampling.seed is not None:
        # Sent for samplers that honour it; the default TorchSampler of 1.2 does not
        # (trtllm_limits.SEED_NOTE), so nothing here relies on it.
        kw["seed"] = (sampling.seed + seed_offset) % (1 << 64)
    if logprobs:
        kw["logprobs"] = logprobs
        if raw_mode is not None:  # trtllm_limits.raw_logprobs_mode
            kw["logprobs_mode"] = raw_mode
    if generation_logits:
        kw["return_generation_logits"] = True
    stops = sorted(set(stop_token_ids))
    if stops:
        kw["stop_token_ids"] = stops
        # Without it TRT trims the matched stop ids from token_ids
        # (tensorrt_llm/executor/result.py, _handle_sequence): we must return
        # exactly the tokens the model produced.
        kw["include_stop_str_in_output"] = True
    if end_id is not None:
        kw["end_id"] = end_id
    if ignore_eos:
        kw["ignore_eos"] = True
    return kw


class StopIds:
    """Stop-id sets per boundary/stop string, computed once over the vocabulary.
    TRT matches `stop` strings as token-id sequences from tokenizer.encode, so a
    merged token such as ".\\n\\n" would never match "\\n\\n": every token whose
    text contains the string is a stop id instead."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = pieces
        self._cache: dict[str, frozenset[int]] = {}

    def containing(self, text: str) -> frozenset[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = frozenset(boundary_token_ids(enumerate(self._pieces), text)) if text else frozenset()
            self._cache[text] = ids
        return ids

    def for_request(self, boundary: str, stops: Sequence[str], eos: Iterable[int]) -> frozenset[int]:
        out = set(self.containing(boundary)) | set(eos)
        for s in stops:
            out |= self.containing(s)
        return frozenset(out)


# ---- logprobs -> entropy -------------------------------------------------------


def top_logprobs(entry: Mapping[int, Any], k: int) -> list[tuple[int, float]]:
    """One position of CompletionOutput.logprobs ({token_id: Logprob(logprob, rank)},
    tensorrt_llm/executor/result.py) -> the top-k (id, logprob), best first. Current
    releases add the sampled token with its true rank when it is outside the top-k
    (tests/unittest/_torch/sampler/test_logits_logprobs.py); it is not part of the
    top-k distribution, so ranks above k are dropped."""
    items = []
    for tid, lp in entry.items():
        value, rank = (float(lp), None) if isinstance(lp, (int, float)) else (float(lp.logprob), lp.rank)
        if rank is None or rank <= k:
            items.append((int(tid), value, rank if rank is not None else math.inf))
    items.sort(key=lambda it: (-it[1], it[2], it[0]))
    return [(tid, value) for tid, value, _ in items[:k]]


def glimpse_from_logprobs(
    entry: Mapping[int, Any], k: int, text: Callable[[int], str], usage: Usage, timings: Timings
) -> Glimpse:
    pairs = top_logprobs(entry, k)
    if not pairs:
        raise ValueError("TensorRT-LLM returned no log-probabilities for the glimpsed position")
    top = [TokenLogprob(t, text(t), lp) for t, lp in pairs]
    h = ent.top_k_entropy([lp for _, lp in pairs])
    return Glimpse(pairs[0][0], text(pairs[0][0]), -1.0, h, top, usage, timings)


def logits_row(logits: Any) -> np.ndarray:
    """CompletionOutput.generation_logits is [tokens, vocab] (a leading beam axis on
    some paths); the glimpse wants the last generated position."""
    arr = np.asarray(logits, dtype=np.float32)
    while arr.ndim > 1:
        arr = arr[-1]
    return arr


def glimpse_from_logits(logits: Any, k: int, text: Callable[[int], str], usage: Usage, timings: Timings) -> Glimpse:
    d = ent.summarize(logits_row(logits), k)
    top = [TokenLogprob(t, text(t), lp) for t, lp in zip(d.top_ids, d.top_logprobs)]
    return Glimpse(d.greedy_id, text(d.greedy_id), d.entropy_full, d.entropy_top_k, top, usage, timings)


def decide(glimpse: Glimpse, gate: Gate) -> Decided:
    """A Step's rule (the paper's): ESCALATE when the glimpsed entropy is at or above the threshold."""
    value = glimpse.entropy(gate.method)
    return Decided(Decision.ESCALATE if value >= gate.threshold else Decision.KEEP, value, glimpse)


def step_first_tokens(
    sampled: bool, greedy: bool, argmax: int, token_ids: Sequence[int], finish_reason: str | None,
    end_id: int | None,
) -> list[int]:
    """What a kept Step starts with. `sampled`: the glimpse request drew the step's first
    token with the step's own parameters (one request): that token. Otherwise a greedy
    step starts from the glimpse's argmax, and a sampled one from nothing: it is
    regenerated from the boundary, as the paper's reference does."""
    if sampled:
        return [sampled_token(token_ids, finish_reason, end_id)]
    return [argmax] if greedy else []


def step_generation(glimpse: Glimpse, gen: Generation) -> Generation:
    """A kept Step's Generation, from the stream that wrote it: the usage is the
    glimpse's (its request saw the prompt first), and the time to the first token counts
    from the step's start, so the glimpse's queue time joins the stream's."""
    timings = Timings(
        gen.timings.queue_ms + glimpse.timings.queue_ms,
        max(0.0, gen.timings.prefill_ms - glimpse.timings.queue_ms),
        gen.timings.decode_ms,
        gen.timings.total_ms,
    )
    usage = replace(glimpse.usage, generated_tokens=gen.usage.generated_tokens)
    return replace(gen, usage=usage, timings=timings)


def sampled_token(token_ids: Sequence[int], finish_reason: str | None, end_id: int | None) -> int:
    """The token a one-token request produced. A request that ended on its end id may
    report no token (the end id is not always part of token_ids)."""
    if token_ids:
        return int(token_ids[-1])
    if finish_reason == "stop" and end_id is not None:
        return end_id
    raise ValueError(f"TensorRT-LLM produced no token (finish_reason={finish_reason!r})")


def entropies(logprobs: Sequence[Mapping[int, Any]] | None, sent: int, new: int, taken: int, k: int) -> list[float]:
    """Top-k entropy of the first `taken` of `new` streamed tokens. CompletionOutput.
    logprobs is cumulative on current releases (openengine/formatting.py slices it
    from the sent count); a list as long as the delta is taken as the delta."""
    rows = list(logprobs or [])
    rows = rows[sent : sent + taken] if len(rows) >= sent + new else rows[-new:][:taken] if new else []
    return [ent.top_k_entropy([lp for _, lp in top_logprobs(r, k)]) if r else 0.0 for r in rows]


def usage(prompt_tokens: int, cached_tokens: Any, generated: int) -> Usage:
    """`cached_tokens` is a GenerationResult attribute on recent releases
    (tensorrt_llm/grpc/openengine/formatting.py reads it); older ones lack it."""
    cached = max(0, min(int(cached_tokens or 0), prompt_tokens))
    return Usage(prompt_tokens, cached, prompt_tokens - cached, generated)


def queue_ms(perf_metrics: Any) -> float:
    """Time the request waited for the executor, from CompletionOutput.request_perf_metrics
    (filled when SamplingParams.return_perf_metrics is set, tensorrt_llm/executor/result.py):
    arrival to first scheduling, as result.py's _process_req_perf_metrics computes
    REQUEST_QUEUE_TIME. The times are timedeltas, zero until they happen; 0 when absent."""
    timing = getattr(perf_metrics, "timing_metrics", None)
    try:
        arrival, scheduled = timing.arrival_time, timing.first_scheduled_time
        if scheduled.total_seconds() <= 0 or arrival.total_seconds() <= 0:
            return 0.0
        return max(0.0, (scheduled - arrival).total_seconds() * 1e3)
    except (AttributeError, TypeError):
        return 0.0


# ---- streamed output -> step boundaries and finish reasons ---------------------


@dataclass(frozen=True)
class Fed:
    taken: int  # tokens of the delta that belong to the generation
    text: str
    finish: FinishReason | None


def feed_tokens(cutter: StepCutter, ids: Sequence[int], eos: frozenset[int] | set[int]) -> Fed:
    """Cut a streamed delta where our rules end it (same order as decoding.Decoding: EOS,
    then stop strings / step boundary on decoded text). Tokens after the cut were
    generated by TRT before it saw our decision and are dropped."""
    text = ""
    for i, tid in enumerate(ids):
        if tid in eos:
            return Fed(i + 1, text + cutter.flush(), FinishReason.EOS)
        text += cutter.feed(tid)
        if cutter.done is not None:
            return Fed(i + 1, text + cutter.flush(), cutter.done)
    return Fed(len(ids), text, None)


def eos_tail(produced: Sequence[int], eos: frozenset[int] | set[int], end_id: int | None) -> list[int]:
    """The end id to append when TRT ended on it without reporting it, so the caller
    gets the full sequence the model produced (decoding.Decoding includes the EOS token)."""
    if end_id is None or (produced and produced[-1] in eos):
        return []
    return [end_id]


def budget_finish(produced: int, max_tokens: int, room: int) -> FinishReason | None:
    if produced >= max_tokens:
        return FinishReason.LENGTH
    if produced >= room:
        return FinishReason.CONTEXT
    return None


CONTINUE = "continue"


def after_stream(
    trt_finish: str | None, stop_reason: int | str | None, new_tokens: int, produced: int, max_tokens: int
) -> FinishReason | str:
    """What a TRT request that ended without our cut means. A stop id that our
    decoded-text check did not accept is a boundary before any non-blank text (a
    step may open with "\\n\\n"): the caller continues with a new request from
    prompt + produced, whose prefix KV block reuse makes nearly free."""
    if trt_finish in ("cancelled", "timeout"):
        return FinishReason.CANCELLED
    if trt_finish == "length":
        # TRT also says "length" when the sequence hits the engine's max_seq_len.
        return FinishReason.LENGTH if produced >= max_tokens else FinishReason.CONTEXT
    if trt_finish == "stop":
        if stop_reason is None:  # the end id (FinishReason.END_ID), not a stop word
            return FinishReason.EOS
        return CONTINUE if new_tokens > 0 else FinishReason.LENGTH
    return FinishReason.LENGTH
