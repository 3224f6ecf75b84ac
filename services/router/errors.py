"""What the router refuses or fails with; each names the gRPC status the servicer answers."""
from __future__ import annotations


class RouterError(Exception):
    """A request the router refuses; `code` names a gRPC status (INVALID_ARGUMENT, ...)."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(RouterError):
    code = "INVALID_ARGUMENT"


class NotFound(RouterError):
    code = "NOT_FOUND"


class SessionBusy(RouterError):
    """Another router holds the session's lease."""

    code = "ABORTED"


class FailedPrecondition(RouterError):
    code = "FAILED_PRECONDITION"


class LimitExceeded(RouterError):
    code = "RESOURCE_EXHAUSTED"


class LeaseLost(RouterError):
    """The lease expired or was taken over while this router worked: stop, write nothing."""

    code = "ABORTED"


class SessionCancelled(RouterError):
    code = "CANCELLED"


class WorkersUnavailable(RouterError):
    code = "UNAVAILABLE"


class WorkerFault(WorkersUnavailable):
    """A worker failed after part of a step had been streamed: the call cannot be retried
    as it was, but the step can be written again from its start (a new attempt)."""


class DeadlineExceeded(RouterError):
    code = "DEADLINE_EXCEEDED"


class StoreUnavailable(RouterError):
    """Redis did not answer in time: nothing was stored; the session can be resumed once it is back."""

    code = "UNAVAILABLE"


class ShuttingDown(RouterError):
    """The router is draining (SIGTERM): retry, or resume the session, on another replica."""

    code = "UNAVAILABLE"
