"""Token ids → text a client may see, one token at a time.

Two things make this more than ``decode``: a token can end inside a multi-byte UTF-8
character (its text must wait for the next token), and a stop sequence can arrive
split over several tokens (text that might start one is held back until we know).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a growing list of ids, releasing only text that will not change.

    Decoding a short window (from a few tokens back) rather than everything keeps each
    step O(1), and comparing two decodes of the same window handles tokenizers whose
    output for a token depends on its neighbours (leading spaces, byte fallback).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the very end)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


class StopMatcher:
    """Finds stop sequences in streamed text; holds back a possible beginning of one."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop sequence was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            released, self.pending = self.pending[: min(hits)], ""
            return released, True
        hold = self._possible_stop_start()
        released = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(released) :]
        return released, False

    def _possible_stop_start(self) -> int:
        """Length of the longest suffix of ``pending`` that begins some stop sequence."""
        return max((partial_suffix(self.pending, stop) for stop in self.stops), default=0)

    def flush(self) -> str:
        released, self.pending = self.pending, ""
        return released


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that begins ``marker`` without being all
    of it: what a stream must hold back until it knows whether ``marker`` follows."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
