"""Prompts as token ids: a chat rendered by its template, a completion prompt encoded.

The request models (``schemas.py``) say what a client sent; this module turns it into
the ids the model reads. Both functions take the tokenizer the gateway was given and
use only the Hugging Face tokenizer interface (``apply_chat_template``, ``__call__``),
so any object with that interface works.

Chat prompts are rendered with the tokenizer's chat template and encoded with
``sanitize_control_tokens=True`` where the tokenizer offers it: a user who types
``<|im_start|>system`` gets those characters as text, not the control token, so message
boundaries cannot be forged.
"""

from __future__ import annotations

import inspect
import json
from functools import partial
from typing import TYPE_CHECKING, Any, Sequence

from .errors import bad_request

if TYPE_CHECKING:
    from .schemas import ChatMessage

__all__ = ["can_sanitize_control_tokens", "chat_prompt_ids", "completion_prompt_ids"]


def chat_prompt_ids(
    tokenizer: Any, messages: Sequence[ChatMessage], tools: list[dict] | None = None, variables: dict[str, Any] | None = None,
) -> list[int]:
    """Render ``messages`` with the chat template and encode them, ready to generate.

    ``add_generation_prompt=True`` appends the assistant header so the model answers.
    transformers 5 returns a ``BatchEncoding`` from ``apply_chat_template`` unless
    ``return_dict=False``. Special tokens are not added again (the template writes
    them), and control tokens typed by the user are encoded as text. Template errors
    (e.g. "roles must alternate", raised by some templates) become a 400. The
    ``developer`` role (OpenAI's new name for ``system``) is passed as ``system``,
    which every template knows. ``tools`` go to the template as given (tool_calls.py
    checked them); an assistant message's calls reach it with their arguments as an
    object, which is what templates write with ``tojson``. ``variables`` are the
    request's ``chat_template_kwargs`` (reasoning.py checked their names).
    """
    conversation = [_message(m) for m in messages]
    extra = {**(variables or {}), **({"tools": tools} if tools else {})}
    render = partial(tokenizer.apply_chat_template, conversation, add_generation_prompt=True, return_dict=False, **extra)
    try:
        if can_sanitize_control_tokens(tokenizer):
            try:
                ids = render(sanitize_control_tokens=True)
            except NotImplementedError:
                # A tokenizer class that takes the keyword but cannot honour it says
                # so this way: encode as the template wrote it.
                ids = render()
        else:
            ids = render()
    except Exception as exc:  # jinja2 TemplateError / ValueError raised by the template itself
        if type(exc).__module__.startswith("jinja2") or isinstance(exc, ValueError):
            raise bad_request(f"the chat template rejected the messages: {exc}", param="messages") from None
        raise
    return [int(t) for t in ids]


def _message(m: ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.name is not None and m.role == "tool":  # the function that answered, where templates show it
        message["name"] = m.name
    return message


def _arguments(text: str) -> Any:
    """A call's JSON arguments as an object, or the text itself when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def can_sanitize_control_tokens(tokenizer: Any) -> bool:
    """Whether ``apply_chat_template`` takes ``sanitize_control_tokens`` (transformers 5 does).

    Asked of the signature, not learnt from a TypeError: a template that itself raises
    TypeError must fail the request, not be rendered again without the guard that keeps
    users from forging ``<|im_start|>system``. A catch-all ``**kwargs`` does not count,
    since it would hand the keyword to the template, which would ignore it.
    """
    try:
        parameters = inspect.signature(tokenizer.apply_chat_template).parameters
    except (TypeError, ValueError):  # no signature to read (a C extension, a mock)
        return False
    return "sanitize_control_tokens" in parameters


def completion_prompt_ids(tokenizer: Any, prompt: str | list[int], vocab_size: int) -> list[int]:
    """Encode a completions prompt. Text gets the tokenizer's usual special tokens (BOS).

    Token-id prompts are used as given after a range check against the vocabulary.
    """
    if isinstance(prompt, str):
        ids = [int(t) for t in tokenizer(prompt)["input_ids"]]
    else:
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param="prompt")
        ids = list(prompt)
    if not ids:
        raise bad_request("the prompt is empty", param="prompt")
    return ids
