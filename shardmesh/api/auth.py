"""The optional API key: ``Authorization: Bearer <key>``, as OpenAI's clients send it."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError


class RequireApiKey:
    """ASGI middleware: ``Authorization: Bearer <key>`` on ``/v1/*`` and ``/metrics``.

    ``/health`` and the web UI stay open (load balancers and browsers fetch them
    without credentials; the UI asks for the key itself). The comparison runs in
    constant time so the key cannot be guessed byte by byte from response timings.
    """

    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]) and not self.authorized(scope):
            error = ApiError(
                401,
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
            response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                # The scheme is case-insensitive ("bearer" works too); the key is not.
                scheme, _, key = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + key.strip(), self.expected)
        return False


def is_protected(path: str) -> bool:
    """Paths that need the API key when one is configured."""
    return path == "/metrics" or path == "/v1" or path.startswith("/v1/")
