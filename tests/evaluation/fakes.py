"""A stand-in router for runner tests: answers instantly from a script."""
from __future__ import annotations

import math

from services.router.api import Decision, Done, PrefixMode, Role, RoleStats, Started, Stats, Step
from services.router.api.client import Reply


def response(answer: str, roles: list[str], entropies: list[float] | None = None, *, tokens: int = 10,
             latency_ms: float = 5.0) -> Reply:
    steps = []
    for i, role in enumerate(roles):
        h = entropies[i] if entropies else math.nan
        steps.append(Step(index=i, role=Role(role), decision=Decision(role), entropy=h, threshold=0.9,
                          text=f"step {i}\n\n", tokens=tokens, latency_ms=latency_ms, worker_ms=latency_ms - 1,
                          token_ids=list(range(tokens)),
                          # The first step prefills the prompt; a step after a switch what the other model wrote.
                          critical_prefill_tokens=40 if i == 0 else (tokens if role != roles[i - 1] else 1),
                          critical_prefill_ms=0.5 * (40 if i == 0 else (tokens if role != roles[i - 1] else 1))))
    n_large = roles.count("large")
    stats = Stats(
        latency_ms=latency_ms * len(roles), steps=len(roles), intervention_rate=n_large / len(roles),
        small=RoleStats(steps=len(roles) - n_large, generated_tokens=tokens * (len(roles) - n_large),
                        glimpses=len(entropies or [])),
        large=RoleStats(steps=n_large, generated_tokens=tokens * n_large),
        thinking_end="eos",
    )
    return Reply(Started("s", prefix_mode=PrefixMode.TOKENS), steps, Done("s", answer, stats), first_text_s=0.01,
                 token_gaps_s=[0.002] * len(roles))


class FakeRouter:
    """Answers each problem correctly under large-only, wrongly otherwise; can raise
    KeyboardInterrupt (as Ctrl-C would) during the call numbered `interrupt_at`."""

    def __init__(self, answers: dict[str, str], interrupt_at: int | None = None) -> None:
        self.answers = answers
        self.calls: list[tuple[str, float, str, int]] = []  # policy, threshold, problem, seed
        self.routings: list = []  # each call's RoutingOptions
        self.interrupt_at = interrupt_at

    def reason(self, req, timeout_s: float) -> Reply:
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        question = req.messages[0].content
        pid = next(p for p, q in self.answers.items() if q[0] in question)
        self.calls.append((req.routing.policy, round(req.routing.threshold or 0.0, 6), pid, req.sampling.seed))
        self.routings.append(req.routing)
        gold = self.answers[pid][1]
        if req.routing.policy == "large-only":
            return response(f"so \\boxed{{{gold}}}", ["large"] * 3)
        return response("so \\boxed{-1}", ["small", "large", "small"], [0.2, 1.5, 0.1])
