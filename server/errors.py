"""The errors the serving core refuses a request with.

`ServiceError` is the one way the core says no: it carries a gRPC status code *name* (the core does not import
grpc; the servicer's interceptor maps the name to a status), a message written for a person, and optionally a retry
hint that the servicer sends as `retry-after-ms` trailing metadata.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service refuses or cannot finish; `code` is a gRPC status code name."""

    code = "INTERNAL"

    def __init__(self, message: str, *, retry_after_ms: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_ms = retry_after_ms


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class Internal(ServiceError):
    code = "INTERNAL"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"
