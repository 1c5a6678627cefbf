"""CBOR from strangers, decoded into plain Python values only.

cbor2 decodes all of RFC 8949 and its registered tags: tags 28/29 share one value
between many places (so twenty nested pairs that each reference the level below are a
tree a million leaves wide, in two hundred bytes), tag 256 shares strings, other tags
build big numbers, dates, sets, regular expressions. Shared values cost nothing to
decode; they cost their whole *tree* the first time anything walks them: a ``repr``
in an error message, a ``cbor2.dumps`` when a field is forwarded. A few hundred bytes
can then take minutes and gigabytes. Nothing shardmesh sends needs any of it, so
nothing a peer sends reaches cbor2 until :func:`check_plain` has walked its bytes once
and found only this:

* unsigned and negative integers, byte strings, text strings, arrays, maps whose keys
  are text strings, ``false``, ``true``, ``null`` and floats (half, single, double);
* definite lengths only, each no larger than what the bytes left could hold: a
  string's length in bytes, an array's in items and a map's in pairs (every item takes
  at least one byte), so a claimed count is refused before anything is allocated;
* containers nested at most ``max_depth`` deep, ``max_items`` items in all;
* exactly one top-level item, nothing after it.

Refused: every tag, indefinite lengths, ``undefined`` and the other simple values,
reserved encodings, a truncated item, trailing bytes. The walk is one loop over an
explicit stack of counts (no recursion for a deep input to exhaust) that skips string
contents by their length, so it costs O(items) and never more than O(len(data)). What
passes decodes to a tree (no value shared between two places) of at most
``max_items`` nodes, so anything that later walks it, ``repr`` or ``dumps``
included, costs O(len(data)) too.

:func:`quote` and :func:`clip` are the other half of the rule "a stranger's value
costs what it weighs": error messages name a bad value by a short, truncated,
type-checked form, never its whole ``repr``, and a message that quotes input (a
library's exception text) is cut short.
"""

from __future__ import annotations

from typing import Any

import cbor2

MAX_DEPTH = 8  # deepest thing we send: a header's route, a list of hops, a hop's fields (3)
MAX_ITEMS = 4096  # an open with a 64-hop route is under 500 items; a record under 200

# Major types (the top three bits of an item's first byte).
_UINT, _NINT, _BYTES, _TEXT, _ARRAY, _MAP, _TAG, _SIMPLE = range(8)
_FALSE, _TRUE, _NULL = 20, 21, 22  # the simple values we accept
_FLOATS = {25: 2, 26: 4, 27: 8}  # additional info -> bytes of a half, single, double
_ARG_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}  # additional info -> bytes of the argument

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "PlainCborError", "check_plain", "clip", "loads_plain", "quote"]


class PlainCborError(ValueError):
    """Input that is not plain CBOR within the bounds. The message names what and at
    which byte offset, and never quotes the input itself; callers wrap it in their own
    error type (``WireError``, ``RecordError``, ...)."""


def check_plain(data: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> None:
    """Walk ``data`` once; raise :class:`PlainCborError` unless it is one plain CBOR item.

    ``stack`` holds, for each open container, the items it still expects; a map
    expects two per pair, and its next item is a key when the count left is even.
    """
    data = data if isinstance(data, bytes) else bytes(data)
    n, pos, items = len(data), 0, 0
    stack: list[int] = []
    maps: list[bool] = []  # parallel to stack: is that container a map?
    while True:
        if pos >= n:
            raise PlainCborError(f"truncated: an item is missing at byte {pos}")
        start, initial = pos, data[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        items += 1
        if items > max_items:
            raise PlainCborError(f"more than {max_items} items")
        if stack and maps[-1] and stack[-1] % 2 == 0 and major != _TEXT:
            raise PlainCborError(f"a map key at byte {start} is not a text string")
        if major == _TAG:
            raise PlainCborError(f"a tag at byte {start} (tags are refused)")
        if major == _SIMPLE:
            if info in _FLOATS:
                pos += _FLOATS[info]
                if pos > n:
                    raise PlainCborError(f"a float at byte {start} is truncated")
            elif info not in (_FALSE, _TRUE, _NULL):
                raise PlainCborError(f"a simple value or break (0x{initial:02x}) at byte {start}")
        else:
            if info < 24:
                arg = info
            elif info in _ARG_BYTES:
                size = _ARG_BYTES[info]
                if n - pos < size:
                    raise PlainCborError(f"a length at byte {start} is truncated")
                arg = int.from_bytes(data[pos : pos + size], "big")
                pos += size
            elif info == 31:
                raise PlainCborError(f"an indefinite length at byte {start} (refused)")
            else:
                raise PlainCborError(f"a reserved encoding (0x{initial:02x}) at byte {start}")
            left = n - pos
            if major in (_BYTES, _TEXT):
                if arg > left:
                    raise PlainCborError(f"a string at byte {start} claims {arg} bytes, {left} are left")
                pos += arg
            elif major in (_ARRAY, _MAP):
                claimed = arg * 2 if major == _MAP else arg
                # Every item takes at least a byte and counts against max_items: a count
                # that cannot fit is refused here, before cbor2 sizes anything by it.
                if claimed > left or claimed > max_items - items:
                    raise PlainCborError(
                        f"a container at byte {start} claims {arg} entries, more than the {left} bytes left"
                        f" or the bound of {max_items} items allow"
                    )
                if claimed:
                    if len(stack) >= max_depth:
                        raise PlainCborError(f"nested deeper than {max_depth} at byte {start}")
                    stack.append(claimed)
                    maps.append(major == _MAP)
                    continue  # its items come next; it is complete after the last of them
            # _UINT and _NINT: the argument is the value, nothing follows.
        # One item is complete: count it off its container, and close each container
        # that this completes in turn.
        while stack:
            stack[-1] -= 1
            if stack[-1]:
                break
            stack.pop()
            maps.pop()
        if not stack:
            break
    if pos != n:
        raise PlainCborError(f"{n - pos} bytes after the item")


def loads_plain(data: bytes | bytearray | memoryview, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> Any:
    """``data`` decoded, once :func:`check_plain` has passed it; :class:`PlainCborError`
    otherwise (cbor2's own refusals, e.g. a text string that is not UTF-8, included)."""
    data = data if isinstance(data, bytes) else bytes(data)
    check_plain(data, max_depth=max_depth, max_items=max_items)
    try:
        # The walk above already refused what these flags do; duplicate keys are left
        # to cbor2, which notices them as it builds each map.
        return cbor2.loads(data, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception as exc:  # CBORDecodeError, UnicodeDecodeError...: all mean "not plain CBOR"
        raise PlainCborError(clip(str(exc))) from None


def quote(value: Any, limit: int = 48) -> str:
    """A short, safe name for an untrusted value in an error message.

    Strings and numbers are shown (strings cut to ``limit`` characters, with their
    length); containers and bytes by their type and size only. The cost is O(limit)
    whatever the value is, where ``repr`` would walk it all.
    """
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return str(value) if -(10**18) < value < 10**18 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"a map of {len(value)} entries"
    return f"a {type(value).__name__}"


def clip(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: for messages that may quote a stranger's
    input (a library's exception text, an error relayed from another peer)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
