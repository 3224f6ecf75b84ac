"""Entropy, sampling and step cutting: the logic every backend shares."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.worker import entropy as ent
from services.worker.sampling import sample
from services.worker.stepcut import StepCutter, boundary_token_ids
from services.worker.types import FinishReason, SamplingParams

finite = st.floats(min_value=-30, max_value=30, allow_nan=False, width=32)


def brute_entropy(logits):
    p = np.exp(np.asarray(logits, dtype=np.float64) - max(logits))
    p /= p.sum()
    return float(-sum(x * math.log(x) for x in p if x > 0))


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=2, max_size=300), st.integers(1, 40))
def test_summarize_matches_brute_force(values, k):
    logits = np.array(values, dtype=np.float32)
    d = ent.summarize(logits, k)
    assert d.entropy_full == pytest.approx(brute_entropy(logits), abs=1e-6)
    order = sorted(range(len(values)), key=lambda i: (-logits[i], i))[: min(k, len(values))]
    assert d.top_ids == order and d.greedy_id == order[0]
    top = np.array([logits[i] for i in order], dtype=np.float64)
    assert d.entropy_top_k == pytest.approx(brute_entropy(top), abs=1e-6)
    assert sum(math.exp(lp) for lp in d.top_logprobs) <= 1 + 1e-9


def test_entropy_of_uniform_and_point_mass():
    assert ent.full_entropy(np.zeros(64, dtype=np.float32)) == pytest.approx(math.log(64))
    assert ent.top_k_entropy([math.log(0.25)] * 4) == pytest.approx(math.log(4))
    peaked = np.full(1000, -1e4, dtype=np.float32)
    peaked[7] = 0
    assert ent.summarize(peaked, 20).entropy_full == pytest.approx(0.0, abs=1e-9)


def _empirical(logits, params, n=4000):
    rng = np.random.default_rng(0)
    counts = np.bincount([sample(logits, params, rng) for _ in range(n)], minlength=len(logits))
    return counts / n


def test_greedy_is_argmax_and_top_k_one_is_greedy():
    logits = np.array([0.1, 2.0, 1.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(1)
    assert sample(logits, SamplingParams(), rng) == 1
    assert all(sample(logits, SamplingParams(temperature=1.0, top_k=1), rng) == 1 for _ in range(50))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two (0.8 >= 0.75)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    freq = _empirical(logits, SamplingParams(temperature=1.0, top_p=0.75))
    assert freq[2] == 0 and freq[3] == 0
    assert freq[0] == pytest.approx(0.5 / 0.8, abs=0.04)


def test_top_p_exact_on_a_flat_vocabulary_wider_than_the_candidate_window():
    logits = np.zeros(50_000, dtype=np.float32)
    logits[:3] = 5.0
    rng = np.random.default_rng(3)
    picks = [sample(logits, SamplingParams(temperature=1.0, top_p=0.99), rng) for _ in range(300)]
    # the three peaks hold ~0.0089 of the mass: most samples come from the flat tail
    assert sum(p >= 3 for p in picks) > 250


def test_temperature_sharpens():
    logits = np.log(np.array([0.6, 0.4]))
    cold = _empirical(logits, SamplingParams(temperature=0.3))
    assert cold[0] > 0.75


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(5).normal(size=1000).astype(np.float32)
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    a = [sample(logits, p, np.random.default_rng(42)) for _ in range(5)]
    b = [sample(logits, p, np.random.default_rng(42)) for _ in range(5)]
    assert a == b


VOCAB = {0: b"Hello", 1: b" world", 2: b".\n\n", 3: b"\n\n", 4: b"\xe6\xbc", 5: b"\xa2", 6: b"STOP", 7: b"\n"}


def cut(tokens, boundary="\n\n", stops=()):
    c = StepCutter(VOCAB.__getitem__, boundary, stops)
    emitted = []
    for i, t in enumerate(tokens):
        emitted.append(c.feed(t))
        if c.done:
            return c, emitted, i
    return c, emitted, None


def test_merged_boundary_token_ends_the_step():
    c, _, at = cut([0, 1, 2, 0])
    assert c.done is FinishReason.STEP_END and at == 2 and c.text == "Hello world.\n\n"


def test_boundary_split_across_tokens():
    c, _, at = cut([0, 7, 7, 1])
    assert c.done is FinishReason.STEP_END and at == 2


def test_leading_blank_line_does_not_end_an_empty_step():
    c, _, at = cut([3, 0, 3])
    assert at == 2 and c.text == "\n\nHello\n\n"


def test_split_utf8_is_held_back_until_whole():
    c, emitted, _ = cut([4, 5])
    assert emitted == ["", "漢"] and c.text == "漢"


def test_stop_string_and_disabled_boundary():
    c, _, at = cut([0, 3, 6], boundary="", stops=("STOP",))
    assert c.done is FinishReason.STOP and c.matched_stop == "STOP" and at == 2


def test_boundary_token_ids_include_merged_tokens():
    assert boundary_token_ids(VOCAB.items(), "\n\n") == [2, 3]
