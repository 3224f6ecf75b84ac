"""The router's public contract in Python: what the gateway, the CLI and the
evaluation import (and nothing else of the router).

- `types`: the request, the events a Reason call streams, statistics, sessions.
- `protomap`: router.proto <-> those types, both directions.
- `client`: an asyncio gRPC client speaking them.
"""
from services.router.api.types import (  # noqa: F401
    AnswerBy,
    AnswerDelta,
    Budgets,
    CatchUp,
    Decision,
    Done,
    Entropy,
    Event,
    GlimpseMode,
    Message,
    PrefixMode,
    PrefixView,
    ReasonRequest,
    Role,
    RoleStats,
    RoutingOptions,
    SamplingOptions,
    SessionInfo,
    Started,
    Stats,
    Step,
    StepDelta,
    StepStart,
    finite_or_none,
)
