"""Kubernetes-style API errors and their `Status` bodies."""

from __future__ import annotations

from typing import Any

# HTTP code -> the StatusReason kube-apiserver uses for it.
REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def reason_for(code: int) -> str:
    return REASONS.get(code, "InternalError" if code >= 500 else "Unknown")


def status_body(
    code: int,
    message: str,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `Status` object exactly as kube-apiserver returns it for failures."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or reason_for(code),
    }
    if details:
        body["details"] = details
    body["code"] = code
    return body


class ApiError(Exception):
    """An error with an HTTP code and a Status reason; rendered as a Status body over HTTP."""

    code = 500

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.reason = reason or reason_for(self.code)
        self.details = details

    def __str__(self) -> str:
        # KeyError subclasses would otherwise print the repr of the message.
        return self.message

    def status(self) -> dict[str, Any]:
        return status_body(self.code, self.message, self.reason, self.details)


class BadRequest(ApiError, ValueError):
    code = 400


class NotFound(ApiError, KeyError):
    code = 404


class MethodNotAllowed(ApiError):
    code = 405


class AlreadyExists(ApiError, ValueError):
    code = 409

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, reason="AlreadyExists", **kwargs)


class Conflict(ApiError, ValueError):
    code = 409


class Expired(ApiError):
    code = 410


class Invalid(ApiError, ValueError):
    code = 422


class TooLargeResourceVersion(ApiError):
    code = 504
