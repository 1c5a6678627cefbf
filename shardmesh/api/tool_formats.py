"""How each model family writes a tool call, keyed by its chat template.

A model calls a tool by writing text its chat template taught it, and the families
differ. Each format here knows three things about one of them:

* whether a chat template is its (:meth:`ToolFormat.detect`, on the template's source);
* the grammar of a call, for ``tool_choice`` ``required`` or a named function, so that
  constrained decoding (``backends/grammar.py``) makes the answer a well-formed call
  to one of the functions, with arguments its ``parameters`` schema accepts;
* how to read calls back out of an answer (:meth:`ToolFormat.split`): the text around
  them, and each call's name and JSON arguments.

The formats:

* :data:`HERMES` (Qwen 2.5 and 3, Hermes, many fine-tunes): ``<tool_call>\\n{"name":
  ..., "arguments": {...}}\\n</tool_call>``, one block per call, text allowed around.
* :data:`LLAMA3_JSON` (Llama 3.1 to 3.3): the whole answer is ``{"name": ...,
  "parameters": {...}}``, optionally after ``<|python_tag|>``.
* :data:`MISTRAL` (Mistral's v3 templates): ``[TOOL_CALLS]`` then a JSON array of
  ``{"name": ..., "arguments": {...}}``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .structured_output import json_lexeme

__all__ = ["FORMATS", "HERMES", "LLAMA3_JSON", "MISTRAL", "Function", "ParsedCall", "ToolFormat", "format_for", "takes_tools"]


@dataclass(frozen=True)
class Function:
    """A tool the client offers: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ParsedCall:
    """A call read from an answer: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


def _call_schema(function: Function, arguments_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, arguments_key: function.parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def _one_of(functions: list[Function], arguments_key: str) -> tuple[str, list[str]]:
    """A Lark rule matching a call to any of ``functions``, and the rules it needs."""
    rules = [f"call_{i}: {json_lexeme(_call_schema(f, arguments_key))}" for i, f in enumerate(functions)]
    return " | ".join(f"call_{i}" for i in range(len(functions))), rules


def _parsed(obj: Any, arguments_key: str) -> ParsedCall | None:
    """``{"name": str, <arguments_key>: object}`` as a call; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True)
class ToolFormat:
    """One family's tool calls: see the module docstring.

    ``opens`` is the text a call (or the calls) begin with; ``closes`` the text one call
    ends with, or None when the calls run to the end of the answer. ``arguments_key``
    names the arguments in the call's JSON."""

    name: str
    marker: str  # a template that writes this is of this format
    opens: str
    closes: str | None
    arguments_key: str = "arguments"

    def detect(self, template: str) -> bool:
        return self.marker in template

    def grammar(self, functions: list[Function], parallel: bool, opener_token: int | None = None) -> str:
        """Answers that are one call (or, ``parallel``, one or more) to ``functions``.
        ``opener_token``: the id of ``opens`` where the tokenizer holds it as a special
        token, which text cannot spell (the grammar then names the token itself)."""
        choice, rules = _one_of(functions, self.arguments_key)
        opener = f"<[{opener_token}]>" if opener_token is not None else f'"{_lark(self.opens)}"'
        if self is MISTRAL:
            item = "call" if not parallel else 'call (", " call)*'
            return "\n".join([f'start: {opener} "[" {item} "]"', f"call: {choice}", *rules])
        if self.closes is None:  # one JSON object is the whole answer
            return "\n".join([f"start: {choice}", *rules])
        block = f'{opener} "\\n" ({choice}) "\\n{_lark(self.closes)}"'
        start = "block" if not parallel else 'block ("\\n" block)*'
        return "\n".join([f"start: {start}", f"block: {block}", *rules])

    def split(self, answer: str) -> tuple[str, list[ParsedCall]]:
        """The answer's text outside calls, and its calls. Text that looks like a call but
        does not parse stays text."""
        if self.closes is not None:
            calls, text, rest = [], [], answer
            while (start := rest.find(self.opens)) >= 0 and (end := rest.find(self.closes, start)) >= 0:
                call = _parsed(_loads(rest[start + len(self.opens) : end]), self.arguments_key)
                if call is None:
                    break
                text.append(rest[:start])
                calls.append(call)
                rest = rest[end + len(self.closes) :]
            return "".join(text) + rest, calls
        body = answer.strip()
        body = body[len(self.opens) :] if body.startswith(self.opens) else body
        parsed = _loads(body)
        items = parsed if isinstance(parsed, list) and self is MISTRAL else [parsed]
        calls = [_parsed(item, self.arguments_key) for item in items]
        if not items or any(c is None for c in calls):
            return answer, []
        return "", [c for c in calls if c is not None]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _lark(text: str) -> str:
    """``text`` inside a Lark string literal."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


HERMES = ToolFormat("hermes", marker="<tool_call>", opens="<tool_call>", closes="</tool_call>")
LLAMA3_JSON = ToolFormat("llama3_json", marker='"parameters": dictionary of argument name', opens="<|python_tag|>", closes=None,
                         arguments_key="parameters")
MISTRAL = ToolFormat("mistral", marker="[TOOL_CALLS]", opens="[TOOL_CALLS]", closes=None)
FORMATS = (HERMES, MISTRAL, LLAMA3_JSON)

_USES_TOOLS = re.compile(r"\btools\b")


def format_for(template: str) -> ToolFormat | None:
    """The tool-call format a chat template teaches; None when it teaches none we parse
    (:func:`takes_tools` tells apart a template that takes no tools at all)."""
    return next((f for f in FORMATS if f.detect(template)), None)


def takes_tools(template: str) -> bool:
    """Whether a chat template reads the ``tools`` variable at all."""
    return bool(_USES_TOOLS.search(template))
