"""How a generation is written for each endpoint, token by token.

A format is the per-request state between the generator's events and OpenAI's JSON:
it owns the response id and ``created`` time, collects the text and logprobs as tokens
arrive, and hands back the chunk each event becomes (streaming) or, at the end, the
whole body (not streaming). :class:`~shardmesh.api.streaming.GenerationResponse` drives
it the same way for both endpoints::

    prelude()           chunks to send before the first token
    on_token(event)     record a token; its chunk, or None when there is nothing to show
    on_finish(done)     record the end; the last chunk, with its finish_reason
    usage_chunk(done)   the trailing usage-only chunk (streams with ``include_usage``)
    whole(done)         the non-streaming body, once every event went through
                        on_token / on_finish
"""

from __future__ import annotations

from typing import Any

from .generate import Finished, TokenEvent
from .response_json import (
    chat_chunk,
    chat_completion,
    chat_logprob_entry,
    completion_logprobs,
    finite_event,
    new_id,
    now,
    text_completion,
    usage_chunk,
)
from .token_bytes import token_bytes


class _Format:
    """What both endpoints' formats share: the response's identity and its usage chunk."""

    object: str
    id_prefix: str

    def __init__(self, *, model: str, tokenizer: Any, logprobs: bool, include_usage: bool) -> None:
        self.id = new_id(self.id_prefix)
        self.created = now()
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.include_usage = include_usage

    def usage_chunk(self, done: Finished) -> dict[str, Any]:
        return usage_chunk(
            id=self.id,
            created=self.created,
            model=self.model,
            object=self.object,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )


class ChatFormat(_Format):
    """How ``/v1/chat/completions`` writes a generation: whole or as chunks."""

    object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.content: list[str] = []
        self.entries: list[dict[str, Any]] = []

    def _chunk(self, delta: dict[str, Any], *, finish_reason: str | None = None, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return chat_chunk(
            id=self.id,
            created=self.created,
            model=self.model,
            delta=delta,
            finish_reason=finish_reason,
            logprobs=logprobs,
            include_usage=self.include_usage,
        )

    def prelude(self) -> list[dict[str, Any]]:
        """The first chunk names the speaker, as OpenAI's does."""
        return [self._chunk({"role": "assistant", "content": ""})]

    def on_token(self, event: TokenEvent) -> dict[str, Any] | None:
        """Record one token; return its chunk, or None when there is nothing to send."""
        self.content.append(event.text)
        entry = None
        if self.logprobs and event.logprob is not None:
            entry = self._logprob_entry(finite_event(event))
            self.entries.append(entry)
        if not event.text and entry is None:
            return None
        return self._chunk({"content": event.text}, logprobs=None if entry is None else [entry])

    def _logprob_entry(self, event: TokenEvent) -> dict[str, Any]:
        """The chosen token's logprob entry, with raw bytes (see :func:`token_bytes`)."""
        assert event.logprob is not None
        top = [(t.text, token_bytes(self.tokenizer, t.token_id), t.logprob) for t in event.top_logprobs]
        token = self.tokenizer.decode([event.token_id])
        return chat_logprob_entry(token, token_bytes(self.tokenizer, event.token_id), event.logprob, top)

    def on_finish(self, done: Finished) -> dict[str, Any]:
        self.content.append(done.text)
        return self._chunk({"content": done.text} if done.text else {}, finish_reason=done.reason)

    def whole(self, done: Finished) -> dict[str, Any]:
        """The non-streaming body, after every event went through on_token/on_finish."""
        return chat_completion(
            id=self.id,
            created=self.created,
            model=self.model,
            content="".join(self.content),
            finish_reason=done.reason,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            logprobs=self.entries if self.logprobs else None,
        )


class CompletionFormat(_Format):
    """How ``/v1/completions`` writes a generation: whole or as chunks."""

    object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.text: list[str] = []
        self.offset = 0  # characters of completion text released so far
        self.entries: list[tuple[str, TokenEvent, int]] = []

    def _chunk(self, text: str, *, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return text_completion(
            id=self.id,
            created=self.created,
            model=self.model,
            text=text,
            finish_reason=finish_reason,
            logprobs=logprobs,
            include_usage=self.include_usage,
        )

    def prelude(self) -> list[dict[str, Any]]:
        return []

    def on_token(self, event: TokenEvent) -> dict[str, Any] | None:
        entry = None
        if self.logprobs and event.logprob is not None:
            entry = (self.tokenizer.decode([event.token_id]), finite_event(event), self.offset)
            self.entries.append(entry)
        self.text.append(event.text)
        self.offset += len(event.text)
        if not event.text and entry is None:
            return None
        return self._chunk(event.text, logprobs=None if entry is None else completion_logprobs([entry]))

    def on_finish(self, done: Finished) -> dict[str, Any]:
        self.text.append(done.text)
        return self._chunk(done.text, finish_reason=done.reason)

    def whole(self, done: Finished) -> dict[str, Any]:
        return text_completion(
            id=self.id,
            created=self.created,
            model=self.model,
            text="".join(self.text),
            finish_reason=done.reason,
            logprobs=completion_logprobs(self.entries) if self.logprobs else None,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )


Format = ChatFormat | CompletionFormat
