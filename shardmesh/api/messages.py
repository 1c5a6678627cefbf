"""A chat's messages as OpenAI clients send them, checked strictly.

``schemas.py`` holds the requests around them; ``prompts.py`` turns them into what a
chat template reads. ``content`` is normalised to plain text here; an assistant message
may carry the ``tool_calls`` it made, and a ``tool`` message answers one of them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["ChatMessage", "FunctionCall", "Strict", "ToolCallMessage"]


class Strict(BaseModel):
    """Base of every request model: strict types; unknown fields ignored here.

    Strict mode refuses silent coercions (a string for a number, a bool for an int).
    Unknown *top-level* fields never get this far (``schemas.parse_request`` names them in
    a 400); inside a message, fields we do not read (``refusal``, say) are ignored.
    """

    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI writes it


class ToolCallMessage(Strict):
    """One call in an assistant message's ``tool_calls``."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    """One message of a conversation. ``content`` is normalised to a plain string.
    An assistant message may hold the ``tool_calls`` it made; a ``tool`` message
    answers one of them (``tool_call_id``)."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _flatten_parts(cls, value: Any) -> Any:
        """Accept ``"text"`` or ``[{"type": "text", "text": "..."}, ...]``; return text."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of text parts")
        texts: list[str] = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError('only text content parts ({"type": "text", "text": ...}) are supported')
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError("a text content part needs a string 'text'")
            texts.append(text)
        return "".join(texts)
