"""API errors: every failure answers `{"error": {"message", "type", "code"}}` with its status.

`type` is the class of error a client branches on (OpenAI's convention); `code` is the
specific reason, stable for clients to match; `message` is for people.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "error_body"]

# status -> error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str, code: str) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "code": code,
        }
    }


class APIError(Exception):
    """An error answered to the client as JSON with `status` and optional extra headers
    (`Retry-After` on 429/503, `WWW-Authenticate` on 401)."""

    def __init__(
        self, status: int, message: str, code: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code)
