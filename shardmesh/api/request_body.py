"""Reading a request body as JSON, with a size limit and no surprises.

Every way a body can be wrong (too large, empty, not JSON, JSON that Python accepts
but the spec does not) becomes an :class:`~shardmesh.api.errors.ApiError` here, before
any validation of what the JSON says.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from .errors import ApiError

#: Largest request body accepted; larger ones get a 413 without being parsed.
MAX_BODY_BYTES = 1 << 20


async def read_json(request: Request) -> Any:
    """The request body decoded as JSON, or an ApiError (413 too large, 400 malformed).

    The size limit is checked against ``Content-Length`` before reading and again
    while reading (a chunked body has no length), so no more than ``MAX_BODY_BYTES``
    is ever held. ``NaN``/``Infinity`` (which Python's json accepts but JSON does not)
    and lone UTF-16 surrogates (which no tokenizer can encode) are refused here.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
    if not body.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object")
    try:
        value = json.loads(bytes(body), parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"invalid JSON: {exc}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the request holds a string that is not valid Unicode (a lone surrogate)") from None
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _too_large() -> ApiError:
    # The rest of the body is never read, so the connection cannot carry another
    # request: "Connection: close" tells the client (and h11) not to reuse it.
    return ApiError(
        413,
        f"the request body is larger than {MAX_BODY_BYTES} bytes",
        code="request_too_large",
        headers={"Connection": "close"},
    )
