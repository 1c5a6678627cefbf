"""OpenAI's answers: the JSON bodies and stream chunks the official clients parse.

Plain functions from values to dicts, one per object OpenAI defines
(``chat.completion``, ``chat.completion.chunk``, ``text_completion``, ``usage``, the
logprobs objects). They hold no state and know nothing of HTTP; ``formats.py`` calls
them as a generation goes, and ``streaming.py`` sends what they return.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import replace
from typing import Any, Sequence

from .generate import TokenEvent


def new_id(prefix: str) -> str:
    """``chatcmpl-<32 hex>`` / ``cmpl-<32 hex>``: unique per response, as OpenAI's are."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """Unix time in whole seconds, the ``created`` field."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_logprob_entry(
    token: str, raw: bytes, logprob: float, top: Sequence[tuple[str, bytes, float]]
) -> dict[str, Any]:
    """One element of ``choices[0].logprobs.content``: the token, its logprob and bytes.

    ``token`` is the chosen token decoded on its own, so a token holding part of a
    UTF-8 character shows as U+FFFD; ``raw`` are its real bytes, which is what the
    ``bytes`` field is for: joined over consecutive tokens they decode to the text.
    ``top`` holds ``(token, bytes, logprob)`` for each alternative, best first.
    """
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(raw),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in top],
    }


def chat_completion(
    *,
    id: str,
    created: int,
    model: str,
    content: str | None,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: list[dict[str, Any]] | None,
    tool_calls: list[dict[str, Any]] | None = None,
    reasoning: str | None = None,
) -> dict[str, Any]:
    """A whole ``chat.completion`` object (the non-streaming answer)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    *,
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``. With ``include_usage`` every chunk has ``usage: null``
    and the stream ends with :func:`usage_chunk` (OpenAI's convention)."""
    chunk: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": logprobs},
                "finish_reason": finish_reason,
            }
        ],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(*, id: str, created: int, model: str, object: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, only usage."""
    return {
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_logprobs(entries: Sequence[tuple[str, TokenEvent, int]]) -> dict[str, Any]:
    """The legacy ``logprobs`` object from ``(token text, event, text_offset)`` triples.

    ``text_offset`` is where each token's text starts in the completion (in characters).
    """
    return {
        "tokens": [token for token, _, _ in entries],
        "token_logprobs": [event.logprob for _, event, _ in entries],
        "top_logprobs": [{t.text: t.logprob for t in event.top_logprobs} for _, event, _ in entries],
        "text_offset": [offset for _, _, offset in entries],
    }


def text_completion(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """A ``text_completion`` object: the whole answer, or one streamed chunk of it.

    The non-streaming answer passes the token counts and gets ``usage``; a chunk of a
    stream with ``include_usage`` gets ``usage: null``.
    """
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if prompt_tokens is not None and completion_tokens is not None:
        body["usage"] = usage(prompt_tokens, completion_tokens)
    elif include_usage:
        body["usage"] = None
    return body


def finite(logprob: float) -> float:
    """JSON has no -inf: the logprob of an impossible (masked) token is sent as -9999."""
    return logprob if math.isfinite(logprob) else -9999.0


def finite_event(event: TokenEvent) -> TokenEvent:
    """The event with infinite logprobs made finite (see :func:`finite`)."""
    return TokenEvent(
        token_id=event.token_id,
        text=event.text,
        logprob=None if event.logprob is None else finite(event.logprob),
        top_logprobs=tuple(replace(t, logprob=finite(t.logprob)) for t in event.top_logprobs),
    )
