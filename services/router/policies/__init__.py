"""Routing policies, chosen by name per request. Every module of this package is
imported here, so a Policy subclass defined in a new module registers itself."""
from __future__ import annotations

import importlib
import pkgutil

from services.router.api.types import RoutingOptions
from services.router.errors import InvalidArgument
from services.router.policies.base import REGISTRY, Param, Policy, StepContext, StepOutcome

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

POLICIES: dict[str, type[Policy]] = REGISTRY


def make_policy(routing: RoutingOptions) -> Policy:
    cls = POLICIES.get(routing.policy)
    if cls is None:
        raise InvalidArgument(f"unknown policy {routing.policy!r}; choose one of: {', '.join(POLICIES)}")
    return cls(routing.threshold, dict(routing.params))


__all__ = ["POLICIES", "Param", "Policy", "StepContext", "StepOutcome", "make_policy"]
