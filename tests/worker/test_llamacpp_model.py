"""LlamaCppModel on a real model (SmolLM2-135M): KV reuse, per-session snapshots,
vocabulary and chat template. Logits are checked against a separate llama.cpp
instance that evaluates every prompt from scratch."""
from __future__ import annotations

import time

import llama_cpp
import numpy as np
import pytest

from services.worker.backends.llamacpp import LlamaCppModel
from services.worker.engine import CancelToken
from services.worker.logits_engine import LogitsEngine
from services.worker.types import ChatMessage, SamplingParams, StopParams

pytestmark = pytest.mark.slow

N_CTX = 1024
SYSTEM = "You are a careful math tutor. Solve the problem step by step."


def load(path, **kw) -> LlamaCppModel:
    return LlamaCppModel(str(path), n_ctx=N_CTX, n_threads=2, **kw)


@pytest.fixture(scope="module")
def model(smollm2_path):
    m = load(smollm2_path)
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
    # KV reuse changes how positions are batched, which may move the last bits.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    assert int(np.argmax(got)) == int(np.argmax(want))


def chat(m: LlamaCppModel, question: str) -> list[int]:
    text = m.chat_template_text([ChatMessage("system", SYSTEM), ChatMessage("user", question)], True)
    return m.tokenize(text, add_bos=True)


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---- KV reuse within one session ------------------------------------------------------
def test_prefill_matches_fresh_evaluation(model, reference):
    tokens = chat(model, "What is 12 + 30?")
    pre = model.prefill("fresh", tokens)
    assert pre.logits.shape == (model.vocab_size,)
    same_logits(pre.logits, reference(tokens)[0])
    assert list(model.context_tokens) == tokens


def test_extending_a_prompt_evaluates_only_the_new_tokens(model, reference):
    prompt = chat(model, "Tom has 3 apples and buys 4 more. How many now?")
    model.prefill("extend", prompt)
    longer = prompt + model.tokenize("Step 1: Tom starts with 3 apples.\n\n", add_bos=False)
    before = model.stats.evaluated_tokens
    pre = model.prefill("extend", longer)
    assert pre.cached_tokens == len(prompt)
    assert model.stats.evaluated_tokens - before == len(longer) - len(prompt)
    same_logits(pre.logits, reference(longer)[0])


def test_repeated_prompt_reuses_its_logits_without_evaluating(model, reference):
    tokens = chat(model, "Name a prime number.")
    model.prefill("repeat", tokens)
    before = model.stats.evaluated_tokens
    pre = model.prefill("repeat", tokens)
    assert pre.cached_tokens == len(tokens)
    assert model.stats.evaluated_tokens - before == 0
    same_logits(pre.logits, reference(tokens)[0])


def test_prompt_cached_but_past_its_logits_reevaluates_only_its_last_token(model, reference):
    tokens = chat(model, "Name a prime number.")
    model.prefill("repeat", tokens)
    model.decode(int(np.argmax(model.prefill("repeat", tokens).logits)))
    before = model.stats.evaluated_tokens
    pre = model.prefill("repeat", tokens)
    assert pre.cached_tokens == len(tokens) - 1
    assert model.stats.evaluated_tokens - before == 1
    same_logits(pre.logits, reference(tokens)[0])


def test_kv_reuse_off_evaluates_everything(smollm2_path, reference):
    cold = LlamaCppModel(str(smollm2_path), n_ctx=1024, n_threads=2, kv_reuse=False)
    tokens = chat(cold, "Name a prime number.")
    cold.prefill("s", tokens)
    before = cold.stats.evaluated_tokens
    pre = cold.prefill("s", tokens + cold.tokenize(" Two", add_bos=False))
    assert pre.cached_tokens == 0 and cold.stats.evaluated_tokens - before == len(tokens) + 1
    cold.close()


def test_diverging_prompt_keeps_only_the_common_prefix(model, reference):
    prompt = chat(model, "What is 7 times 8?")
    first = prompt + model.tokenize("Seven eights are fifty-six.", add_bos=False)
    second = prompt + model.tokenize("Multiply 7 by 8 to get 56.", add_bos=False)
    shared = common_prefix(first, second)
    assert len(prompt) <= shared < len(second)
    model.prefill("diverge", first)
    pre = model.prefill("diverge", second)
    assert pre.cached_tokens == shared
    same_logits(pre.logits, reference(second)[0])
    assert list(model.context_tokens) == second


def test_decode_matches_an_uninterrupted_run(model, reference):
    tokens = chat(model, "Count from one to five.")
    logits = model.prefill("decode", tokens).logits
    produced, got = [], [logits]
    for _ in range(6):
        produced.append(int(np.argmax(logits)))
        logits = model.decode(produced[-1])
        got.append(logits)
    for g, w in zip(got, reference(tokens, produced)):
        same_logits(g, w)


# ---- interleaved sessions ---------------------------------------------------------------
def test_interleaved_sessions_restore_their_own_prefix(model, reference):
    a = chat(model, "Alice has 5 pens and gives away 2. How many are left?")
    b = chat(model, "A train travels 60 km in 1 hour. How far in 3 hours?")
    shared = common_prefix(a, b)
    assert 0 < shared < min(len(a), len(b))
    model.prefill("A", a)
    # B has no snapshot yet: it reuses the system prompt A left in the context.
    assert model.prefill("B", b).cached_tokens == shared

    a2 = a + model.tokenize("Step 1: Alice starts with 5 pens.\n\n", add_bos=False)
    b2 = b + model.tokenize("Step 1: the speed is 60 km per hour.\n\n", add_bos=False)
    restores, evaluated = model.stats.restores, model.stats.evaluated_tokens
    pre_a = model.prefill("A", a2)
    assert pre_a.cached_tokens == len(a)
    assert model.stats.evaluated_tokens - evaluated == len(a2) - len(a)
    same_logits(pre_a.logits, reference(a2)[0])

    pre_b = model.prefill("B", b2)
    assert pre_b.cached_tokens == len(b)
    assert model.stats.restores - restores == 2

    # Continue B greedily after its restore: same as never having left it.
    logits, produced, got = pre_b.logits, [], [pre_b.logits]
    for _ in range(5):
        produced.append(int(np.argmax(logits)))
        logits = model.decode(produced[-1])
        got.append(logits)
    for g, w in zip(got, reference(b2, produced)):
        same_logits(g, w)


