"""The policy interface: given one step's context, decide who writes the step and
get it written. Policies call the workers only through the StepContext, so the
same policy runs over gRPC pools and over in-process engines."""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

from services.router.types import InvalidArgument, Record, Role
from services.worker.types import EntropyMethod, Generation, Glimpse, StepResult


@dataclass
class StepOutcome:
    writer: Role
    generation: Generation
    value: float = math.nan  # what the decision compared (entropy, score, ...)
    threshold: float = math.nan
    glimpses: int = 0
    discarded_tokens: int = 0  # drafted by the small model, then thrown away


class StepContext(Protocol):
    """What the loop offers a policy for one step."""

    index: int  # step index over the session
    seed: int  # this step's sampling seed
    fused: bool
    method: EntropyMethod
    top_k: int
    history: list[Record]  # the session's earlier step records, oldest first

    async def glimpse(self) -> Glimpse:
        """The small model's first-token distribution at this step boundary."""

    async def write(self, role: Role, return_entropies: bool = False) -> Generation:
        """Generate the step on `role`'s worker."""

    async def fused_step(self, threshold: float) -> StepResult:
        """The small worker's Step: glimpse, decide, and on KEEP write the step."""

    async def score(self, draft: Generation, judge_text: str, top_k: int) -> Glimpse:
        """The large model's next-token distribution after the draft and a judge prompt."""


@dataclass(frozen=True)
class Param:
    default: float
    check: Callable[[float], bool]
    rule: str  # said in the error when `check` fails
    help: str


class Policy(abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[dict[str, Param]] = {}
    uses_threshold: ClassVar[bool] = False

    def __init__(self, threshold: float, params: dict[str, float]) -> None:
        if not math.isfinite(threshold):
            raise InvalidArgument(f"threshold must be a finite number, got {threshold!r}")
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise InvalidArgument(
                f"policy {self.name!r} has no parameter {', '.join(map(repr, unknown))} (its parameters: {known})"
            )
        self.threshold = float(threshold)
        self.p: dict[str, float] = {}
        for key, spec in self.params.items():
            value = float(params.get(key, spec.default))
            if not math.isfinite(value) or not spec.check(value):
                raise InvalidArgument(f"policy {self.name!r}: parameter {key!r} must be {spec.rule}, got {value!r}")
            self.p[key] = value

    @abc.abstractmethod
    async def write_step(self, ctx: StepContext) -> StepOutcome: ...


async def route_by_glimpse(ctx: StepContext, tau: float) -> StepOutcome:
    """The paper's rule: the large model writes the step when H(first token) >= tau."""
    if ctx.fused:
        result = await ctx.fused_step(tau)
        if result.generation is not None:  # KEEP: the small worker already wrote it
            return StepOutcome(Role.SMALL, result.generation, result.entropy, tau, glimpses=1)
        return StepOutcome(Role.LARGE, await ctx.write(Role.LARGE), result.entropy, tau, glimpses=1)
    g = await ctx.glimpse()
    h = g.entropy(ctx.method)
    if h < 0:
        raise InvalidArgument("the small worker cannot compute full-vocabulary entropy; use entropy=top_k")
    writer = Role.LARGE if h >= tau else Role.SMALL
    return StepOutcome(writer, await ctx.write(writer), h, tau, glimpses=1)
