"""Entropy of a next-token distribution, shared by every backend.

The paper's reference code measures the entropy of the first token of a step
over the top-20 log-probabilities renormalised to sum to one (nats). We report
that and, where the backend exposes full logits, the entropy over the whole
vocabulary; the caller chooses which one routes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Distribution:
    greedy_id: int
    entropy_full: float
    entropy_top_k: float
    top_ids: list[int]
    top_logprobs: list[float]  # log-probabilities under the full distribution, descending


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64, copy=False) - float(np.max(logits))
    return z - math.log(float(np.exp(z).sum()))


def full_entropy(logits: np.ndarray) -> float:
    z = logits.astype(np.float64, copy=False) - float(np.max(logits))
    e = np.exp(z)
    s = float(e.sum())
    # H = -sum p log p with p = e/s and log p = z - log s
    return max(0.0, math.log(s) - float(np.dot(e, z)) / s)


def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits, largest first (ties by lower id).

    Called per token when entropies are asked for, so it avoids a partition of
    the whole vocabulary: the k largest are almost always within a few nats of
    the maximum, and only those candidates are sorted. Exact: when the window
    holds at least k tokens, every token outside it is smaller than all of them.
    """
    n = logits.shape[0]
    k = min(k, n)
    if k == n:
        idx = np.arange(n)
    else:
        idx = None
        if n > 4096:
            top = float(logits.max())
            for span in (8.0, 32.0):
                cand = np.flatnonzero(logits > top - span)
                if k <= cand.size <= 4096:
                    idx = cand
                    break
        if idx is None:
            # Ties at the cut go to the lower ids, so the result does not depend on
            # how the partition happened to order equal values.
            kth = np.partition(logits, n - k)[n - k]
            above = np.flatnonzero(logits > kth)
            idx = np.concatenate([above, np.flatnonzero(logits == kth)[: k - above.size]])
    return idx[np.lexsort((idx, -logits[idx]))][:k]


def top_k_entropy(logprobs: Sequence[float]) -> float:
    """Entropy of the given log-probabilities renormalised to sum to one."""
    if len(logprobs) == 0:
        raise ValueError("top-k entropy needs at least one log-probability")
    lp = np.asarray(logprobs, dtype=np.float64)
    lp = lp[np.isfinite(lp)]
    if lp.size == 0:
        return 0.0
    m = float(lp.max())
    e = np.exp(lp - m)
    p = e / e.sum()
    nz = p > 0
    return max(0.0, float(-(p[nz] * np.log(p[nz])).sum()))


def summarize(logits: np.ndarray, k: int) -> Distribution:
    """Everything a glimpse reports, from one logits vector.

    Runs once per glimpse over the whole vocabulary (152k for Qwen), so it stays in
    float32 for the elementwise work and accumulates the two sums in float64:
    H = log S - sum(e*z)/S with z = logits - max and e = exp(z), S = sum(e).
    """
    ids = top_k_ids(logits, k)
    x = logits if logits.dtype == np.float32 else logits.astype(np.float32)
    top = x[ids[0]]
    z = x - top
    e = np.exp(z)
    s = float(e.sum(dtype=np.float64))
    log_s = math.log(s)
    h_full = max(0.0, log_s - float(np.multiply(e, z).sum(dtype=np.float64)) / s)
    # From the same float32 weights as S, so the top probabilities sum to at most 1.
    top_lp = [math.log(w) - log_s if w > 0 else float(z[i]) - log_s for i, w in zip(ids, e[ids].astype(np.float64))]
    return Distribution(
        greedy_id=int(ids[0]),
        entropy_full=h_full,
        entropy_top_k=top_k_entropy(top_lp),
        top_ids=[int(i) for i in ids],
        top_logprobs=top_lp,
    )
