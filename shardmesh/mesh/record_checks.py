"""The field checks of a NodeRecord body: types, and every bound docs/PROTOCOL.md states.

A record body comes from a peer we do not trust, so each field is checked for its type
*and* its size before anything is built from it: a map of 600 ``rtt`` entries, a
``limits`` of 0 or of 2**64, a thousand addresses, or a "device" of 10 KiB are all
refused, though each fits in :data:`~.records.MAX_RECORD_BYTES`. The bounds here are the
spec's (section 3.2); :func:`~.records.sign_record` runs the same checks on our own
record, so a node learns at home that peers would refuse it.

Every check costs O(the field's size): the body is already decoded (plain CBOR, bounded
in bytes and item count), and text lengths are UTF-8 byte counts.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .cbor_plain import quote

MAX_BLOCKS = 10_000  # far beyond any model; bounds what a reader allocates per block
MAX_RTT_ENTRIES = 32  # rtt map keeps the nearest peers only
MAX_RTT_MS = 60_000.0  # an rtt above a minute is not a measurement worth routing on
MAX_ADDRS = 16  # addresses one node publishes (one per interface and transport)
MAX_TEXT_BYTES = 256  # any text field, each address, each map key (UTF-8 bytes)
MAX_LIMITS = 16  # entries in the limits map
MAX_LIMIT_VALUE = 2**31 - 1  # a limit must fit a signed 32-bit integer in any client
MAX_SUSPECTS = 8  # peers one record may name as found unreachable (a hint: mesh/hints.py)

__all__ = [
    "MAX_ADDRS", "MAX_BLOCKS", "MAX_LIMITS", "MAX_LIMIT_VALUE", "MAX_RTT_ENTRIES", "MAX_RTT_MS", "MAX_SUSPECTS",
    "MAX_TEXT_BYTES", "RecordError", "addr_list", "field", "integer", "is_float", "is_int", "limits_map", "number",
    "rtt_map", "suspect_list", "text",
]


class RecordError(ValueError):
    """A record that must not be believed.

    ``reason`` is one of a small fixed vocabulary (callers and tests branch on it);
    ``detail`` is for humans and logs.
    """

    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad-signature"
    EXPIRED = "expired"
    EXPIRY_TOO_FAR = "expiry-too-far"
    WRONG_PEER = "wrong-peer"
    WRONG_MODEL = "wrong-model"
    WRONG_KEY = "wrong-key"
    BAD_SPAN = "bad-span"
    BAD_STATE = "bad-state"
    NO_ROOM = "no-room"  # valid, but the store that was asked to keep it is full

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _malformed(detail: str) -> RecordError:
    return RecordError(RecordError.MALFORMED, detail)


def field(m: dict, name: str) -> Any:
    if name not in m:
        raise _malformed(f"missing field {name!r}")
    return m[name]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # bool is an int in Python


def is_float(v: Any) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _short_text(v: Any) -> bool:
    # len(v) <= the bound first: a long string is refused without being encoded
    return isinstance(v, str) and len(v) <= MAX_TEXT_BYTES and len(v.encode("utf-8", "surrogatepass")) <= MAX_TEXT_BYTES


def text(m: dict, name: str) -> str:
    v = field(m, name)
    if not isinstance(v, str):
        raise _malformed(f"field {name!r} must be a string")
    if not _short_text(v):
        raise _malformed(f"field {name!r} is longer than {MAX_TEXT_BYTES} bytes")
    return v


def integer(m: dict, name: str) -> int:
    v = field(m, name)
    if not is_int(v):
        raise _malformed(f"field {name!r} must be an integer")
    return v


def number(m: dict, name: str) -> float:
    v = field(m, name)
    if not is_float(v):
        raise _malformed(f"field {name!r} must be a finite number")
    return float(v)


def addr_list(m: dict, peer: str) -> list[str]:
    """``addrs``: at most MAX_ADDRS short strings, each ending in ``/p2p/<peer>``."""
    v = field(m, "addrs")
    if not isinstance(v, list):
        raise _malformed("field 'addrs' must be a list of strings")
    if len(v) > MAX_ADDRS:
        raise _malformed(f"{len(v)} addrs (at most {MAX_ADDRS})")
    suffix = f"/p2p/{peer}"
    for addr in v:
        if not _short_text(addr):
            raise _malformed(f"each of 'addrs' must be a string of at most {MAX_TEXT_BYTES} bytes")
        if not addr.endswith(suffix):
            raise _malformed(f"address {quote(addr)} does not end in /p2p/<peer>")
    return v


def _bounded_map(m: dict, name: str, max_entries: int, ok: Callable[[Any], bool], conv, what: str) -> dict:
    v = field(m, name)
    if not isinstance(v, dict):
        raise _malformed(f"field {name!r} must be a map")
    if len(v) > max_entries:
        raise _malformed(f"field {name!r} has {len(v)} entries (at most {max_entries})")
    for k, x in v.items():
        if not _short_text(k) or not ok(x):
            raise _malformed(f"field {name!r} must map strings of at most {MAX_TEXT_BYTES} bytes to {what}")
    return {k: conv(x) for k, x in v.items()}


def suspect_list(m: dict, peer: str) -> list[str]:
    """``suspects`` (optional): at most MAX_SUSPECTS short strings, none of them ``peer``."""
    if "suspects" not in m:
        return []
    v = m["suspects"]
    if not isinstance(v, list) or len(v) > MAX_SUSPECTS or not all(_short_text(s) and s != peer for s in v):
        raise _malformed(f"field 'suspects' must be a list of at most {MAX_SUSPECTS} other peer ids")
    return v


REACHABILITY = ("public", "private", "unknown")  # whether others can dial the node (dialback.py)


def reachability(m: dict) -> str:
    """``reach`` (optional, ``unknown`` when absent): one of :data:`REACHABILITY`."""
    v = m.get("reach", "unknown")
    if v not in REACHABILITY:
        raise _malformed(f"field 'reach' must be one of {', '.join(REACHABILITY)}")
    return v


def rtt_map(m: dict) -> dict[str, float]:
    """``rtt``: at most MAX_RTT_ENTRIES peer -> ms, each ms finite in [0, MAX_RTT_MS]."""
    return _bounded_map(
        m, "rtt", MAX_RTT_ENTRIES, lambda x: is_float(x) and 0 <= x <= MAX_RTT_MS, float, f"numbers in [0, {MAX_RTT_MS:.0f}]"
    )


def limits_map(m: dict) -> dict[str, int]:
    """``limits`` (optional): at most MAX_LIMITS name -> integer in [1, MAX_LIMIT_VALUE].

    A limit of 0 would tell every client that the node takes nothing, and a negative or
    huge one means nothing at all; neither is a limit a node can enforce.
    """
    if "limits" not in m:
        return {}
    return _bounded_map(
        m, "limits", MAX_LIMITS, lambda x: is_int(x) and 1 <= x <= MAX_LIMIT_VALUE, int, f"integers in [1, {MAX_LIMIT_VALUE}]"
    )
