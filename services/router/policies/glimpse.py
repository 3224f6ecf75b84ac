"""GlimpRouter: route on the small model's first-token entropy (static or tracked tau)."""
from __future__ import annotations

import bisect
import math

from services.router.policies.base import Param, Policy, StepContext, StepOutcome, route_by_glimpse


class Glimpse(Policy):
    name = "glimpse"
    summary = "the small model glimpses one token; entropy >= threshold sends the step to the large model"
    signal = "glimpse_entropy"
    uses_threshold = True

    async def write_step(self, ctx: StepContext) -> StepOutcome:
        return await route_by_glimpse(ctx, self.threshold)


class Adaptive(Policy):
    """Glimpse with tau set before every step to hold a target share of large steps.

    tau_t = Q_t + c_t, where Q_t is the k-th largest of the session's earlier glimpse
    entropies (k = ceil(target * n): the cut that would have sent a `target` share
    of them to the large model; the starting threshold before any glimpse), and
    c_t = eta * sum_{i<t} (escalated_i - target) is an integral correction for what
    a quantile cannot do alone: ties (many steps with the same entropy) and drift.
    Summed over T steps, share = target + c_T / (eta * T), and c_T stays bounded
    (tau beyond every entropy drives it back), so the realised share converges to
    the target at rate 1/T whatever the entropy distribution. The track is
    recomputed from the session's step log, so a resumed session continues it.
    The session is the unit: tau adapts to one problem's own entropy scale.
    """

    name = "adaptive"
    summary = "glimpse with tau tracked online to hold a target share of large-model steps"
    signal = "glimpse_entropy"
    uses_threshold = True  # the starting tau
    params = {
        "target": Param(0.25, lambda v: 0.0 < v < 1.0, "in (0, 1)", "share of steps the large model should write"),
        "eta": Param(0.5, lambda v: v > 0.0, "> 0", "nats the correction moves tau per step of error"),
        "window": Param(0.0, lambda v: v >= 0 and v == int(v), "an integer >= 0", "glimpses the quantile looks back on (0: all)"),
    }

    def __init__(self, threshold: float, params: dict[str, float]) -> None:
        super().__init__(threshold, params)
        # The track, updated with each new step of the history (never rescanned).
        self._seen = 0
        self._values: list[float] = []  # glimpse entropies in order
        self._sorted: list[float] = []  # the window's entropies, sorted
        self._correction = 0.0

    def _catch_up(self, history) -> None:
        target, window = self.p["target"], int(self.p["window"])
        for r in history[self._seen:]:
            if not r.glimpses or math.isnan(r.entropy):
                continue
            self._correction += self.p["eta"] * ((1.0 if r.decision == "large" else 0.0) - target)
            self._values.append(r.entropy)
            bisect.insort(self._sorted, r.entropy)
            if window and len(self._sorted) > window:
                del self._sorted[bisect.bisect_left(self._sorted, self._values[-window - 1])]
        self._seen = len(history)

    def current_tau(self, ctx: StepContext) -> float:
        self._catch_up(ctx.history)
        if not self._sorted:
            return self.threshold
        k = max(1, math.ceil(self.p["target"] * len(self._sorted)))
        return self._sorted[-k] + self._correction

    async def write_step(self, ctx: StepContext) -> StepOutcome:
        return await route_by_glimpse(ctx, self.current_tau(ctx))
