"""Errors as OpenAI sends them: ``{"error": {...}}`` with an HTTP status.

Every failure the gateway reports, from a malformed body to a crashed generation,
goes out in this one envelope, because the official clients parse it into their own
exception types (``openai.BadRequestError``, ``openai.InternalServerError``...).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error to send back as ``{"error": {...}}`` with an HTTP status.

    ``type`` follows OpenAI's vocabulary (``invalid_request_error``,
    ``authentication_error``, ``server_error``...); ``param`` names the offending
    request field when there is one; ``code`` is a stable machine-readable string;
    ``headers`` go on the HTTP response.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse into their ``APIError`` exceptions."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, OpenAI's error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``: the client sent something we will not run."""
    return ApiError(400, message, param=param, code=code)


def unavailable(message: str) -> ApiError:
    """A 503: the model cannot serve right now (loading, or no complete chain)."""
    return ApiError(503, message, type="server_error", code="model_unavailable")


def internal_error() -> ApiError:
    """A 500 that tells the client nothing more: the details go to the log, not the wire."""
    return ApiError(500, "internal server error (the gateway logged the details)", type="server_error", code="internal_error")
