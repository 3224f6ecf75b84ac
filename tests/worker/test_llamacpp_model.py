"""LlamaCppModel, the batch backend, on a real model (SmolLM2-135M): every sequence
of a batch reads the logits a fresh single-sequence llama.cpp instance computes,
states move between sequences, and the vocabulary and chat template behave."""
from __future__ import annotations

import time

import llama_cpp
import numpy as np
import pytest

from services.worker.backends.llamacpp import LlamaCppModel, usable_cores
from services.worker.batch import Batch
from services.worker.types import ChatMessage

pytestmark = pytest.mark.slow

N_CTX = 1024
SYSTEM = "You are a careful math tutor. Solve the problem step by step."


@pytest.fixture(scope="module")
def model(smollm2_path):
    m = LlamaCppModel(str(smollm2_path), n_ctx=N_CTX, n_threads=2, n_seq=3)
    yield m
    m.close()


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """Logits after `tokens`, then after each of `then`, from an uninterrupted fresh run."""
    llm = llama_cpp.Llama(
        model_path=str(smollm2_path), n_ctx=N_CTX, n_threads=2, n_threads_batch=2, logits_all=False, verbose=False
    )
    n_vocab = llm.n_vocab()

    def last() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()

    def run(tokens, then=()) -> list[np.ndarray]:
        llm.reset()
        llm.eval(list(tokens))
        out = [last()]
        for t in then:
            llm.eval([t])
            out.append(last())
        return out

    yield run
    llm.close()


def same_logits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    # Batches of other sizes may move the last bits.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    assert int(np.argmax(got)) == int(np.argmax(want))


def chat(m: LlamaCppModel, question: str) -> list[int]:
    text = m.chat_template_text([ChatMessage("system", SYSTEM), ChatMessage("user", question)], True)
    return m.tokenize(text, add_bos=True)


def prefill(m: LlamaCppModel, seq: int, tokens: list[int], start: int = 0) -> np.ndarray:
    b = Batch()
    for i in range(start, len(tokens)):
        b.add(tokens[i], seq, i, i == len(tokens) - 1)
    return m.decode(b)[0].copy()


# ---- batches ----------------------------------------------------------------------------
def test_prompts_of_several_sequences_in_one_batch_match_fresh_runs(model, reference):
    prompts = [chat(model, q) for q in ("What is 12 + 30?", "Name a prime.", "How many legs has a spider?")]
    for seq in range(3):
        model.keep(seq, 0)
    b = Batch()
    for seq, p in enumerate(prompts):
        for i, t in enumerate(p):
            b.add(t, seq, i, i == len(p) - 1)
    rows = model.decode(b)
    assert rows.shape == (3, model.vocab_size)
    for row, p in zip(rows, prompts):
        same_logits(row, reference(p)[0])


def test_decoding_three_sequences_together_matches_each_alone(model, reference):
    prompts = [chat(model, q) for q in ("Count to five.", "Spell cat.", "Name three colours.")]
    logits = []
    for seq, p in enumerate(prompts):
        model.keep(seq, 0)
        logits.append(prefill(model, seq, p))
    produced: list[list[int]] = [[], [], []]
    for step in range(6):
        b = Batch()
        for seq, p in enumerate(prompts):
            produced[seq].append(int(np.argmax(logits[seq])))
            b.add(produced[seq][-1], seq, len(p) + step, True)
        logits = [row.copy() for row in model.decode(b)]
    for seq, p in enumerate(prompts):
        ref = reference(p, produced[seq])
        same_logits(logits[seq], ref[-1])
        assert produced[seq] == [int(np.argmax(r)) for r in ref[:-1]]


