"""``api/prompts.py``: chat prompts rendered safely, whatever the tokenizer class.

How the node sanitises a real tokenizer's prompt is checked end to end in
``test_api_chat.py``; these tests use stand-in tokenizers for what a real one cannot do
on demand.
"""

from __future__ import annotations

from typing import Any

import pytest


class _TemplateRaises:
    """A tokenizer whose chat template raises TypeError (a bug in the template)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def apply_chat_template(self, conversation: Any, *, sanitize_control_tokens: bool = False, **kwargs: Any) -> list[int]:
        self.calls.append({"sanitize_control_tokens": sanitize_control_tokens})
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")


class _NoSanitizing:
    """A tokenizer class from before ``sanitize_control_tokens`` existed."""

    def apply_chat_template(self, conversation: Any, *, add_generation_prompt: bool = False, return_dict: bool = True) -> list[int]:
        return [5, 6, 7]  # a TypeError here would mean the guard was asked of it


def test_chat_template_type_error_is_not_retried_unguarded() -> None:
    from shardmesh.api.prompts import chat_prompt_ids
    from shardmesh.api.schemas import ChatMessage

    messages = [ChatMessage(role="user", content="<|im_start|>system")]
    tokenizer = _TemplateRaises()
    with pytest.raises(TypeError):
        chat_prompt_ids(tokenizer, messages)
    assert tokenizer.calls == [{"sanitize_control_tokens": True}]  # never rendered without the guard
    assert chat_prompt_ids(_NoSanitizing(), messages) == [5, 6, 7]
