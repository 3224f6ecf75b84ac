"""The paper's ablation: route on the mean entropy over the small model's whole step."""
from __future__ import annotations

from services.router.api.types import Role
from services.router.policies.base import Policy, StepContext, StepOutcome


class StepEntropy(Policy):
    name = "step-entropy"
    summary = "the small model writes the step; mean token entropy >= threshold has the large model rewrite it"
    signal = "step_mean_entropy"
    uses_threshold = True

    async def write_step(self, ctx: StepContext) -> StepOutcome:
        draft = await ctx.draft(Role.SMALL, return_entropies=True)
        h = sum(draft.entropies) / len(draft.entropies) if draft.entropies else 0.0
        if h < self.threshold:
            await ctx.keep(Role.SMALL, draft, h, self.threshold)
            return StepOutcome(Role.SMALL, draft, h, self.threshold)
        rewrite = await ctx.write(Role.LARGE, h, self.threshold)
        return StepOutcome(Role.LARGE, rewrite, h, self.threshold, discarded_tokens=len(draft.token_ids))
