"""The gateway: OpenAI's HTTP API in front of whatever chain serves the model.

This room turns an HTTP request into token ids, drives one generation through a
:class:`~shardmesh.contract.ChainOpener` (local blocks or a chain of peers, it does not
know which), replays it on a new chain when one breaks, and writes OpenAI's JSON or
server-sent events back. It imports only the contract, never torch: a ``--layers none``
gateway holds the tokenizer and nothing heavier. See ``docs/ARCHITECTURE.md``, "The life
of a request".

The names below are this room's public modules; importing the package loads none of
them (``from shardmesh.api import generate`` does).
"""

__all__ = [
    "app",
    "auth",
    "chat_template",
    "choices",
    "errors",
    "formats",
    "generate",
    "messages",
    "metrics",
    "metrics_app",
    "prompts",
    "reasoning",
    "request_body",
    "response_json",
    "resumable",
    "schemas",
    "server",
    "speculation",
    "streaming",
    "structured_output",
    "text",
    "token_bytes",
    "tokenizer",
    "tool_calls",
    "tool_formats",
]
