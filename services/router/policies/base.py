"""The policy interface: given one step's context, decide who writes the step and
get it written. Policies call the workers only through the StepContext, so the
same policy runs over gRPC pools and over in-process engines.

A policy describes itself: its name, the signal its decision reads (what a
step's `entropy` field holds, and how metrics and spans label it), its
parameters, and how a decision is labelled. Subclassing Policy registers it, so
adding a policy is one new module in this package.

Streaming: a step's writer is announced (StepStart) before its text streams.
Policies that decide before writing (glimpse, random) call `ctx.write(role, ...)`,
which announces and streams; policies that decide after drafting (verify,
step-entropy) `ctx.draft(...)` silently, then `ctx.keep(draft, ...)` (announce,
then the draft as one delta) or `ctx.write(LARGE, ...)` (announce, stream the
rewrite).
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

from services.router.api.types import Role
from services.router.errors import InvalidArgument
from services.router.session import Record
from services.worker.types import EntropyMethod, Generation, Glimpse

REGISTRY: dict[str, type["Policy"]] = {}


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
    fused: bool  # glimpse_mode fused: one Step call glimpses, decides and writes
    method: EntropyMethod
    top_k: int
    history: list[Record]  # the session's earlier step records, oldest first

    async def glimpse(self) -> Glimpse:
        """The small model's first-token distribution at this step boundary."""

    async def fused_step(self, threshold: float) -> StepOutcome:
        """The small worker's streamed Step: glimpse, decide (announced at once), and on
        KEEP write the step there; on ESCALATE the large model writes it."""

    async def write(self, role: Role, value: float = math.nan, threshold: float = math.nan) -> Generation:
        """Announce `role` as the step's writer (with the value it was chosen on) and
        generate the step on its worker, streamed to the caller as it is written."""

    async def draft(self, role: Role, return_entropies: bool = False) -> Generation:
        """Generate the step on `role`'s worker without showing it (it may be discarded)."""

    async def keep(self, role: Role, draft: Generation, value: float = math.nan, threshold: float = math.nan) -> None:
        """Announce `role` as the writer of an already drafted step, and show the draft."""

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
    # What a step's value (`entropy` in its events) is: glimpse_entropy,
    # step_mean_entropy, verify_score, random_draw, or none.
    signal: ClassVar[str] = "none"
    params: ClassVar[dict[str, Param]] = {}
    uses_threshold: ClassVar[bool] = False
    # The models its steps may call: eager catch-up follows only these (and the answer's writer).
    reads: ClassVar[frozenset[Role]] = frozenset(Role)
    # The model every step calls first (the small one's glimpse or draft), if any: catch-up
    # never sends it anything between steps, as its own call comes at once.
    first: ClassVar[Role | None] = Role.SMALL

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

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

    def label(self, writer: Role) -> str:
        """How a decision is named in metrics and span names (small/large by default)."""
        return writer.value

    @abc.abstractmethod
    async def write_step(self, ctx: StepContext) -> StepOutcome: ...


async def route_by_glimpse(ctx: StepContext, tau: float) -> StepOutcome:
    """The paper's rule: the large model writes the step when H(first token) >= tau."""
    if ctx.fused:
        return await ctx.fused_step(tau)
    g = await ctx.glimpse()
    h = g.entropy(ctx.method)
    if h < 0:
        raise InvalidArgument("the small worker cannot compute full-vocabulary entropy; use entropy=top_k")
    writer = Role.LARGE if h >= tau else Role.SMALL
    return StepOutcome(writer, await ctx.write(writer, h, tau), h, tau, glimpses=1)
