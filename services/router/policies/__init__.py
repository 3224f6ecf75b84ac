"""Routing policies, chosen by name per request."""
from __future__ import annotations

from services.router.policies.base import Param, Policy, StepContext, StepOutcome
from services.router.policies.glimpse import Adaptive, Glimpse
from services.router.policies.simple import LargeOnly, RandomPolicy, SmallOnly
from services.router.policies.step_entropy import StepEntropy
from services.router.policies.verify import Verify
from services.router.types import InvalidArgument, RoutingOptions

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Glimpse, LargeOnly, SmallOnly, RandomPolicy, Verify, StepEntropy, Adaptive)
}


def make_policy(routing: RoutingOptions) -> Policy:
    cls = POLICIES.get(routing.policy)
    if cls is None:
        raise InvalidArgument(f"unknown policy {routing.policy!r}; choose one of: {', '.join(POLICIES)}")
    return cls(routing.threshold, dict(routing.params))


__all__ = ["POLICIES", "Param", "Policy", "StepContext", "StepOutcome", "make_policy"]
