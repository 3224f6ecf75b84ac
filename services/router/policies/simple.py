"""Baselines that read no model signal: one model only, or a coin flip."""
from __future__ import annotations

import random

from services.router.api.types import Role
from services.router.policies.base import Param, Policy, StepContext, StepOutcome


class LargeOnly(Policy):
    name = "large-only"
    summary = "the large model writes every step"
    reads = frozenset({Role.LARGE})
    first = Role.LARGE

    async def write_step(self, ctx: StepContext) -> StepOutcome:
        return StepOutcome(Role.LARGE, await ctx.write(Role.LARGE))


class SmallOnly(Policy):
    name = "small-only"
    summary = "the small model writes every step"
    reads = frozenset({Role.SMALL})

    async def write_step(self, ctx: StepContext) -> StepOutcome:
        return StepOutcome(Role.SMALL, await ctx.write(Role.SMALL))


class RandomPolicy(Policy):
    name = "random"
    summary = "the large model writes a step with probability p"
    signal = "random_draw"
    first = None  # the coin decides who is called
    params = {"p": Param(0.25, lambda v: 0.0 <= v <= 1.0, "in [0, 1]", "probability that a step goes to the large model")}

    async def write_step(self, ctx: StepContext) -> StepOutcome:
        # Seeded by the step's seed so a resumed session flips the same coins.
        draw = random.Random(ctx.seed).random()
        writer = Role.LARGE if draw < self.p["p"] else Role.SMALL
        return StepOutcome(writer, await ctx.write(writer, draw, self.p["p"]), draw, self.p["p"])
