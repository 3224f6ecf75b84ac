"""The TensorRT-LLM backend's pure logic (trtllm_mapping, trtllm_limits), with plain
fakes shaped like TRT's objects (Logprob(logprob, rank) dicts, finish_reason /
stop_reason strings, timedelta perf metrics)."""
from __future__ import annotations

import datetime
import enum
import json
import math
import types
from dataclasses import dataclass

import numpy as np
import pytest

from services.worker.backends import trtllm_limits as lim
from services.worker.backends import trtllm_mapping as m
from services.worker.batch import BatchModel
from services.worker.scheduler import Scheduler
from services.worker.stepcut import StepCutter
from services.worker.types import (ChatMessage, Decision, EntropyMethod, FinishReason, Gate, Generation, Glimpse,
                                  SamplingParams, Timings, Usage)


@dataclass
class Logprob:  # the shape of tensorrt_llm.executor.result.Logprob
    logprob: float
    rank: int | None = None


class LogprobMode(str, enum.Enum):  # the shape of tensorrt_llm.sampling_params.LogprobMode (PR #9675)
    RAW, PROCESSED = "raw", "processed"


def entropy_of(logprobs) -> float:
    """Independent reference: renormalise and sum -p ln p in plain Python."""
    ps = [math.exp(x) for x in logprobs]
    z = sum(ps)
    return -sum(p / z * math.log(p / z) for p in ps if p > 0)


# A byte-level vocabulary as a Qwen/Llama-3 tokenizer writes it (Ġ = space, Ċ = \n).
PIECES = ["<|endoftext|>", "Hello", "Ġworld", ".", "ĊĊ", ".ĊĊ", "Ċ", "Wait", "ĠâĤ", "¬", "ĊĊĊ"]
VOCAB = [m.piece_to_bytes(p, m.BYTE_LEVEL) if i else p.encode() for i, p in enumerate(PIECES)]


# ---- vocabulary -------------------------------------------------------------------


def test_byte_level_alphabet_is_a_bijection_onto_bytes():
    table = m._byte_level_alphabet()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["A"] == 0x41


def test_byte_level_pieces_decode_to_their_bytes():
    assert VOCAB[4] == b"\n\n" and VOCAB[5] == b".\n\n" and VOCAB[2] == b" world"
    assert VOCAB[8] + VOCAB[9] == " €".encode()  # a character split across two tokens


def test_sentencepiece_pieces():
    assert m.piece_to_bytes("<0x0A>", m.SENTENCEPIECE) == b"\n"
    assert m.piece_to_bytes("▁the", m.SENTENCEPIECE) == b" the"


