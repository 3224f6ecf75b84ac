"""Errors in OpenAI's format, and the gRPC status -> HTTP status mapping.

Every error the gateway returns is `{"error": {"message", "type", "param", "code"}}`
so OpenAI clients raise their usual exception classes (BadRequestError, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

# HTTP status -> OpenAI error type.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}

# gRPC status -> (HTTP status, OpenAI error code).
_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_value"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "failed_precondition"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    # Another router holds the session's lease, or the session was cancelled.
    grpc.StatusCode.ABORTED: (409, "session_busy"),
    grpc.StatusCode.CANCELLED: (409, "cancelled"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_exceeded"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "router_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def from_grpc(code: grpc.StatusCode, details: str | None) -> APIError:
    status, err_code = _GRPC.get(code, (500, "internal_error"))
    message = details or code.name.lower()
    if code is grpc.StatusCode.UNAVAILABLE:
        message = f"the router is unavailable: {message}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        message = "the request did not finish before its deadline"
    return APIError(status, message, None, err_code)


def from_rpc_error(exc: grpc.RpcError) -> APIError:
    return from_grpc(exc.code(), exc.details())
