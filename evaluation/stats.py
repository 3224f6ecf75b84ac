"""Small statistics the evaluation needs, written out so their definitions are explicit."""
from __future__ import annotations

import math
from typing import Sequence


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of `scores` for the positive labels: the
    probability that a random positive scores above a random negative, ties
    counting one half (the Mann-Whitney U statistic over n_pos * n_neg).
    None when either class is empty (the area is undefined)."""
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")
    pairs = sorted(zip(scores, labels), key=lambda p: p[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # Average ranks (1-based) over runs of tied scores.
    rank_sum_pos = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1
        rank_sum_pos += avg_rank * sum(1 for k in range(i, j + 1) if pairs[k][1])
        i = j + 1
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[list[float], list[float]]:
    """False and true positive rates as the threshold sweeps down through the scores."""
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    fpr, tpr = [0.0], [0.0]
    if n_pos == 0 or n_neg == 0:
        return fpr, tpr
    pairs = sorted(zip(scores, labels), key=lambda p: -p[0])
    tp = fp = 0
    for k, (s, y) in enumerate(pairs):
        tp += y
        fp += not y
        if k + 1 == len(pairs) or pairs[k + 1][0] != s:  # one point per distinct threshold
            fpr.append(fp / n_neg)
            tpr.append(tp / n_pos)
    return fpr, tpr


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    v = sorted(x for x in xs if not math.isnan(x))
    if not v:
        return math.nan
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def mean(xs: Sequence[float]) -> float:
    v = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def binomial_se(k: int, n: int) -> float:
    if n == 0:
        return math.nan
    p = k / n
    return math.sqrt(p * (1 - p) / n)


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names of the (latency, accuracy) points no other point beats: none has lower or
    equal latency and higher or equal accuracy with one of them strict."""
    front = set()
    for name, (lat, acc) in points.items():
        if math.isnan(lat) or math.isnan(acc):
            continue
        dominated = any(
            (l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc)
            for other, (l2, a2) in points.items()
            if other != name and not (math.isnan(l2) or math.isnan(a2))
        )
        if not dominated:
            front.add(name)
    return front


def tau_for_share(entropies: Sequence[float], share: float) -> float:
    """The threshold that would have sent `share` of these glimpses to the large model
    (entropy >= tau escalates): the (1 - share) quantile, ties aside."""
    return quantile(entropies, 1.0 - share)
