"""Chat templates rendered as transformers renders them, with jinja2 alone.

A model's chat template is untrusted code from the hub, so it runs in jinja2's immutable
sandbox, set up the way transformers sets it up (``trim_blocks``, ``lstrip_blocks``,
``loopcontrols``, the helpers templates call: ``raise_exception``, ``strftime_now``, a
``tojson`` that keeps non-ASCII text and HTML characters as they are, a guarded ``dict``
and ``namespace``). Templates must render to the same text here as there, character
for character, or a model would read a prompt it was not trained on.

It also holds the guard against forged control tokens: :func:`mark_control_tokens`
wraps each control token found in user text (``<|im_start|>`` typed into a message) in
two private-use characters before rendering, so that the encoder (``tokenizer.py``) can
tell them from the control tokens the template wrote, and encode them as plain text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "compile_template",
    "control_token_patterns",
    "mark_control_tokens",
    "render",
    "template_literal_text",
]

# Private-use characters put around a control token typed by a user. A user cannot type
# them in turn: they are stripped from user text before marking.
CONTROL_START = "\U000f0000"
CONTROL_END = "\U000f0001"

# Names a message's reasoning arrives under; templates read the first, gpt-oss reads "thinking".
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body. Training templates
    mark the assistant's tokens with it; a template that uses it must still compile."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Dict:
    """``dict(...)`` in a template, without the class itself (its attributes lead out of the sandbox)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's ``namespace()``, refusing underscore names (a way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's own signature trick: `self` may be a keyword
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson escapes <, >, & and ' for HTML; templates are not HTML.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per distinct source, in the sandbox described above."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def plain_data(value: Any) -> Any:
    """``value`` rebuilt from JSON types only: what a template may see.

    Objects with methods (a pydantic model, a dataclass, anything else) could reach
    outside the sandbox; models and dataclasses become dicts, anything else a
    ``<TypeName>`` placeholder, and subclasses of str/int/float their base type.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_messages(conversation: Any) -> list[dict]:
    """Messages as plain dicts without the keys whose value is None (OpenAI clients send
    ``content=None``; templates handle a missing key, not a None one)."""
    messages = plain_data(conversation)
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """A message's reasoning under every name templates read it by."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render(
    source: str,
    messages: list[dict],
    *,
    tools: list[dict] | None,
    documents: list[dict] | None,
    add_generation_prompt: bool,
    variables: dict[str, Any],
) -> str:
    """The chat as the template writes it. ``variables`` are the special tokens
    (``bos_token``, ``eos_token``, ...) and any extra template variables."""
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise ValueError("Tools should be JSON schemas (dicts).")
    if documents is not None and not all(isinstance(doc, dict) for doc in documents):
        raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    return compile_template(source).render(
        messages=_alias_reasoning(plain_data(messages)),
        tools=plain_data(tools),
        documents=plain_data(documents),
        add_generation_prompt=add_generation_prompt,
        **plain_data(variables),
    )


@functools.lru_cache(maxsize=16)
def template_literal_text(source: str) -> str:
    """Every piece of literal text and every string constant of a template, joined by
    NULs (so that a search cannot match across two): where control tokens are written."""
    ast = compile_template(source).environment.parse(source)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


@functools.lru_cache(maxsize=16)
def control_token_patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """A regex matching any of ``tokens`` (longest first, so a token wins over the
    tokens inside it), and one matching a marked token or a lone marker."""
    longest_first = sorted(tokens, key=len, reverse=True)
    any_token = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")  # (?!) never matches
    marked = re.compile(f"{CONTROL_START}({any_token.pattern}){CONTROL_END}|[{CONTROL_START}{CONTROL_END}]")
    return any_token, marked


def mark_control_tokens(obj: Any, any_token: re.Pattern) -> Any:
    """Every control token in the strings of ``obj`` (messages, tools, documents)
    wrapped in the markers; markers already there are dropped first, so none can be
    forged. Dict keys are left alone."""
    if isinstance(obj, str):
        obj = obj.replace(CONTROL_START, "").replace(CONTROL_END, "")
        return any_token.sub(f"{CONTROL_START}\\g<0>{CONTROL_END}", obj)
    if isinstance(obj, dict):
        return {key: mark_control_tokens(value, any_token) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark_control_tokens(value, any_token) for value in obj]
    return obj
