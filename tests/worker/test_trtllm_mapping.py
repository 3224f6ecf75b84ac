"""The TensorRT-LLM backend's pure logic, with plain fakes shaped like TRT's objects
(Logprob(logprob, rank) dicts, finish_reason / stop_reason strings)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from services.worker.backends import trtllm_mapping as m
from services.worker.logits_engine import TokenModel
from services.worker.stepcut import StepCutter
from services.worker.types import ChatMessage, FinishReason, SamplingParams, Timings, Usage


@dataclass
class Logprob:  # the shape of tensorrt_llm.executor.result.Logprob
    logprob: float
    rank: int | None = None


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


def test_fingerprint_matches_token_model_scheme():
    class Fake(TokenModel):
        vocab_size, eos_token_ids, bos_token_id = len(VOCAB), (0, 7), -1

        def token_bytes(self, token_id):
            return VOCAB[token_id]

        prefill = decode = tokenize = chat_template_text = None

    Fake.__abstractmethods__ = frozenset()
    assert m.tokenizer_fingerprint(VOCAB, (7, 0), -1) == Fake().tokenizer_fingerprint()
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
    kw = m.sampling_kwargs(SamplingParams(), max_tokens=4, stop_token_ids=[9, 4, 4], end_id=0,
                           generation_logits=True, logprobs=5)
    assert kw["stop_token_ids"] == [4, 9] and kw["include_stop_str_in_output"] is True
    assert kw["end_id"] == 0 and kw["return_generation_logits"] is True and "logprobs_mode" not in kw
    assert set(kw) | set(plain) <= TRT_FIELDS


def test_raw_logprobs_mode_by_release():
    assert m.raw_logprobs_mode(["raw", "processed"]) == "raw"
    assert m.raw_logprobs_mode(["raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs"]) == "raw_logprobs"
    assert m.raw_logprobs_mode([]) is None and m.raw_logprobs_mode(None) is None


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