@pytest.mark.parametrize(
    "decoder, scheme",
    [
        ({"type": "ByteLevel"}, m.BYTE_LEVEL),
        ({"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                           {"type": "ByteFallback"}, {"type": "Fuse"}]}, m.SENTENCEPIECE),
        ({"type": "Metaspace", "replacement": "▁"}, m.SENTENCEPIECE),
        ({"type": "WordPiece"}, m.UNKNOWN),
        (None, m.UNKNOWN),
    ],
)
def test_vocab_scheme_from_tokenizer_json(decoder, scheme):
    assert m.vocab_scheme(decoder) == scheme


class FakeHfTokenizer:
    """The few transformers tokenizer methods hf_vocab_bytes reads."""

    def __init__(self, pieces, added, decoder):
        self.pieces, self.added, self.decoder = pieces, added, decoder

    def __len__(self):
        return len(self.pieces)

    @property
    def backend_tokenizer(self):
        outer = self

        class Backend:
            def to_str(self):
                return json.dumps({"decoder": outer.decoder})

        return Backend()

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def get_added_vocab(self):
        return {self.pieces[i]: i for i in self.added}

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_hf_vocab_bytes_added_tokens_and_padded_rows():
    tok = FakeHfTokenizer(PIECES, added={0}, decoder={"type": "ByteLevel"})
    out = m.hf_vocab_bytes(tok, vocab_size=len(PIECES) + 3)
    assert out[0] == b"<|endoftext|>"  # special tokens are their text, not byte-mapped
    assert out[5] == b".\n\n"
    assert out[-3:] == [b"", b"", b""]  # embedding rows past the tokenizer


class FingerprintOnly(BatchModel):
    """A logits-level backend over VOCAB that is never asked to evaluate anything."""

    model_id, backend, context_length, n_seq, n_batch = "fake", "fake", 64, 1, 8
    vocab_size, eos_token_ids, bos_token_id = len(VOCAB), (0, 7), -1

    def token_bytes(self, token_id):
        return VOCAB[token_id]

    def tokenize(self, text, add_bos):
        return []

    def chat_template_text(self, messages, add_generation_prompt):
        return None

    def decode(self, *args):
        raise AssertionError("nothing is evaluated, cut, saved or loaded")

    keep = save = load = decode


async def test_fingerprint_matches_the_scheduler_backends():
    """Workers on the same tokenizer must advertise the same fingerprint whichever backend
    serves them: TRT's equals what the scheduler (llama.cpp, sim) puts in its ModelInfo,
    and the order of the EOS ids does not matter."""
    engine = Scheduler(FingerprintOnly())
    try:
        advertised = engine.info.tokenizer_fingerprint
    finally:
        await engine.close()
    assert m.tokenizer_fingerprint(VOCAB, (7, 0), -1) == advertised == FingerprintOnly().tokenizer_fingerprint()
    assert m.tokenizer_fingerprint(VOCAB, (0,), -1) != m.tokenizer_fingerprint(VOCAB, (0, 7), -1)


def test_eos_ids_merge_generation_config():
    assert m.eos_token_ids(2, {"eos_token_id": [128001, 2, 128009]}) == (2, 128001, 128009)
    assert m.eos_token_ids(None, {"eos_token_id": 5}) == (5,)
    assert m.eos_token_ids(None, {}) == ()


def test_context_length_and_think_and_json(tmp_path):
    assert m.context_length(2048, {"max_position_embeddings": 32768}) == 2048
    assert m.context_length(None, {"max_position_embeddings": 32768}) == 32768
    assert m.context_length(None, {}) == 4096
    assert m.think_delimiters({"<think>": 1, "</think>": 2}) == ("<think>", "</think>")
    assert m.think_delimiters({"<think>": 1}) == ("", "")
    (tmp_path / "config.json").write_text('{"vocab_size": 7}')
    assert m.read_json(tmp_path / "config.json") == {"vocab_size": 7}
    assert m.read_json(tmp_path / "missing.json") == {}


def test_render_chat_continue_keeps_trailing_boundary():
    def template(msgs, add_gen):  # strips content, as many chat templates do
        text = "".join(f"<|{x['role']}|>{x['content'].strip()}<|end|>" for x in msgs)
        return text + ("<|assistant|>" if add_gen else "")

    msgs = [ChatMessage("user", "Q"), ChatMessage("assistant", "<think>step one.\n\n")]
    assert m.render_chat(template, msgs, False, True) == "<|user|>Q<|end|><|assistant|><think>step one.\n\n"
    assert m.render_chat(template, msgs[:1], True, False) == "<|user|>Q<|end|><|assistant|>"
    assert m.render_chat(None, msgs, True, False) == "Q\n\n<think>step one.\n\n"
    assert m.render_chat(None, msgs, False, True) == "Q<think>step one.\n\n"


# ---- sampling ---------------------------------------------------------------------

# Every field name of tensorrt_llm.SamplingParams we emit, from the 1.2 API reference.
TRT_FIELDS = {
    "end_id", "max_tokens", "stop_token_ids", "include_stop_str_in_output", "logprobs_mode", "top_k",
    "top_p", "seed", "temperature", "logprobs", "return_generation_logits", "ignore_eos", "detokenize",
    "return_perf_metrics",
}


def trt_is_greedy(kw) -> bool:
    """The documented rule (docs/source/features/sampling.md, params_imply_greedy_decoding):
    nothing set, or temperature 0, top_p 0 or top_k 1."""
    t, p, k = kw.get("temperature"), kw.get("top_p"), kw.get("top_k")
    return (t is None and p is None and k is None) or k == 1 or p == 0.0 or t == 0


def trt10_is_greedy(kw) -> bool:
    """1.0's SamplingParams._greedy_decoding looked at top_k/top_p only."""
    return kw.get("top_k") in (None, 1) and kw.get("top_p") in (None, 0.0)


def test_greedy_maps_to_trt_greedy():
    kw = m.sampling_kwargs(SamplingParams(temperature=0.0, top_p=0.5, top_k=40), max_tokens=7)
    assert kw["top_k"] == 1 and kw["temperature"] == 0.0 and "top_p" not in kw
    assert trt_is_greedy(kw) and trt10_is_greedy(kw)
    assert kw["max_tokens"] == 7 and kw["detokenize"] is False  # never TRT's default of 32


def test_sampled_params_pass_through_and_are_not_greedy():
    kw = m.sampling_kwargs(SamplingParams(temperature=0.6, top_p=0.95, top_k=0, seed=3), max_tokens=512)
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["seed"]) == (0.6, 0.95, 0, 3)
    assert not trt_is_greedy(kw)
    assert m.sampling_kwargs(SamplingParams(temperature=0.6, seed=3), max_tokens=1, seed_offset=2)["seed"] == 5


def test_glimpse_params_read_the_models_own_distribution():
    kw = m.sampling_kwargs(None, max_tokens=1, logprobs=20, raw_mode="raw", ignore_eos=True)
    assert (kw["temperature"], kw["top_k"], kw["top_p"]) == (1.0, 0, 1.0)
    assert not trt_is_greedy(kw) and not trt10_is_greedy(kw)  # 1.0 refuses logprobs>1 when greedy
    assert kw["logprobs"] == 20 and kw["logprobs_mode"] == "raw" and kw["ignore_eos"] is True
    assert "seed" not in kw and "stop_token_ids" not in kw


def test_optional_fields_only_when_asked():
    plain = m.sampling_kwargs(SamplingParams(), max_tokens=4, raw_mode="raw")
    assert "logprobs" not in plain and "logprobs_mode" not in plain and "return_generation_logits" not in plain
    assert "return_perf_metrics" not in plain  # a release without the field would refuse it
    kw = m.sampling_kwargs(SamplingParams(), max_tokens=4, stop_token_ids=[9, 4, 4], end_id=0,
                           generation_logits=True, logprobs=5, perf_metrics=True)
    assert kw["stop_token_ids"] == [4, 9] and kw["include_stop_str_in_output"] is True
    assert kw["end_id"] == 0 and kw["return_generation_logits"] is True and "logprobs_mode" not in kw
    assert kw["return_perf_metrics"] is True
    assert set(kw) | set(plain) <= TRT_FIELDS


def test_seed_is_sent_for_samplers_that_honour_it():
    """TorchSampler of 1.2 ignores it (lim.SEED_NOTE); it is still sent, moved on per
    round, and the raw-logprobs enum member goes out as it is."""
    kw = m.sampling_kwargs(SamplingParams(temperature=0.6, seed=2**64 - 1), max_tokens=1, seed_offset=1,
                           logprobs=3, raw_mode=LogprobMode.RAW)
    assert kw["seed"] == 0 and kw["logprobs_mode"] is LogprobMode.RAW
    assert "#17172" in lim.SEED_NOTE and "not reproducible" in lim.SEED_NOTE


def test_stop_ids_include_merged_boundary_tokens():
    ids = m.StopIds(VOCAB)
    assert ids.containing("\n\n") == {4, 5, 10}  # ".\n\n" and "\n\n\n" too, not a lone "\n"
    assert ids.for_request("\n\n", ["Wait"], (0,)) == {0, 4, 5, 7, 10}
    assert ids.for_request("", [], ()) == frozenset()


# ---- logprobs -> glimpse ----------------------------------------------------------


def test_top_logprobs_drops_the_sampled_token_outside_top_k():
    entry = {11: Logprob(-0.5, 1), 12: Logprob(-1.5, 2), 13: Logprob(-2.0, 3), 99: Logprob(-9.0, 57)}
    assert m.top_logprobs(entry, 3) == [(11, -0.5), (12, -1.5), (13, -2.0)]
    assert m.top_logprobs(entry, 2) == [(11, -0.5), (12, -1.5)]
    assert m.top_logprobs({1: -3.0, 2: -0.1, 3: Logprob(-1.0)}, 2) == [(2, -0.1), (3, -1.0)]


def test_glimpse_entropy_equals_reference():
    rng = np.random.default_rng(0)
    lps = sorted(rng.normal(-3, 1.5, 20), reverse=True)
    entry = {100 + i: Logprob(float(lp), i + 1) for i, lp in enumerate(lps)}
    entry[7] = Logprob(-12.0, 300)  # the sampled token, returned with its true rank
    g = m.glimpse_from_logprobs(entry, 20, lambda t: f"<{t}>", Usage(5), Timings())
    assert g.entropy_top_k == pytest.approx(entropy_of(lps), abs=1e-12)
    assert g.token_id == 100 and g.token_text == "<100>" and g.entropy_full == -1.0
    assert [t.token_id for t in g.top] == list(range(100, 120))
    with pytest.raises(ValueError):
        m.glimpse_from_logprobs({}, 20, str, Usage(), Timings())


def test_glimpse_from_logits_is_exact():
    logits = np.random.default_rng(1).normal(0, 3, 500).astype(np.float32)
    lp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    full = float(-(np.exp(lp) * lp).sum())
    g = m.glimpse_from_logits(logits[None, :], 20, str, Usage(), Timings())  # [tokens, vocab]
    assert g.entropy_full == pytest.approx(full, rel=1e-6)
    assert g.token_id == int(np.argmax(logits))
    assert g.entropy_top_k == pytest.approx(entropy_of(sorted(lp, reverse=True)[:20]), rel=1e-6)
    assert m.logits_row(np.zeros((1, 2, 4))).shape == (4,)


def test_sampled_token_and_entropies():
    assert m.sampled_token([5], "length", 0) == 5
    assert m.sampled_token([], "stop", 0) == 0  # ended on the end id without reporting it
    with pytest.raises(ValueError):
        m.sampled_token([], "length", 0)
    rows = [{1: Logprob(-0.1, 1), 2: Logprob(-2.4, 2)}, {1: Logprob(-0.7, 1), 2: Logprob(-0.7, 2)}]
    assert m.entropies(rows, 0, 2, 2, 2) == pytest.approx([entropy_of([-0.1, -2.4]), math.log(2)])
    assert m.entropies(rows, 5, 2, 1, 2) == pytest.approx([entropy_of([-0.1, -2.4])])  # a per-delta list
    assert m.entropies(rows, 1, 1, 1, 2) == pytest.approx([math.log(2)])  # cumulative
    assert m.entropies(None, 0, 3, 3, 2) == []


# ---- a Step -------------------------------------------------------------------------


def glimpse_with(entropy_top_k, entropy_full=-1.0, usage=None, timings=None):
    return Glimpse(3, ".", entropy_full, entropy_top_k, [], usage or Usage(), timings or Timings())


def test_decide_escalates_at_or_above_the_threshold_by_the_gates_method():
    g = glimpse_with(1.0, entropy_full=2.5)
    assert m.decide(g, Gate(EntropyMethod.TOP_K, 1.5)).decision is Decision.KEEP
    assert m.decide(g, Gate(EntropyMethod.TOP_K, 1.0)).decision is Decision.ESCALATE  # at: escalates
    d = m.decide(g, Gate(EntropyMethod.FULL, 2.0))
    assert (d.decision, d.entropy, d.glimpse) == (Decision.ESCALATE, 2.5, g)
    assert m.decide(g, Gate()).decision is Decision.KEEP  # the default threshold keeps everything
    lim.check_gate(EntropyMethod.TOP_K, False)
    lim.check_gate(EntropyMethod.FULL, True)
    with pytest.raises(ValueError, match="--trtllm-exact-entropy"):
        lim.check_gate(EntropyMethod.FULL, False)


def test_a_kept_step_starts_from_the_sampled_token_the_argmax_or_nothing():
    assert m.step_first_tokens(True, False, 2, [7], "length", 0) == [7]  # sampled in the glimpse request
    assert m.step_first_tokens(True, True, 2, [2], "length", 0) == [2]
    assert m.step_first_tokens(True, False, 2, [], "stop", 0) == [0]  # ended on the end id, unreported
    assert m.step_first_tokens(False, True, 2, [9], "length", 0) == [2]  # greedy: the glimpse's argmax
    assert m.step_first_tokens(False, False, 2, [9], "length", 0) == []  # regenerated from the boundary
    with pytest.raises(ValueError):
        m.step_first_tokens(True, False, 2, [], "length", 0)


def test_step_generation_takes_the_glimpses_usage_and_queue():
    g = glimpse_with(0.5, usage=Usage(10, 6, 4, 0), timings=Timings(3.0, 5.0, 0.0, 8.0))
    gen = Generation([1, 2], "ab", FinishReason.STEP_END, Usage(11, 11, 0, 2), Timings(2.0, 20.0, 7.0, 30.0))
    out = m.step_generation(g, gen)
    assert out.usage == Usage(10, 6, 4, 2)
    assert out.timings == Timings(5.0, 17.0, 7.0, 30.0)
    assert (out.token_ids, out.text, out.finish_reason) == ([1, 2], "ab", FinishReason.STEP_END)
    assert gen.usage == Usage(11, 11, 0, 2) and gen.timings.queue_ms == 2.0  # a new Generation
    assert m.step_generation(glimpse_with(0.5, timings=Timings(50.0)), gen).timings.prefill_ms == 0.0


def test_usage_clips_cached_tokens():
    assert m.usage(10, 4, 3) == Usage(10, 4, 6, 3)
    assert m.usage(10, None, 0) == Usage(10, 0, 10, 0)
    assert m.usage(10, 99, 0).cached_tokens == 10


# ---- stream cutting and finish reasons --------------------------------------------


def cutter(stops=()):
    return StepCutter(lambda t: VOCAB[t], "\n\n", stops)


def test_merged_boundary_token_ends_the_step():
    c = cutter()
    fed = m.feed_tokens(c, [1, 2, 5, 7, 7], frozenset({0}))
    assert (fed.taken, fed.finish) == (3, FinishReason.STEP_END)  # tokens after the cut are dropped
    assert fed.text == "Hello world.\n\n" and c.text == fed.text


def test_boundary_before_content_does_not_end_the_step():
    c = cutter()
    fed = m.feed_tokens(c, [4], frozenset({0}))
    assert fed == m.Fed(1, "\n\n", None)
    assert m.feed_tokens(c, [1, 3, 6, 6, 1], frozenset()).taken == 4  # "\n" + "\n" across tokens


def test_eos_stop_strings_and_split_characters():
    fed = m.feed_tokens(cutter(), [1, 0, 2], frozenset({0}))
    assert (fed.taken, fed.finish, fed.text) == (2, FinishReason.EOS, "Hello")
    c = cutter(["Wait"])
    fed = m.feed_tokens(c, [4, 7, 1], frozenset())  # a stop string needs no content before it
    assert (fed.taken, fed.finish, c.matched_stop) == (2, FinishReason.STOP, "Wait")
    c = cutter()
    assert m.feed_tokens(c, [8], frozenset()).text == " "  # half of "€" is held back
    assert m.feed_tokens(c, [9], frozenset()).text == "€"


def test_eos_tail_and_budget():
    assert m.eos_tail([1, 2], {0}, 0) == [0]
    assert m.eos_tail([1, 0], {0}, 0) == [] and m.eos_tail([1], {0}, None) == []
    assert m.budget_finish(5, 5, 100) is FinishReason.LENGTH
    assert m.budget_finish(3, 5, 3) is FinishReason.CONTEXT
    assert m.budget_finish(3, 5, 4) is None


@pytest.mark.parametrize(
    "trt_finish, stop_reason, new, produced, expected",
    [
        ("cancelled", None, 3, 3, FinishReason.CANCELLED),
        ("timeout", None, 3, 3, FinishReason.CANCELLED),
        ("length", None, 5, 8, FinishReason.LENGTH),
        ("length", None, 5, 6, FinishReason.CONTEXT),  # the engine's max_seq_len came first
        ("stop", None, 2, 2, FinishReason.EOS),
        ("stop", 4, 1, 1, m.CONTINUE),  # a blank "\n\n" stop id: write on
        ("stop", 4, 0, 1, FinishReason.LENGTH),  # never loop without progress
        (None, None, 0, 0, FinishReason.LENGTH),
    ],
)
def test_after_stream(trt_finish, stop_reason, new, produced, expected):
    assert m.after_stream(trt_finish, stop_reason, new, produced, max_tokens=8) == expected


# ---- trtllm_limits: what TRT refuses, and what the worker advertises --------------


def upstream_check_arguments(llm_args, prompt_len: int, query_len: int = 0) -> None:
    """BaseLLM._check_arguments of tensorrt_llm/llmapi/llm.py, PyTorch backend, as read
    upstream (cp_size 1): the rule the advertised context length must respect."""
    if not llm_args.get("enable_chunked_prefill"):
        max_num_tokens = llm_args.get("max_num_tokens") or lim.DEFAULT_MAX_NUM_TOKENS
        if prompt_len + query_len > max_num_tokens:
            raise ValueError(f"The sum of prompt length ({float(prompt_len)}), query length ({query_len}) "
                             f"should not exceed max_num_tokens ({max_num_tokens})")


def kv():
    return types.SimpleNamespace(enable_block_reuse=True)


def test_chunked_prefill_is_on_unless_turned_off():
    args = lim.llm_kwargs("/m", kv_cache_config=kv())
    assert args["enable_chunked_prefill"] is True and args["kv_cache_config"].enable_block_reuse
    assert not {"max_num_tokens", "max_batch_size", "max_seq_len", "gather_generation_logits"} & set(args)
    args = lim.llm_kwargs("/m", kv_cache_config=kv(), chunked_prefill=False, max_num_tokens=4096, max_batch_size=64,
                          exact_entropy=True, extra={"max_batch_size": 32})
    assert (args["enable_chunked_prefill"], args["max_num_tokens"]) == (False, 4096)
    assert args["gather_generation_logits"] is True
    assert args["max_batch_size"] == 32  # llm_kwargs win


@pytest.mark.parametrize(
    "args, config, expected",
    [
        ({"enable_chunked_prefill": True}, {"max_position_embeddings": 40960}, 40960),
        ({"enable_chunked_prefill": True, "max_seq_len": 16384}, {"max_position_embeddings": 40960}, 16384),
        ({"enable_chunked_prefill": False}, {"max_position_embeddings": 40960}, 8193),
        ({"enable_chunked_prefill": False, "max_num_tokens": 32768}, {"max_position_embeddings": 40960}, 32769),
        ({"enable_chunked_prefill": False, "max_num_tokens": 32768}, {"max_position_embeddings": 4096}, 4096),
        ({}, {"max_position_embeddings": 40960}, 8193),  # chunked prefill defaults to off upstream
    ],
)
def test_context_length_is_what_trt_accepts(args, config, expected):
    assert lim.context_length(args, config) == expected
    # every prompt the worker's validation lets through (< context length) passes TRT's check
    upstream_check_arguments(args, expected - 1)
    limit = (args.get("max_num_tokens") or lim.DEFAULT_MAX_NUM_TOKENS) + 1
    if not args.get("enable_chunked_prefill") and expected == limit:  # and not a token more conservative
        with pytest.raises(ValueError, match="max_num_tokens"):
            upstream_check_arguments(args, expected)


def test_refusals_are_recognised_and_name_the_fix():
    class RequestError(RuntimeError):  # tensorrt_llm.executor.utils.RequestError
        pass

    RequestError.__module__ = "tensorrt_llm.executor.utils"

    class OtherRequestError(RuntimeError):
        pass

    OtherRequestError.__name__ = "RequestError"
    assert lim.is_refusal(ValueError("x")) and lim.is_refusal(RequestError("x"))
    assert not lim.is_refusal(RuntimeError("CUDA error")) and not lim.is_refusal(OtherRequestError("x"))
    with pytest.raises(ValueError) as info:
        upstream_check_arguments({}, 9351)
    text = lim.refusal_message(info.value, 9351)
    assert "9351 prompt tokens" in text and "max_num_tokens (8192)" in text and "--trtllm-chunked-prefill" in text
    assert "--trtllm" not in lim.refusal_message(ValueError("best_of must be >= n"), 3)


def test_logprobs_cap_is_refused_by_name():
    assert lim.logprobs_cap(20) == 20 and lim.logprobs_cap(100) == 100
    assert lim.logprobs_cap(None) is None and lim.logprobs_cap("x") is None and lim.logprobs_cap(0) is None
    lim.check_logprobs(20, 20, exact_entropy_helps=True)
    lim.check_logprobs(1000, None, exact_entropy_helps=True)  # a release without the check
    with pytest.raises(ValueError, match=r"top_k 21 .*at most 20.*MAX_TOP_LOGPROBS.*--trtllm-exact-entropy"):
        lim.check_logprobs(21, 20, exact_entropy_helps=True)
    with pytest.raises(ValueError) as info:
        lim.check_logprobs(21, 20, exact_entropy_helps=False)
    assert "exact-entropy" not in str(info.value)


def test_raw_logprobs_mode_is_the_member_named_raw():
    class ByValue(enum.Enum):
        A, B = "raw", "processed"

    class Neither(enum.Enum):
        X = "processed"

    assert lim.raw_logprobs_mode({"logprobs_mode": LogprobMode.PROCESSED}) is LogprobMode.RAW
    assert lim.raw_logprobs_mode({"logprobs_mode": ByValue.B}) is ByValue.A
    assert lim.raw_logprobs_mode({"logprobs_mode": Neither.X}) is None
    assert lim.raw_logprobs_mode({"logprobs_mode": "raw"}) == "raw"
    assert lim.raw_logprobs_mode({"logprobs": None}) is None  # no field: 1.2.x without PR #9675
    # The "raw_logprobs" naming of the unmerged PR #9302 is not a release's: not taken for raw.
    assert lim.raw_logprobs_mode({"logprobs_mode": "raw_logprobs"}) is None


@pytest.mark.parametrize(
    "greedy, exact, raw_mode, path",
    [
        (True, False, None, lim.StepPath.GREEDY),
        (True, True, LogprobMode.RAW, lim.StepPath.GREEDY),
        (False, True, None, lim.StepPath.LOGITS),
        (False, False, LogprobMode.RAW, lim.StepPath.RAW_LOGPROBS),
        (False, False, None, lim.StepPath.NO_LOGPROBS_MODE),
    ],
)
def test_step_path(greedy, exact, raw_mode, path):
    assert lim.step_path(greedy, exact, raw_mode) is path


def test_sampled_step_path_is_described_once():
    without = lim.describe_sampled_steps(False, None)
    assert "two requests" in without and "#9675" in without
    assert "one request" in lim.describe_sampled_steps(False, LogprobMode.RAW)
    assert "generation logits" in lim.describe_sampled_steps(True, None)


def test_queue_time_from_perf_metrics():
    def perf(arrival, scheduled):
        td = datetime.timedelta
        return types.SimpleNamespace(timing_metrics=types.SimpleNamespace(
            arrival_time=td(seconds=arrival), first_scheduled_time=td(seconds=scheduled)))

    assert m.queue_ms(perf(100.0, 100.0125)) == pytest.approx(12.5)
    assert m.queue_ms(perf(100.0, 0.0)) == 0.0  # not scheduled yet
    assert m.queue_ms(None) == 0.0 and m.queue_ms(types.SimpleNamespace(timing_metrics=None)) == 0.0


def test_describe_names_the_limits_and_their_defaults():
    args = lim.llm_kwargs("/m", kv_cache_config=kv(), max_batch_size=64, tensor_parallel_size=2)
    text = lim.describe(args, 40960, True)
    assert text == ("context=40960 chunked_prefill=on max_num_tokens=8192(default) max_batch_size=64 "
                    "exact_entropy=on tensor_parallel=2")
    args = lim.llm_kwargs("/m", kv_cache_config=kv(), chunked_prefill=False, max_num_tokens=4096)
    assert lim.describe(args, 4097, False) == ("context=4097 chunked_prefill=off max_num_tokens=4096 "
                                               "max_batch_size=2048(default) exact_entropy=off tensor_parallel=1")


def test_exact_entropy_buffer_estimate():
    qwen3_vocab = 151936
    assert lim.logits_buffer_bytes(None, qwen3_vocab) == 2048 * qwen3_vocab * 4  # ~1.16 GiB at TRT's default
    assert lim.logits_buffer_bytes(128, qwen3_vocab) == 128 * qwen3_vocab * 4  # ~74 MiB
