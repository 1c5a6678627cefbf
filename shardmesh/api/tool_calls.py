"""Tool calls: what a request's ``tools`` and ``tool_choice`` mean, and calls read back.

The tools are rendered by the model's chat template (``prompts.py``), which also decides
how the model writes a call (:mod:`.tool_formats`). What the gateway adds:

* ``tool_choice``: ``auto`` (the default with tools) lets the model answer with text or
  calls; ``none`` reads no calls out of the answer; ``required`` and a named function
  (``{"type": "function", "function": {"name": ...}}``) add a grammar to the sampling
  parameters, so the answer *is* a call (``required``: to any of the tools, one or more
  with ``parallel_tool_calls``, the default) whose arguments the function's
  ``parameters`` schema accepts, however weak the model.
* Reading calls back: :class:`CallSplitter` splits a streamed answer into content and
  calls as the text arrives; whole answers go through the format's ``split``. A call is
  reported with an id of ours (``call_`` and 24 hex digits), its name and its arguments
  as JSON text, and the answer's ``finish_reason`` becomes ``tool_calls``.

A model whose template takes no tools, or writes calls in a format we do not read, gets
a 400 that says so, rather than tools silently dropped.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from .errors import bad_request
from .text import partial_suffix
from .structured_output import check_grammar
from .tool_formats import Function, ParsedCall, ToolFormat, format_for, takes_tools

__all__ = ["CallSplitter", "MAX_TOOLS", "ToolPlan", "call_json", "tool_plan", "tool_plan_for"]

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its generation: the tools as the template takes
    them, the format to read calls with (None for ``tool_choice: none``), and the
    grammar that forces a call (None unless ``required`` or a named function)."""

    tools: list[dict[str, Any]]
    format: ToolFormat | None
    grammar: str | None


def _function(index: int, tool: Any) -> Function:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(f"{where} must be {{'type': 'function', 'function': {{...}}}}", param="tools")
    spec = tool["function"]
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise bad_request(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'", param="tools")
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}.function.parameters must be a JSON schema object", param="tools")
    return Function(name, parameters)


def tool_plan(tools: list[Any] | None, tool_choice: Any, parallel: bool | None, template: str | None,
              opener_token: Any = None) -> ToolPlan | None:
    """The plan for a chat request's tools, or None without tools; a 400 naming the
    field for anything malformed, unsupported by this model, or contradictory.
    ``opener_token(text)`` gives the id of a special token spelled ``text``, or None."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    functions = [_function(i, tool) for i, tool in enumerate(tools)]
    if len({f.name for f in functions}) != len(functions):
        raise bad_request("tool names must differ", param="tools")
    if template is None or not takes_tools(template):
        raise bad_request("this model's chat template does not take tools", param="tools")
    fmt = format_for(template)
    if fmt is None:
        raise bad_request("this model's chat template writes tool calls in a format this gateway does not read "
                          "(it reads Hermes/Qwen <tool_call>, Llama 3 JSON and Mistral [TOOL_CALLS])", param="tools")
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan(tools, None, None)
    if choice == "auto":
        return ToolPlan(tools, fmt, None)
    if choice == "required":
        forced = functions
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        forced = [f for f in functions if f.name == choice["function"].get("name")]
        if not forced:
            raise bad_request("tool_choice names a function that is not among the tools", param="tool_choice")
    else:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                          param="tool_choice")
    opener = opener_token(fmt.opens) if opener_token is not None else None
    grammar = fmt.grammar(forced, parallel is not False and choice == "required", opener)
    check_grammar(grammar, "tools")
    return ToolPlan(tools, fmt, grammar)


def tool_plan_for(tokenizer: Any, tools: list[Any] | None, tool_choice: Any, parallel: bool | None) -> ToolPlan | None:
    """:func:`tool_plan` with the template and special tokens of ``tokenizer``."""
    template = None
    if tools:
        try:
            template = tokenizer.get_chat_template(tools)
        except ValueError:  # no chat template at all
            template = None

    def special_id(text: str) -> int | None:
        token = tokenizer.convert_tokens_to_ids(text)
        added = tokenizer.added_tokens_decoder.get(token) if isinstance(token, int) else None
        return token if added is not None and added.special and added.content == text else None

    return tool_plan(tools, tool_choice, parallel, template if isinstance(template, str) else None, special_id)


def call_json(call: ParsedCall) -> dict[str, Any]:
    """A call as OpenAI writes it in a message, with a fresh id."""
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


class CallSplitter:
    """A streamed answer split into content and calls as its text arrives.

    Content is released as soon as it cannot be the start of a call; a call is released
    whole, once its closing text arrived (or, for formats whose calls run to the end of
    the answer, at :meth:`finish`). Whitespace before or between calls is not content."""

    # Llama 3's bare JSON call is told from text by its first character, so an answer
    # that has said nothing yet holds even its whitespace (see feed).

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.pending = ""
        self.in_call = False
        self.space = ""  # whitespace held until non-blank content follows it
        self.said = False  # content released already
        self.called = False  # a call was found
        self.scanned = 0  # how far into pending the closing text was looked for: a long call is not scanned again

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        self.pending += text
        out: list[str] = []
        calls: list[ParsedCall] = []
        while True:
            if not self.in_call:
                if self.fmt.closes is None and not self.said and self.pending.lstrip().startswith("{"):
                    self.in_call = True  # a bare JSON answer is a call (Llama 3)
                    continue
                at = self.pending.find(self.fmt.opens)
                if at < 0:
                    keep = partial_suffix(self.pending, self.fmt.opens)
                    if self.fmt.closes is None and not self.said and not self.pending.strip():
                        keep = len(self.pending)  # an answer not started yet may still be a bare JSON call
                    out.append(self._content(self.pending[: len(self.pending) - keep]))
                    self.pending = self.pending[len(self.pending) - keep :]
                    break
                out.append(self._content(self.pending[:at]))
                self.pending, self.in_call = self.pending[at:], True
            if self.fmt.closes is None:
                break
            end = self.pending.find(self.fmt.closes, max(0, self.scanned - len(self.fmt.closes) + 1))
            if end < 0:
                self.scanned = len(self.pending)
                break
            self.scanned = 0
            block = self.pending[: end + len(self.fmt.closes)]
            text_left, found = self.fmt.split(block)
            if found:
                self.space, self.called = "", True  # whitespace before a call is not content
            out.append(self._content(text_left))
            calls += found
            self.pending, self.in_call = self.pending[len(block) :], False
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        text, calls = self.fmt.split(self.pending) if self.in_call else (self.pending, [])
        self.pending = ""
        if calls:
            self.space, self.called = "", True
        return self._content(text, last=True), calls

    def _content(self, text: str, last: bool = False) -> str:
        """Content to release: trailing whitespace waits for what follows it (a call
        drops it; more content, or an answer's end without calls, releases it)."""
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body) :]
        if last:
            body, self.space = (text if not self.called else body), ""
        self.said = self.said or bool(body)
        return body
