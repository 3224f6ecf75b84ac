"""The simulator backend through the real scheduler: scripted steps, hard step
starts with high entropy, shared tokenizer, simulated latency."""
from __future__ import annotations

import time

import pytest

from services.worker.backends.sim import BOUNDARY, IM_START, SimModel
from services.worker.engine import CancelToken
from services.worker.batch import Batch
from services.worker.scheduler import Scheduler
from services.worker.types import (
    ChatMessage,
    Decision,
    EntropyMethod,
    FinishReason,
    Gate,
    GenerateRequest,
    SamplingParams,
    StopParams,
)

GREEDY = SamplingParams(max_tokens=64)


async def _engine(**kw) -> Scheduler:
    engine = Scheduler(SimModel(**kw))
    await engine.start()
    return engine


def _prompt(engine: Scheduler) -> list[int]:
    return engine.render_prompt([ChatMessage("user", "Tom has 3 bags.\n\nHow many?")], True, False)[0]


async def _generate(engine: Scheduler, prompt: list[int], stop: StopParams = StopParams()):
    final = None
    async for chunk in engine.generate(GenerateRequest(prompt, GREEDY, stop, "large"), CancelToken()):
        final = chunk.final or final
    return final


async def test_hard_steps_escalate_and_easy_steps_are_kept():
    small = await _engine(model_id="sim-small", seed=1, steps=4, hard_steps={1, 3})
    large = await _engine(model_id="sim-large", seed=2, steps=4)
    prompt = _prompt(small)
    for step in range(4):
        g = await small.glimpse(prompt, 20, "s", CancelToken())
        if step in (1, 3):
            assert g.entropy_full > 4.0 and g.entropy_top_k > 2.9
        else:
            assert g.entropy_full < 0.1 and g.entropy_top_k < 0.1
        r = await small.step_full(GenerateRequest(prompt, GREEDY, StopParams(), "s"), Gate(EntropyMethod.TOP_K, 1.0), CancelToken())
        if step in (1, 3):
            assert r.decision is Decision.ESCALATE and r.generation is None
            gen = await _generate(large, prompt)  # the large sim takes the step
        else:
            assert r.decision is Decision.KEEP
            gen = r.generation
        assert gen.finish_reason is FinishReason.STEP_END
        assert gen.text.endswith("\n\n") and gen.text.strip()
        assert len(gen.token_ids) == 8
        prompt = prompt + gen.token_ids
    # After `steps` steps the thinking ends, a short answer follows, then EOS.
    final = await _generate(small, prompt, StopParams(step_boundary=""))
    assert final.text.startswith("</think>")
    assert final.finish_reason is FinishReason.EOS
    assert len(final.token_ids) == 1 + 4 + 1
    await small.close()
    await large.close()


async def test_same_vocabulary_same_fingerprint():
    a = await _engine(model_id="a", seed=1)
    b = await _engine(model_id="b", seed=99, step_tokens=5)
    assert a.info.tokenizer_fingerprint == b.info.tokenizer_fingerprint
    assert a.info.vocab_size == 512 and a.info.backend == "sim"
    assert a.info.has_chat_template and a.info.think_end == "</think>"
    await a.close()
    await b.close()


def test_tokenizer_round_trip_and_specials():
    m = SimModel()
    text = "<|im_start|>user\nThe total is 42 apples, naïve?\n\n"
    ids = m.tokenize(text, add_bos=False)
    assert ids[0] == IM_START and ids[-1] == BOUNDARY
    assert b"".join(m.token_bytes(t) for t in ids).decode() == text
    assert len(m.tokenize(" the the", add_bos=False)) == 2  # word pieces, not bytes
    assert m.tokenize("x", add_bos=True)[0] == m.bos_token_id


def _decode(m: SimModel, seq: int, tokens: list[int], start: int):
    """Put tokens[start:] into `seq` at their positions; the logits after the last one."""
    b = Batch()
    for i in range(start, len(tokens)):
        b.add(tokens[i], seq, i, i == len(tokens) - 1)
    return m.decode(b)[0]


