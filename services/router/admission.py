"""Admission: whether a request is taken on, and with what options.

A request's option groups are filled in with the router's defaults (a group the
caller left out is remembered, so a new turn of an existing session keeps the
stored one), checked, and the router's own limits applied: nothing is started
while it drains, and at most --max-concurrent sessions at once.
"""
from __future__ import annotations

import dataclasses
import math
import re

from services.router.api.types import CatchUp, Entropy, GlimpseMode, ReasonRequest
from services.router.config import RouterSettings
from services.router.errors import InvalidArgument, LimitExceeded, ShuttingDown
from services.router.policies import make_policy
from services.router.session import SessionOptions, default_budgets, default_routing, default_sampling

SESSION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_ROLES = ("system", "user", "assistant")


def _filled(given, defaults):
    """`defaults` with every field the caller set (not None) taken from `given`."""
    if given is None:
        return defaults
    return dataclasses.replace(defaults, **{f.name: v for f in dataclasses.fields(given)
                                           if (v := getattr(given, f.name)) is not None and v != ""})


def resolve(req: ReasonRequest) -> tuple[SessionOptions, frozenset[str]]:
    """The options the request asks for (defaults where it says nothing), and which groups it set."""
    given = {name for name in ("routing", "budgets", "sampling", "answer_by", "think") if getattr(req, name) is not None}
    routing = _filled(req.routing, default_routing())
    if req.routing is not None:
        routing.params = dict(req.routing.params)  # the request's parameters, none of the defaults'
    options = SessionOptions(
        routing=routing,
        budgets=_filled(req.budgets, default_budgets()),
        sampling=_filled(req.sampling, default_sampling()),
        answer_by=req.answer_by,
        think=req.think,
    )
    return options, frozenset(given)


def validate(req: ReasonRequest, options: SessionOptions) -> None:
    make_policy(options.routing)  # unknown names and bad parameters
    r = options.routing
    if not isinstance(r.glimpse_mode, GlimpseMode):
        raise InvalidArgument(f"glimpse_mode must be fused or separate, got {r.glimpse_mode!r}")
    if not isinstance(r.entropy, Entropy):
        raise InvalidArgument(f"entropy must be top_k or full, got {r.entropy!r}")
    if r.catch_up is not None and not isinstance(r.catch_up, CatchUp):
        raise InvalidArgument(f"catch_up must be eager or lazy, got {r.catch_up!r}")
    if not 1 <= r.top_k <= 100:
        raise InvalidArgument(f"top_k must be in [1, 100], got {r.top_k}")
    b = options.budgets
    for name in ("step_tokens", "thinking_tokens", "answer_tokens"):
        if getattr(b, name) <= 0:
            raise InvalidArgument(f"budgets.{name} must be positive, got {getattr(b, name)}")
    if b.max_steps < 0:
        raise InvalidArgument(f"budgets.max_steps must be >= 0 (0: no limit), got {b.max_steps}")
    s = options.sampling
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument(f"sampling.temperature must be a finite number >= 0, got {s.temperature}")
    if not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {s.top_p}")
    check_session_id(req.session_id, required=False)
    for i, m in enumerate(req.messages):
        if m.role not in _ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {m.role!r}")
    if req.messages and not any(m.content.strip() for m in req.messages):
        raise InvalidArgument("every message is empty: send some text to reason about")


def check_session_id(session_id: str, required: bool = True) -> None:
    if (session_id or required) and not SESSION_ID.match(session_id or ""):
        raise InvalidArgument("session_id must be 1-128 characters of letters, digits, '_', '.', ':' or '-'")


def admit(req: ReasonRequest, settings: RouterSettings, *, draining: bool, active: int, holder: str) -> tuple[SessionOptions, frozenset[str]]:
    """The request's options, or the reason it is refused."""
    options, given = resolve(req)
    validate(req, options)
    if options.routing.catch_up is None:  # a session keeps the default it started with
        options.routing.catch_up = CatchUp(settings.catch_up)
    if draining:
        raise ShuttingDown(f"router {holder} is shutting down; retry on another replica")
    if active >= settings.max_concurrent:
        raise LimitExceeded(
            f"this router is working on {active} sessions (limit {settings.max_concurrent},"
            " --max-concurrent); retry later or on another replica"
        )
    return options, given
