"""A token's raw bytes, which its text cannot hold when it ends inside a character.

OpenAI's logprob entries carry ``bytes`` so that clients can rebuild text from tokens
that split a UTF-8 character (CJK, emoji): ``decode([id])`` gives U+FFFD for those.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` map, reversed: vocabulary character → the byte it stands for.

    Byte-level BPE (GPT-2, Llama 3, Qwen) works on bytes but stores its vocabulary as
    text, so each of the 256 bytes is given a printable character: printable Latin-1
    bytes stand for themselves, and the others (control characters, space, ...) are
    moved to U+0100 and up, in byte order. That is why a space shows as ``Ġ`` (U+0120)
    and a token holding half of ``é`` shows as ``Ã``.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    moved = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's spelling of one raw byte
_METASPACE = "\u2581"  # "▁": SentencePiece's spelling of a space


def _decoder_types(tokenizer: Any) -> set[str]:
    """The ``type`` of every step of a fast tokenizer's decoder (``ByteLevel``, ``ByteFallback``, ...).

    The decoder says how the vocabulary spells bytes, so it tells which mapping undoes
    it. ``Replace("▁", " ")`` (Llama 2 / Mistral) is reported as ``Metaspace``, the step
    it stands in for. A slow (Python) tokenizer has no decoder to read: GPT-2's keeps a
    ``byte_decoder`` and SentencePiece's an ``sp_model`` (``▁`` for a space, ``<0xNN>``
    for a raw byte). An empty set means "no known spelling": decode each token.
    """
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        if hasattr(tokenizer, "byte_decoder"):
            return {"ByteLevel"}
        return {"Metaspace", "ByteFallback"} if hasattr(tokenizer, "sp_model") else set()
    try:
        state = json.loads(decoder.__getstate__())
    except Exception:  # a custom (Python) decoder has no JSON form
        return set()
    found: set[str] = set()

    def walk(step: dict[str, Any]) -> None:
        kind = step.get("type", "")
        if kind == "Replace" and step.get("pattern", {}).get("String") == _METASPACE:
            kind = "Metaspace"
        found.add(kind)
        for inner in step.get("decoders", []):
            walk(inner)

    walk(state)
    return found


class TokenBytes:
    """How one tokenizer spells bytes, and the raw bytes of its tokens, computed once per id.

    ``tokenizer.decode([id])`` cannot give a token's bytes: a token holding part of a
    UTF-8 character decodes to U+FFFD. The vocabulary entry (``convert_ids_to_tokens``) still
    has every byte, in the tokenizer's own spelling; this class undoes that spelling.
    The bytes of a completion's tokens, concatenated, are the UTF-8 of its text (the
    one exception: SentencePiece's decoder drops the space in front of the very first
    token, which the token's bytes keep).

    The tokenizer is passed to each call rather than kept: :func:`token_bytes` keys its
    tables weakly by tokenizer, and a table holding its key would keep it alive.
    """

    def __init__(self, tokenizer: Any) -> None:
        kinds = _decoder_types(tokenizer)
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.metaspace = "Metaspace" in kinds
        self.added = frozenset(getattr(tokenizer, "added_tokens_decoder", {}))
        self.cache: dict[int, bytes] = {}

    def get(self, tokenizer: Any, token_id: int) -> bytes:
        raw = self.cache.get(token_id)
        if raw is None:
            raw = self.cache[token_id] = self._compute(tokenizer, token_id)
        return raw

    def _compute(self, tokenizer: Any, token_id: int) -> bytes:
        if token_id in self.added:
            # Added tokens (<|im_end|>, ...) are stored as plain text. Decode them as the
            # completion text is decoded, so a skipped special token has no bytes.
            return _decoded(tokenizer, token_id)
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):  # an id past the tokenizer (a padded embedding row)
            return _decoded(tokenizer, token_id)
        if self.byte_level:
            if all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
        elif self.byte_fallback and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m[1], 16)])
        elif self.metaspace:
            return piece.replace(_METASPACE, " ").encode("utf-8")
        return _decoded(tokenizer, token_id)


def _decoded(tokenizer: Any, token_id: int) -> bytes:
    """The last resort, right whenever a token holds whole characters."""
    return tokenizer.decode([token_id], skip_special_tokens=True).encode("utf-8")


# One table per tokenizer object, dropped with it. Only the event loop uses these.
_TABLES: weakref.WeakKeyDictionary[Any, TokenBytes] = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes of token ``token_id``: what OpenAI's logprob ``bytes`` field carries.

    Unlike the token's text these are exact for a token that ends (or starts) inside a
    multi-byte character, so a client can join the bytes of consecutive tokens and
    decode them. See :class:`TokenBytes`.
    """
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _TABLES[tokenizer] = TokenBytes(tokenizer)
    return table.get(tokenizer, token_id)