def test_scripts_are_a_function_of_the_tokens():
    # Same seed: decoding one token at a time, restoring a saved state, and prefilling
    # from scratch (in another sequence, of another model) agree.
    a, c = SimModel(seed=3, steps=3, step_tokens=4, n_seq=2), SimModel(seed=3, n_seq=1)
    c.steps, c.step_tokens = 3, 4
    ctx = a.tokenize("<|im_start|>user\nq\n\n<|im_end|>\n<|im_start|>assistant\n<think>", add_bos=False)
    logits = _decode(a, 0, ctx, 0)
    for i in range(22):
        tok = int(logits.argmax())
        ctx.append(tok)
        logits = _decode(a, 0, ctx, len(ctx) - 1)
        assert a.load(1, a.save(0)) and a.keep(1, len(ctx) - 1) == len(ctx) - 1
        assert (_decode(a, 1, ctx, len(ctx) - 1) == logits).all()
        c.keep(0, 0)
        assert (_decode(c, 0, ctx, 0) == logits).all()
    assert a.token_bytes(ctx[-1]) == b"<|sim_eos|>"


def test_a_batch_must_extend_each_sequence_in_order():
    m = SimModel(n_seq=2)
    _decode(m, 0, [1, 2, 3], 0)
    b = Batch()
    b.add(4, 0, 5, True)  # position 3 is next
    with pytest.raises(ValueError, match="position 5"):
        m.decode(b)


async def test_scheduler_reports_the_cached_prefix():
    engine = await _engine(n_seq=1)
    ctx = engine.tokenize("<|im_start|>user\nhello<|im_end|>\n", add_bos=False)
    assert (await engine.glimpse(ctx, 20, "s1", CancelToken())).usage.cached_tokens == 0
    assert (await engine.glimpse(ctx + [7], 20, "s1", CancelToken())).usage.cached_tokens == len(ctx)
    other = engine.tokenize("<|im_start|>system\nbe brief", add_bos=False)
    assert (await engine.glimpse(other, 20, "s2", CancelToken())).usage.cached_tokens == 1  # only <|im_start|> is shared
    # s1 left the only sequence for s2; its saved state comes back.
    assert (await engine.glimpse(ctx + [7, 8], 20, "s1", CancelToken())).usage.cached_tokens == len(ctx) + 1
    assert engine.stats.restores == 1
    await engine.close()


def test_hard_fraction_is_seeded():
    m = SimModel(seed=5, hard_fraction=0.3)
    hard = [m.is_hard(i) for i in range(2000)]
    assert hard == [SimModel(seed=5, hard_fraction=0.3).is_hard(i) for i in range(2000)]
    assert 0.25 < sum(hard) / len(hard) < 0.35
    assert hard != [SimModel(seed=6, hard_fraction=0.3).is_hard(i) for i in range(2000)]
    # Listed steps are hard on top of the drawn ones; by default no step is hard.
    both = SimModel(seed=5, hard_fraction=0.3, hard_steps={0, 1, 2})
    assert [both.is_hard(i) for i in range(2000)] == [i < 3 or h for i, h in enumerate(hard)]
    assert not any(SimModel().is_hard(i) for i in range(100))


async def test_token_latency_is_honoured():
    engine = await _engine(token_latency_s=0.02)
    prompt = _prompt(engine)
    t0 = time.perf_counter()
    r = await engine.step_full(GenerateRequest(prompt, GREEDY, StopParams(), "s"), Gate(EntropyMethod.TOP_K, 1.0), CancelToken())
    elapsed = time.perf_counter() - t0
    # 8 tokens: the first comes from the prefill batch, 7 decode batches sleep.
    assert r.decision is Decision.KEEP and len(r.generation.token_ids) == 8
    assert 0.13 <= elapsed < 2.0
    await engine.close()


@pytest.mark.parametrize("steps", [200])
async def test_fast_enough_for_router_load_tests(steps):
    engine = await _engine(steps=10**6)
    prompt = _prompt(engine)
    t0 = time.perf_counter()
    for _ in range(steps):
        r = await engine.step_full(GenerateRequest(prompt, GREEDY, StopParams(), "s"), Gate(EntropyMethod.TOP_K, 1.0), CancelToken())
        prompt = prompt + r.generation.token_ids
    rate = steps / (time.perf_counter() - t0)
    assert rate > 100, f"{rate:.0f} steps/s"  # loose: the machine is shared; ~thousands when idle
    await engine.close()
