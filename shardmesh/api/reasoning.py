"""Reasoning models: the thinking goes to ``reasoning_content``, the answer to ``content``.

Models such as Qwen3 and DeepSeek-R1 think before they answer, between ``<think>`` and
``</think>``. Their chat templates write those tags, which is how the gateway knows a
model does it (:func:`thinks`). Either the model opens the block itself (Qwen3 writes
``<think>`` first), or the template already opened it at the end of the prompt
(DeepSeek-R1, Qwen3's thinking-only models): :func:`starts_thinking` reads the prompt's
end. The thinking, without its tags, goes to ``reasoning_content`` (in the message, and
as ``delta.reasoning_content`` in a stream, as vLLM's reasoning parsers write it); what
follows ``</think>`` is the answer. ``chat_template_kwargs`` (``enable_thinking: false``
for Qwen3) reach the template, which decides whether the model thinks at all.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import bad_request
from .text import partial_suffix

__all__ = ["MAX_TEMPLATE_KWARGS", "ReasoningSplitter", "starts_thinking", "template_kwargs", "thinking_state", "thinks"]

OPEN, CLOSE = "<think>", "</think>"
MAX_TEMPLATE_KWARGS = 32
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
# Names the template or apply_chat_template itself owns: a client may not replace them.
_RESERVED = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
    "return_dict", "sanitize_control_tokens", "chat_template", "tokenizer_kwargs", "return_tensors", "padding",
    "truncation", "max_length", "return_assistant_tokens_mask", "raise_exception", "strftime_now", "namespace", "dict",
})


def template_kwargs(value: Any) -> dict[str, Any]:
    """``chat_template_kwargs`` as variables for the template; a 400 naming it for a
    name that is not an identifier or that the template machinery owns."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_TEMPLATE_KWARGS:
        raise bad_request(f"chat_template_kwargs must be an object of at most {MAX_TEMPLATE_KWARGS} variables",
                          param="chat_template_kwargs")
    for name in value:
        if not _NAME.fullmatch(name) or name in _RESERVED:
            raise bad_request(f"chat_template_kwargs cannot set {name[:40]!r}", param="chat_template_kwargs")
    return dict(value)


def thinks(template: str | None) -> bool:
    """Whether a chat template writes thinking blocks (so its model may think)."""
    return template is not None and CLOSE in template


def starts_thinking(prompt_tail: str) -> bool:
    """Whether the prompt ends inside a thinking block the template opened."""
    return prompt_tail.rfind(OPEN) > prompt_tail.rfind(CLOSE)


def thinking_state(tokenizer: Any, tools: list[dict] | None, prompt_ids: list[int]) -> bool | None:
    """For a chat prompt: None when the model's template writes no thinking blocks;
    else whether the answer starts inside one (the prompt's last tokens opened it)."""
    try:
        template = tokenizer.get_chat_template(tools)
    except ValueError:
        return None
    if not isinstance(template, str) or not thinks(template):
        return None
    return starts_thinking(tokenizer.decode(prompt_ids[-8:]))


class ReasoningSplitter:
    """A streamed answer split into thinking and answer as its text arrives; a tag cut
    between two pieces is held until it is whole."""

    def __init__(self, thinking: bool) -> None:
        self.thinking = thinking
        self.started = thinking  # no <think> may open the answer once it began
        self.pending = ""
        self.trim = False  # the newlines after </think> are not the answer's

    def feed(self, text: str) -> tuple[str, str]:
        """``(thinking, answer)`` released by ``text``."""
        self.pending += text
        thought, answer = "", ""
        if not self.started:
            stripped = self.pending.lstrip()
            if stripped.startswith(OPEN):
                self.pending, self.thinking, self.started = stripped[len(OPEN) :], True, True
            elif not OPEN.startswith(stripped):
                self.started = True
            else:
                return "", ""  # could still be the opening tag
        if self.thinking:
            end = self.pending.find(CLOSE)
            if end < 0:
                keep = partial_suffix(self.pending, CLOSE)
                thought, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
                return thought, ""
            thought, self.pending, self.thinking, self.trim = self.pending[:end], self.pending[end + len(CLOSE) :], False, True
        answer, self.pending = self.pending, ""
        if self.trim:
            answer = answer.lstrip("\n")
            self.trim = not answer
        return thought, answer

    def finish(self) -> tuple[str, str]:
        rest, self.pending = self.pending, ""
        return (rest, "") if self.thinking else ("", rest)
