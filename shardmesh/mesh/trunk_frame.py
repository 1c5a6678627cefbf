"""A ``steps`` frame: the steps of several sessions between the same two hops, as one.

A hop computes the decode steps of its concurrent sessions as one batch, and most of
their outputs go to the same next hop. Sent one frame per session, each output pays its
own header, seal and socket write here and its own read, open and wake-up there. On a
trunk (:mod:`.trunk`) they travel as one frame (docs/PROTOCOL.md 6.7)::

    header  {t: "steps", items: [{session, start, position, want, spent, n[, draft]}, ...],
             dtype, shape: [sum of n, hidden], nbytes}
    payload the items' hidden states, stacked in the order of ``items``

Pure functions, no I/O: :func:`steps_frame` builds one from the step frames a hop would
have sent; :func:`check_steps_header` bounds a received header before its payload is
read; :func:`split_steps` cuts a received frame back into one ``step`` frame per item,
which the hop then checks and runs exactly as if it had come on the session's own
stream. A frame that is wrong as a whole raises :class:`~.wire.WireError` (the trunk
ends); what is wrong with one item is found later and ends that item's session alone.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..contract import DTYPE_SIZES
from .cbor_plain import quote
from .open_request import MAX_SESSION_ID, session_key
from .wire import STEP, STEPS, Frame, WireError

MAX_TRUNK_ITEMS = 64  # sessions in one frame (a hop's batch is at most 32)
ITEM_FIELDS = ("position", "want", "spent", "draft")  # passed through to the step, checked there

__all__ = ["ITEM_FIELDS", "MAX_TRUNK_ITEMS", "check_steps_header", "split_steps", "steps_frame"]


def steps_frame(steps: Sequence[tuple[int, dict[str, Any], bytes]]) -> tuple[dict[str, Any], bytes]:
    """One ``steps`` frame for ``steps``: ``(start, step header, payload)`` each, where
    ``start`` is the receiving hop's first block and every header a ``step`` of hidden
    states of the same dtype and width."""
    items, payloads = [], []
    dtype, width, total = None, None, 0
    for start, header, payload in steps:
        n, w = header["shape"]
        if dtype is None:
            dtype, width = header["dtype"], w
        assert (header["dtype"], w) == (dtype, width), "a steps frame holds one dtype and width"
        item = {"session": header["session"], "start": start, "n": n}
        item.update((k, header[k]) for k in ITEM_FIELDS if k in header)
        items.append(item)
        payloads.append(payload)
        total += n
    return {"t": STEPS, "items": items, "dtype": dtype, "shape": [total, width]}, b"".join(payloads)


def check_steps_header(header: dict[str, Any], max_tokens: int) -> None:
    """Refuse a ``steps`` header that is malformed as a whole, before its payload is
    read: items, their token counts, the tensor's dtype and shape."""
    items, dtype, shape = header.get("items"), header.get("dtype"), header.get("shape")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_TRUNK_ITEMS:
        raise WireError("bad_frame", f"a steps frame carries 1 to {MAX_TRUNK_ITEMS} items")
    if dtype not in DTYPE_SIZES or dtype in ("int32", "int64"):
        raise WireError("bad_input", f"a steps frame carries hidden states, not {quote(dtype)}")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
        raise WireError("bad_input", "a steps frame's shape is [tokens, hidden size]")
    total = 0
    for item in items:
        if not isinstance(item, dict):
            raise WireError("bad_frame", "each item of a steps frame is a map")
        session, start, n = item.get("session"), item.get("start"), item.get("n")
        if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_ID:
            raise WireError("bad_frame", f"an item's session is text of 1 to {MAX_SESSION_ID} characters")
        if type(start) is not int or start < 0 or type(n) is not int or n <= 0:
            raise WireError("bad_frame", "an item's start and n are integers, n at least 1")
        total += n
    if total != shape[0]:
        raise WireError("bad_input", f"the items hold {total} tokens, the tensor {shape[0]}")
    if total > max_tokens:
        raise WireError("too_large", f"{total} tokens in one steps frame (limit {max_tokens})")


def split_steps(frame: Frame, max_tokens: int) -> list[tuple[str, Frame]]:
    """``(session key, step frame)`` for each item of ``frame`` (a ``steps`` frame), in
    order; its header is checked again (:func:`check_steps_header`) and its payload must
    be exactly the tensor it announces."""
    header = frame.header
    check_steps_header(header, max_tokens)
    dtype, (total, width) = header["dtype"], header["shape"]
    row = width * DTYPE_SIZES[dtype]
    if len(frame.payload) != total * row:
        raise WireError("bad_input", f"payload of {len(frame.payload)} bytes does not hold {dtype} [{total}, {width}]")
    view = memoryview(frame.payload)
    steps, at = [], 0
    for item in header["items"]:
        n = item["n"]
        step = {"t": STEP, "session": item["session"], "dtype": dtype, "shape": [n, width]}
        step.update((k, item[k]) for k in ITEM_FIELDS if k in item)
        steps.append((session_key(item["session"], item["start"]), Frame(step, bytes(view[at : at + n * row]))))
        at += n * row
    return steps