def test_unchanged_session_is_not_snapshotted_again(model):
    c = chat(model, "What is half of 18?")
    d = chat(model, "Is 21 divisible by 3?")
    model.prefill("C", c)
    snaps = model.stats.snapshots
    model.prefill("D", d)  # snapshots C
    assert model.prefill("C", c).cached_tokens == len(c) - 1  # snapshots D, restores C
    assert model.prefill("D", d).cached_tokens == len(d) - 1  # C unchanged: no new snapshot
    assert model.stats.snapshots - snaps == 2


def test_anonymous_request_does_not_lose_the_session_state(model, reference):
    s = chat(model, "How many legs do three cats have?")
    model.prefill("S", s)
    model.prefill("", model.tokenize("Unrelated text without a session.", add_bos=True))
    s2 = s + model.tokenize("Step 1: a cat has 4 legs.\n\n", add_bos=False)
    pre = model.prefill("S", s2)
    assert pre.cached_tokens == len(s)
    same_logits(pre.logits, reference(s2)[0])


def equal_length_prompts(m: LlamaCppModel, n: int) -> list[list[int]]:
    texts = [
        "Apples grow on trees in orchards and ripen in the autumn months of the year " * 4,
        "Bicycles have two wheels, a chain and pedals that turn the rear wheel forward " * 4,
        "Copper conducts electricity well, which is why wires are usually made from it " * 4,
    ]
    # No BOS, so the prompts share no prefix at all and a miss means cached 0.
    prompts = [m.tokenize(t, add_bos=False)[:n] for t in texts]
    assert len({p[0] for p in prompts}) == 3 and all(len(p) == n for p in prompts)
    return prompts


def test_lru_eviction_drops_the_least_recently_used_session(smollm2_path, reference):
    m = load(smollm2_path)
    try:
        a, b, c = equal_length_prompts(m, 48)
        step = m.tokenize(" So the answer follows.\n\n", add_bos=False)
        m.prefill("A", a)
        m.prefill("B", b)  # snapshots A
        one = m.cached_bytes
        assert one > 0
        m.kv_cache_bytes = int(2.5 * one)  # room for two snapshots of this length
        m.prefill("C", c)  # snapshots B
        assert m.prefill("B", b + step).cached_tokens == len(b)  # snapshots C, evicting A
        assert m.stats.evictions == 1 and m.cached_bytes <= m.kv_cache_bytes
        a2 = a + step
        pre = m.prefill("A", a2)
        assert pre.cached_tokens == common_prefix(b + step, a2) == 0
        same_logits(pre.logits, reference(a2)[0])
    finally:
        m.close()


def test_tiny_kv_budget_keeps_no_snapshot_and_stays_correct(smollm2_path, reference):
    m = load(smollm2_path, kv_cache_bytes=1)
    try:
        a, b, _ = equal_length_prompts(m, 40)
        m.prefill("A", a)
        m.prefill("B", b)
        assert m.cached_bytes == 0
        a2 = a + m.tokenize(" More text.", add_bos=False)
        pre = m.prefill("A", a2)
        assert pre.cached_tokens == 0
        same_logits(pre.logits, reference(a2)[0])
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


def test_bos_follows_the_model_metadata(model):
    wants_bos = model._llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
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
    assert model.vocab_size == 49152 and model.context_length == N_CTX
    assert model.think_start == model.think_end == ""  # SmolLM2 has no <think> token


def test_context_overflow_is_rejected(model):
    with pytest.raises(ValueError, match="exceeds the context"):
        model.prefill("overflow", [model.bos_token_id] * (N_CTX + 1))
    with pytest.raises(ValueError):
        model.prefill("overflow", [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.prefill("overflow", [model.vocab_size])


def test_fresh_fingerprint_is_fast_and_stable(smollm2_path):
    m = load(smollm2_path)
    try:
        t0 = time.perf_counter()
        first = m.tokenizer_fingerprint()
        assert time.perf_counter() - t0 < 2.0
        assert m.tokenizer_fingerprint() == first and len(first) == 64
    finally:
        m.close()


# ---- through the LogitsEngine ----------------------------------------------------------------
async def test_engine_generates_the_reference_greedy_tokens(smollm2_path, reference):
    engine = LogitsEngine(load(smollm2_path))
    await engine.start()
    try:
        assert engine.info.has_chat_template and engine.info.vocab_size == 49152
        prompt, _ = engine.render_prompt([ChatMessage("user", "Say hello.")], True, False)
        stop = StopParams(step_boundary="", stop_on_eos=False)
        chunks = [c async for c in engine.generate(prompt, SamplingParams(max_tokens=6), stop, "g", CancelToken())]
        final = chunks[-1].final
        want: list[int] = []
        for _ in range(6):
            want.append(int(np.argmax(reference(prompt + want)[0])))
        assert final.token_ids == want
        assert final.usage.prompt_tokens == len(prompt)
    finally:
        await engine.close()
