"""AUROC against the pairwise definition, and the other small statistics."""
from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from evaluation import stats


def brute_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# Few distinct values, so ties are common.
scores_labels = st.lists(
    st.tuples(st.sampled_from([0.0, 0.1, 0.5, 0.5, 1.0, 2.5, 3.0]) | st.floats(0, 5, allow_nan=False), st.booleans()),
    min_size=2, max_size=60,
).filter(lambda xs: any(y for _, y in xs) and not all(y for _, y in xs))


@given(scores_labels)
def test_auroc_matches_pairwise_count(xs):
    scores, labels = zip(*xs)
    assert math.isclose(stats.auroc(scores, labels), brute_auroc(scores, labels), abs_tol=1e-12)


@given(scores_labels)
def test_auroc_flips_with_the_labels(xs):
    scores, labels = zip(*xs)
    flipped = [not y for y in labels]
    assert math.isclose(stats.auroc(scores, labels) + stats.auroc(scores, flipped), 1.0, abs_tol=1e-12)


def test_auroc_edges():
    assert stats.auroc([1, 2, 3], [False, False, True]) == 1.0
    assert stats.auroc([3, 2, 1], [False, False, True]) == 0.0
    assert stats.auroc([1, 1], [True, False]) == 0.5
    assert stats.auroc([1, 2], [True, True]) is None  # one class: undefined
    assert stats.auroc([], []) is None


@given(scores_labels)
def test_roc_curve_area_is_the_auroc(xs):
    scores, labels = zip(*xs)
    fpr, tpr = stats.roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    area = sum((fpr[i] - fpr[i - 1]) * (tpr[i] + tpr[i - 1]) / 2 for i in range(1, len(fpr)))
    assert math.isclose(area, stats.auroc(scores, labels), abs_tol=1e-9)


def test_quantile_interpolates_like_numpy():
    import numpy as np

    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert math.isclose(stats.quantile(xs, q), float(np.quantile(xs, q)))
    assert math.isnan(stats.quantile([], 0.5))


def test_pareto_front():
    pts = {"large": (10.0, 0.8), "small": (2.0, 0.4), "g1": (5.0, 0.8), "g2": (6.0, 0.7), "g3": (3.0, 0.4)}
    # g1 beats large (faster, as accurate); g2 is beaten by g1; g3 by small.
    assert stats.pareto_front(pts) == {"small", "g1"}


def test_tau_for_share_sends_that_share_above():
    h = [i / 100 for i in range(100)]
    tau = stats.tau_for_share(h, 0.25)
    assert sum(1 for x in h if x >= tau) == 25