def test_keep_cuts_a_sequence_and_extending_it_is_exact(model, reference):
    prompt = chat(model, "Tom has 3 apples and buys 4 more. How many now?")
    longer = prompt + model.tokenize("Step 1: Tom starts with 3 apples.\n\n", add_bos=False)
    other = prompt + model.tokenize("First, count the apples.", add_bos=False)
    model.keep(0, 0)
    prefill(model, 0, longer)
    assert model.keep(0, len(prompt)) == len(prompt)
    same_logits(prefill(model, 0, other, len(prompt)), reference(other)[0])


def test_a_saved_state_restores_into_another_sequence(model, reference):
    a = chat(model, "Alice has 5 pens and gives away 2. How many are left?")
    model.keep(0, 0)
    prefill(model, 0, a)
    state = model.save(0)
    assert state is not None and state.dtype == np.uint8 and state.size > 0
    assert model.load(2, state)
    a2 = a + model.tokenize("Step 1: Alice starts with 5 pens.\n\n", add_bos=False)
    same_logits(prefill(model, 2, a2, len(a)), reference(a2)[0])


def test_an_empty_or_overfull_batch_is_refused(model):
    with pytest.raises(ValueError, match="1 to 512 tokens"):
        model.decode(Batch())
    b = Batch()
    for i in range(513):
        b.add(1, 0, i, False)
    with pytest.raises(ValueError, match="got 513"):
        model.decode(b)


def test_threads_default_to_every_usable_core(smollm2_path):
    m = LlamaCppModel(str(smollm2_path), n_ctx=256, n_threads=0, n_seq=1)
    try:
        assert m.threads == usable_cores() >= 1
        assert f"threads={m.threads} batch_threads={m.threads}" in m.describe()
    finally:
        m.close()


# ---- vocabulary, tokenizer, chat template ---------------------------------------------------
def test_token_bytes_round_trip(model):
    text = "Step 1: add 12 and 30.\n\nStep 2: é漢 — fertig 👍\n"
    ids = model.tokenize(text, add_bos=False)
    assert b"".join(model.token_bytes(t) for t in ids) == text.encode("utf-8")


def test_special_tokens_parse_and_render(model):
    ids = model.tokenize("<|im_end|>", add_bos=False)
    assert len(ids) == 1
    assert model.token_bytes(ids[0]) == b"<|im_end|>"
    assert ids[0] in model.eos_token_ids
    with pytest.raises(ValueError):
        model.token_bytes(model.vocab_size)


def test_bos_follows_the_model_metadata(model, smollm2_path):
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=64, vocab_only=True, verbose=False)
    wants_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    llm.close()
    plain = model.tokenize("Hello", add_bos=False)
    with_bos = model.tokenize("Hello", add_bos=True)
    assert with_bos == ([model.bos_token_id] + plain if wants_bos else plain)


def test_chat_template_renders_special_tokens(model):
    msgs = [ChatMessage("user", "Hi there")]
    text = model.chat_template_text(msgs, True)
    assert "<|im_start|>user\nHi there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert not model.chat_template_text(msgs, False).endswith("<|im_start|>assistant\n")
    im_start = model.tokenize("<|im_start|>", add_bos=False)
    assert len(im_start) == 1
    assert model.tokenize(text, add_bos=True).count(im_start[0]) == text.count("<|im_start|>")


def test_model_facts(model, smollm2_path):
    assert model.backend == "llamacpp"
    assert model.model_id == smollm2_path.stem
    assert model.vocab_size == 49152 and model.context_length == N_CTX and model.n_seq == 3
    assert model.think_start == model.think_end == ""  # SmolLM2 has no <think> token


def test_a_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlamaCppModel(str(tmp_path / "nope.gguf"))


def test_fresh_fingerprint_is_fast_and_stable(smollm2_path):
    m = LlamaCppModel(str(smollm2_path), n_ctx=256, n_threads=2, n_seq=1)
    try:
        t0 = time.perf_counter()
        first = m.tokenizer_fingerprint()
        assert time.perf_counter() - t0 < 2.0
        assert m.tokenizer_fingerprint() == first and len(first) == 64
    finally:
        m.close()
