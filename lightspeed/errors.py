"""Typed errors and their HTTP mapping.

Everything a client can cause or see is one of these; the frontend turns them into an
OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`) with the status below.
"""

from __future__ import annotations


class LightspeedError(Exception):
    """Base class: carries the HTTP status and OpenAI error `type` for the frontend."""

    status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code if self.code is not None else self.status,
            }
        }


class InvalidRequest(LightspeedError):
    status = 400
    error_type = "invalid_request_error"


class ModelNotFound(LightspeedError):
    status = 404
    error_type = "model_not_found"


class PayloadTooLarge(LightspeedError):
    status = 413
    error_type = "invalid_request_error"


class UnsupportedMediaType(LightspeedError):
    """A body in an encoding the frontend does not decode (e.g. Content-Encoding: br)."""

    status = 415
    error_type = "invalid_request_error"


class Unauthorized(LightspeedError):
    """No API key, or one the frontend does not know (OpenAI answers the same with 401)."""

    status = 401
    error_type = "invalid_request_error"


class RateLimited(LightspeedError):
    """A key over its request or token rate; `retry_after` (seconds) becomes the Retry-After header."""

    status = 429
    error_type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Overloaded(LightspeedError):
    """No worker can take the request now (none registered, or all busy past the queue bound)."""

    status = 503
    error_type = "service_unavailable"


class WorkerLost(LightspeedError):
    """The worker's connection dropped mid-request; the frontend may migrate the request."""

    status = 503
    error_type = "service_unavailable"


class WorkerError(LightspeedError):
    """The worker reported an error while serving the request."""

    status = 500
    error_type = "internal_error"


class Cancelled(LightspeedError):
    status = 499
    error_type = "cancelled"
