"""``response_format``: answers that are JSON, or JSON that a schema accepts.

The gateway turns a request's ``response_format`` into a grammar (llguidance's Lark
dialect, the schema embedded as ``%json``) that travels in the sampling parameters to
the last hop of the chain, which masks every token that would leave the grammar
(``backends/grammar.py``). So the answer is valid by construction, however weak the
model, and a failover replay continues it on another chain.

* ``{"type": "text"}`` (or none): no grammar.
* ``{"type": "json_object"}``: any JSON object.
* ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``:
  a JSON value the schema accepts. It is enforced whether ``strict`` is true or not
  (OpenAI enforces it only with ``strict``; enforcing more never breaks a client). A
  schema the engine cannot compile (a malformed one, or keywords it does not
  implement) is a 400 that says why.

The JSON is written on one line, ``json.dumps``-style (``", "`` and ``": "``, no other
whitespace): a random-weight model cannot pad it with endless blank lines, and every
answer that ends before ``max_tokens`` parses.
"""

from __future__ import annotations

import json
from typing import Any

from ..contract.sampling import MAX_GRAMMAR_BYTES
from .errors import bad_request

__all__ = ["check_grammar", "grammar_error", "json_grammar", "json_lexeme", "response_format_grammar"]

# How the JSON is laid out (llguidance's JSON options, read from the schema's "x-guidance").
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_error(grammar: str) -> str | None:
    """Why a hop would refuse ``grammar``, or None. Checked without the model's
    vocabulary (so without its tokenizer or torch): syntax, schema keywords, limits."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else None


def json_grammar(schema: dict[str, Any]) -> str:
    """A grammar for JSON that ``schema`` accepts, laid out as described above."""
    return "start: " + json_lexeme(schema)


def json_lexeme(schema: dict[str, Any]) -> str:
    """JSON that ``schema`` accepts, laid out as above, as a piece of a larger grammar."""
    return "%json " + json.dumps({**schema, "x-guidance": _LAYOUT}, ensure_ascii=False)


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar of a chat request's ``response_format``, or None for plain text;
    a 400 naming ``response_format`` for anything malformed or unsupported."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise bad_request("response_format must be an object", param="response_format")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise bad_request("response_format json_schema needs a 'json_schema' object with a 'name'", param="response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object", param="response_format")
    else:
        raise bad_request(f"response_format type must be 'text', 'json_object' or 'json_schema', got {str(kind)[:40]!r}",
                          param="response_format")
    grammar = json_grammar(schema)
    check_grammar(grammar, "response_format")
    return grammar


def check_grammar(grammar: str, param: str) -> None:
    """A 400 naming ``param`` when ``grammar`` is too long or would not compile."""
    if len(grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
        raise bad_request(f"the schema is too large: at most {MAX_GRAMMAR_BYTES} bytes once written as a grammar",
                          param=param)
    error = grammar_error(grammar)
    if error is not None:
        raise bad_request(f"Invalid schema for {param}: {error[:500]}", param=param)
