"""Sampling a token from logits with temperature, top-k and top-p.

Backends that expose logits (llama.cpp, sim) sample here so that a Step call can
glimpse a distribution and then sample the step's first token from that same
distribution, as the paper's regenerate-from-the-boundary does in two calls.
Top-k is applied first and top-p over the renormalised remainder (vLLM's order).
"""
from __future__ import annotations

import numpy as np

from services.worker.entropy import top_k_ids
from services.worker.types import SamplingParams

# Candidates looked at before widening: sorting 150k logits per token would cost
# more than a decode step of a small model; a peaked distribution reaches top_p
# within a few thousand tokens, and a flat one widens until it is exact.
_CANDIDATES = 2048


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    n = z.shape[0]
    if 0 < params.top_k < n:
        cand = top_k_ids(z, params.top_k)
        w = np.exp(z[cand] - z[cand[0]])
        total = float(w.sum())
    elif params.top_p >= 1.0:
        w = np.exp(z - z.max())
        return int(rng.choice(n, p=w / w.sum()))
    else:
        top = float(z.max())
        total = float(np.exp(z - top).sum())
        take = min(_CANDIDATES, n)
        while True:
            cand = top_k_ids(z, take)
            w = np.exp(z[cand] - top)
            if float(w.sum()) / total >= params.top_p or take == n:
                break
            take = min(take * 8, n)
    keep = len(cand)
    if params.top_p < 1.0:
        cum = np.cumsum(w) / total
        keep = min(int(np.searchsorted(cum, params.top_p, side="left")) + 1, len(cand))
    probs = w[:keep] / w[:keep].sum()
    return int(cand[rng.choice(keep, p=probs)])
