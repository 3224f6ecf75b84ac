"""A stand-in router for runner tests: answers instantly from a script."""
from __future__ import annotations

import math

from glimprouter.v1 import router_pb2 as pb


def response(answer: str, roles: list[str], entropies: list[float] | None = None, *, tokens: int = 10,
             latency_ms: float = 5.0) -> pb.ReasonResponse:
    steps = []
    for i, role in enumerate(roles):
        h = entropies[i] if entropies else math.nan
        steps.append(pb.StepEvent(index=i, role=pb.ROLE_LARGE if role == "large" else pb.ROLE_SMALL,
                                  decision=pb.DECISION_LARGE if role == "large" else pb.DECISION_SMALL,
                                  entropy=h, threshold=0.9, text=f"step {i}\n\n", tokens=tokens,
                                  latency_ms=latency_ms, worker_ms=latency_ms - 1, token_ids=list(range(tokens))))
    n_large = roles.count("large")
    stats = pb.Stats(
        latency_ms=latency_ms * len(roles), steps=len(roles), intervention_rate=n_large / len(roles),
        small=pb.RoleStats(steps=len(roles) - n_large, generated_tokens=tokens * (len(roles) - n_large),
                           glimpses=len(entropies or [])),
        large=pb.RoleStats(steps=n_large, generated_tokens=tokens * n_large),
        thinking_end="eos",
    )
    return pb.ReasonResponse(session_id="s", steps=steps, answer=answer, stats=stats, prefix_mode=pb.PREFIX_MODE_TOKENS)


class FakeRouter:
    """Answers each problem correctly under large-only, wrongly otherwise; can raise
    KeyboardInterrupt (as Ctrl-C would) during the call numbered `interrupt_at`."""

    def __init__(self, answers: dict[str, str], interrupt_at: int | None = None) -> None:
        self.answers = answers
        self.calls: list[tuple[str, float, str, int]] = []  # policy, threshold, problem, seed
        self.interrupt_at = interrupt_at

    def reason(self, req: pb.ReasonRequest, timeout_s: float) -> pb.ReasonResponse:
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        question = req.messages[0].content
        pid = next(p for p, q in self.answers.items() if q[0] in question)
        self.calls.append((req.routing.policy, round(req.routing.threshold, 6), pid, req.sampling.seed))
        gold = self.answers[pid][1]
        if req.routing.policy == "large-only":
            return response(f"so \\boxed{{{gold}}}", ["large"] * 3)
        return response("so \\boxed{-1}", ["small", "large", "small"], [0.2, 1.5, 0.1])
