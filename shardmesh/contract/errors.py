"""The errors every room may raise or catch.

Stage errors carry a stable ``code`` that travels in the mesh's error frames, so a
gateway can tell a full cache from a broken peer without sharing any class with the
hop that refused. Chain errors are what the gateway's generation loop reacts to:
a broken chain is replaced, no route is waited out, an unavailable model is a 503.
"""

from __future__ import annotations


class StageError(Exception):
    """A request a stage refuses. ``code`` is stable and travels in error frames."""

    code = "stage_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(StageError):
    code = "bad_input"


class UnknownSession(StageError):
    code = "unknown_session"


class BadRequest(StageError):
    """The request itself cannot be served, whichever peer runs it (e.g. sampling
    parameters the last hop's sampler refuses). Not a peer's fault: the gateway answers
    HTTP 400 and excludes nobody."""

    code = "bad_request"


class NonFiniteInput(StageError):
    """Hidden states received from the upstream hop hold NaN or infinity: the sender's
    fault, so the receiver's error frame names the sender, not itself."""

    code = "non_finite"


class CacheBudgetExceeded(StageError):
    """The KV cache budget cannot hold another session of the requested length."""

    code = "cache_full"


class ChainFailed(Exception):
    """A chain broke: ``peer`` is the hop to avoid next time (None: unknown)."""

    def __init__(self, peer: str | None, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" + (f" (peer {peer})" if peer else ""))
        self.peer = peer
        self.code = code
        self.message = message


class NoRoute(Exception):
    """No set of online peers covers every block of the model right now."""


class ModelUnavailable(Exception):
    """No complete chain can serve the model right now (HTTP 503)."""
