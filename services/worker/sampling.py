"""Sampling a token from logits with temperature, top-k and top-p.

Backends that expose logits (llama.cpp, sim) sample here so that a Step call can
glimpse a distribution and then sample the step's first token from that same
distribution, as the paper's regenerate-from-the-boundary does in two calls.
Top-k is applied first and top-p over the renormalised remainder (vLLM's order).

This runs once per generated token, so it avoids work proportional to the
vocabulary beyond one pass of float32 arithmetic (exp and a sum): the nucleus is
found among the tokens whose weight is within a factor of the best one, widened
until that set holds the top-p mass, so only a few hundred candidates are ever
sorted. The result is exact: a token outside the candidate set weighs less than
every candidate, so the sorted prefix that reaches top-p lies inside the set.
"""
from __future__ import annotations

import numpy as np

from services.worker.entropy import top_k_ids
from services.worker.types import SamplingParams

# Relative weights at which the candidate set is cut, tried in turn: a peaked
# distribution reaches top_p at the first cut, a flat one widens to the whole
# vocabulary (0.0).
_CUTS = (1e-3, 1e-6, 1e-12, 0.0)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.greedy:
        return int(np.argmax(logits))
    x = logits if logits.dtype == np.float32 else logits.astype(np.float32)
    inv_t = 1.0 / params.temperature
    n = x.shape[0]
    if 0 < params.top_k < n:
        cand = top_k_ids(x, params.top_k)  # ordered best first
        w = np.exp((x[cand] - x[cand[0]]).astype(np.float64) * inv_t)
        return int(cand[_nucleus_pick(w, float(w.sum()), params.top_p, rng)])
    m = float(x.max())
    # Weights relative to the best token, in (0, 1]; float32 keeps this one pass cheap.
    w = np.exp((x - np.float32(m)) * np.float32(inv_t))
    total = float(w.sum(dtype=np.float64))
    if params.top_p >= 1.0:
        cum = np.cumsum(w, dtype=np.float64)
        return int(min(np.searchsorted(cum, rng.random() * total, side="right"), n - 1))
    target = params.top_p * total
    for cut in _CUTS:
        cand = np.flatnonzero(w >= cut) if cut > 0 else np.arange(n)
        if cut == 0.0 or float(w[cand].sum(dtype=np.float64)) >= target:
            break
    cw = w[cand]
    # Heaviest first; equal weights by lower id, so the order never depends on numpy's sort.
    order = np.lexsort((cand, -cw))
    return int(cand[order[_nucleus_pick(cw[order].astype(np.float64), total, params.top_p, rng)]])


def _nucleus_pick(w: np.ndarray, total: float, top_p: float, rng: np.random.Generator) -> int:
    """Index into `w` (weights sorted heaviest first, `total` the whole mass): the
    smallest prefix whose mass reaches top_p of the total, sampled in proportion."""
    cum = np.cumsum(w)
    keep = len(w)
    if top_p < 1.0:
        keep = min(int(np.searchsorted(cum, top_p * total, side="left")) + 1, len(w))
    u = rng.random() * float(cum[keep - 1])
    return min(int(np.searchsorted(cum[:keep], u, side="right")), keep - 1)
