"""SpecReason-style verification: the small model drafts the whole step, the large
model scores it with one token 0-9, and rewrites it when the score is too low."""
from __future__ import annotations

import math

from services.router.api.types import Role
from services.router.policies.base import Param, Policy, StepContext, StepOutcome

# Appended after the draft, only for scoring (never part of the session's prefix).
JUDGE_TEXT = (
    "\n\nHow good is the last reasoning step above? Answer with one digit from 0 (wrong or useless)"
    " to 9 (correct and useful).\nThe quality score is: "
)


def score_of(top) -> float:
    """The most likely single-digit token among the top tokens; 0 (the lowest score)
    when the judge offers no digit: a draft nobody vouched for is not kept."""
    best, best_lp = 0.0, -math.inf
    for t in top:
        s = t.text.strip()
        if len(s) == 1 and s.isdigit() and t.logprob > best_lp:
            best, best_lp = float(s), t.logprob
    return best


class Verify(Policy):
    name = "verify"
    summary = "the small model drafts the step; the large model scores it 0-9 and rewrites it below accept_score"
    signal = "verify_score"
    params = {
        "accept_score": Param(7.0, lambda v: 0.0 <= v <= 10.0, "in [0, 10]", "lowest score whose draft is kept"),
        "top_k": Param(10.0, lambda v: 1.0 <= v <= 100.0 and v == int(v), "an integer in [1, 100]", "tokens the score is read from"),
    }

    def label(self, writer: Role) -> str:
        # The large model accepted the draft, or rejected (and rewrote) it.
        return "accept" if writer is Role.SMALL else "reject"

    async def write_step(self, ctx: StepContext) -> StepOutcome:
        draft = await ctx.draft(Role.SMALL)
        scored = await ctx.score(draft, JUDGE_TEXT, int(self.p["top_k"]))
        score, accept = score_of(scored.top), self.p["accept_score"]
        if score >= accept:
            await ctx.keep(Role.SMALL, draft, score, accept)
            return StepOutcome(Role.SMALL, draft, score, accept)
        rewrite = await ctx.write(Role.LARGE, score, accept)
        return StepOutcome(Role.LARGE, rewrite, score, accept, discarded_tokens=len(draft.token_ids))
