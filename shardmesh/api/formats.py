"""How a generation is written for each endpoint, token by token.

A format is the per-request state between the generator's events and OpenAI's JSON:
it owns the response id and ``created`` time, collects the text and logprobs as tokens
arrive, and hands back the chunk each event becomes (streaming) or, at the end, the
whole body (not streaming). :class:`~shardmesh.api.streaming.GenerationResponse` drives
it the same way for both endpoints::

    prelude()           chunks to send before the first token
    on_token(event)     record a token; its chunks (none when there is nothing to show)
    on_finish(done)     record the end; the last chunks, the last with its finish_reason
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
from .reasoning import ReasoningSplitter
from .tool_calls import CallSplitter, call_json
from .tool_formats import ParsedCall, ToolFormat


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
    """How ``/v1/chat/completions`` writes a generation: whole or as chunks. With a
    ``tools`` format, the answer's tool calls are read out of its text (tool_calls.py)
    and written as ``tool_calls``: streamed, each call as two deltas, its id and name
    first, then its arguments, as OpenAI streams them. With ``thinking`` (True: the
    prompt opened a thinking block; False: the model may open one), the thinking is
    written as ``reasoning_content`` (reasoning.py)."""

    object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, *, tools: ToolFormat | None = None, thinking: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.entries: list[dict[str, Any]] = []
        self.thoughts = ReasoningSplitter(thinking) if thinking is not None else None
        self.splitter = CallSplitter(tools) if tools is not None else None
        self.calls: list[dict[str, Any]] = []  # OpenAI's call objects, in the answer's order

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

    def on_token(self, event: TokenEvent) -> list[dict[str, Any]]:
        """Record one token; return its chunks (none when there is nothing to send)."""
        thought, text, calls = self._split(event.text)
        entry = None
        if self.logprobs and event.logprob is not None:
            entry = self._logprob_entry(finite_event(event))
            self.entries.append(entry)
        delta = {"reasoning_content": thought} if thought else {}
        if text or entry or not delta:
            delta["content"] = text
        chunks = [self._chunk(delta, logprobs=None if entry is None else [entry])] if thought or text or entry else []
        return chunks + self._call_chunks(calls)

    def _split(self, text: str, last: bool = False) -> tuple[str, str, list[ParsedCall]]:
        """``text`` as thinking, content and calls (all content without either); recorded."""
        thought, calls = "", []
        if self.thoughts is not None:
            thought, text = self.thoughts.feed(text)
            if last:
                more_thought, rest = self.thoughts.finish()
                thought, text = thought + more_thought, text + rest
        if self.splitter is not None:
            text, calls = self.splitter.feed(text)
            if last:
                rest, more = self.splitter.finish()
                text, calls = text + rest, calls + more
        self.reasoning.append(thought)
        self.content.append(text)
        return thought, text, calls

    def _call_chunks(self, calls: list[ParsedCall]) -> list[dict[str, Any]]:
        chunks = []
        for call in calls:
            index, made = len(self.calls), call_json(call)
            self.calls.append(made)
            head = {"index": index, "id": made["id"], "type": "function", "function": {"name": call.name, "arguments": ""}}
            chunks.append(self._chunk({"tool_calls": [head]}))
            chunks.append(self._chunk({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}))
        return chunks

    def _reason(self, done: Finished) -> str:
        return "tool_calls" if self.calls and done.reason == "stop" else done.reason

    def _logprob_entry(self, event: TokenEvent) -> dict[str, Any]:
        """The chosen token's logprob entry, with raw bytes (see :func:`token_bytes`)."""
        assert event.logprob is not None
        top = [(t.text, token_bytes(self.tokenizer, t.token_id), t.logprob) for t in event.top_logprobs]
        token = self.tokenizer.decode([event.token_id])
        return chat_logprob_entry(token, token_bytes(self.tokenizer, event.token_id), event.logprob, top)

    def on_finish(self, done: Finished) -> list[dict[str, Any]]:
        thought, text, calls = self._split(done.text, last=True)
        chunks = [self._chunk({"reasoning_content": thought})] if thought else []
        if not calls and not self.calls:
            return chunks + [self._chunk({"content": text} if text else {}, finish_reason=done.reason)]
        chunks += [self._chunk({"content": text})] if text else []
        return chunks + self._call_chunks(calls) + [self._chunk({}, finish_reason=self._reason(done))]

    def whole(self, done: Finished) -> dict[str, Any]:
        """The non-streaming body, after every event went through on_token/on_finish."""
        content: str | None = "".join(self.content)
        reasoning = "".join(self.reasoning) or None
        if self.calls:
            content = content.strip() or None
        elif reasoning is not None and not content:
            content = None
        return chat_completion(
            id=self.id,
            created=self.created,
            model=self.model,
            content=content,
            tool_calls=self.calls or None,
            reasoning=reasoning,
            finish_reason=self._reason(done),
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

    def on_token(self, event: TokenEvent) -> list[dict[str, Any]]:
        entry = None
        if self.logprobs and event.logprob is not None:
            entry = (self.tokenizer.decode([event.token_id]), finite_event(event), self.offset)
            self.entries.append(entry)
        self.text.append(event.text)
        self.offset += len(event.text)
        if not event.text and entry is None:
            return []
        return [self._chunk(event.text, logprobs=None if entry is None else completion_logprobs([entry]))]

    def on_finish(self, done: Finished) -> list[dict[str, Any]]:
        self.text.append(done.text)
        return [self._chunk(done.text, finish_reason=done.reason)]

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
