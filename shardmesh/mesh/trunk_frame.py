"""Frames of a trunk: the steps (or tokens) of several sessions as one frame.

A hop computes the decode steps of its concurrent sessions as one batch, and most of
their outputs go to the same next hop. Sent one frame per session, each output pays its
own header, seal and socket write here and its own read, open and wake-up there. On a
trunk (:mod:`.trunk`) they travel as one frame (docs/PROTOCOL.md 6.7)::

    header  {t: "steps", items: [{session, start, position, want, spent, n[, draft]}, ...],
             dtype, shape: [sum of n, hidden] (or [sum of n] for token ids), nbytes}
    payload the items' inputs, stacked in the order of ``items``

The last hop's sampled tokens go back to a gateway the same way, in a ``results`` frame
whose payload is the ``result`` frames it would have sent, one after the other::

    header  {t: "results", count, nbytes}
    payload count × (u32be header length | CBOR header of a result frame)

Pure functions, no I/O: :func:`steps_frame` and :func:`results_frame` build them from the
frames a hop would have sent one by one; :func:`check_steps_header` bounds a received
header before its payload is read; :func:`split_steps` and :func:`split_results` cut a
received frame back into those frames, which are then checked and used exactly as if
each had come on its session's own stream. A frame that is wrong as a whole raises
:class:`~.wire.WireError` (the trunk ends); what is wrong with one item is found later
and ends that item's session alone.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

from ..contract import DTYPE_SIZES
from .cbor_plain import PlainCborError, loads_plain, quote
from .open_request import MAX_SESSION_ID, session_key
from .wire import MAX_HEADER_BYTES, RESULT, RESULTS, STEP, STEPS, Frame, WireError, encode_frame

MAX_TRUNK_ITEMS = 64  # sessions in one frame (a hop's batch is at most 32)
ITEM_FIELDS = ("position", "want", "spent", "draft")  # passed through to the step, checked there
TOKEN_IDS = ("int64", "int32")  # a steps frame of token ids feeds a hop starting at block 0

__all__ = ["ITEM_FIELDS", "MAX_TRUNK_ITEMS", "check_steps_header", "results_frame", "split_results", "split_steps", "steps_frame"]


def steps_frame(steps: Sequence[tuple[int, dict[str, Any], bytes]]) -> tuple[dict[str, Any], bytes]:
    """One ``steps`` frame for ``steps``: ``(start, step header, payload)`` each, where
    ``start`` is the receiving hop's first block and every header a ``step`` of the same
    dtype and width (hidden states ``[n, width]``, or token ids ``[n]``)."""
    items, payloads = [], []
    dtype, width, total = None, None, 0
    for start, header, payload in steps:
        n, *w = header["shape"]
        if dtype is None:
            dtype, width = header["dtype"], w
        assert (header["dtype"], w) == (dtype, width), "a steps frame holds one dtype and width"
        item = {"session": header["session"], "start": start, "n": n}
        item.update((k, header[k]) for k in ITEM_FIELDS if k in header)
        items.append(item)
        payloads.append(payload)
        total += n
    return {"t": STEPS, "items": items, "dtype": dtype, "shape": [total, *(width or [])]}, b"".join(payloads)


def check_steps_header(header: dict[str, Any], max_tokens: int) -> None:
    """Refuse a ``steps`` header that is malformed as a whole, before its payload is
    read: items, their token counts, the tensor's dtype and shape."""
    items, dtype, shape = header.get("items"), header.get("dtype"), header.get("shape")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_TRUNK_ITEMS:
        raise WireError("bad_frame", f"a steps frame carries 1 to {MAX_TRUNK_ITEMS} items")
    if dtype not in DTYPE_SIZES:
        raise WireError("bad_input", f"unsupported dtype {quote(dtype)}")
    dims = 1 if dtype in TOKEN_IDS else 2
    if not (isinstance(shape, list) and len(shape) == dims and all(type(d) is int and d > 0 for d in shape)):
        raise WireError("bad_input", "a steps frame's shape is [tokens] for token ids, [tokens, hidden size] for hidden states")
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
    dtype, (total, *width) = header["dtype"], header["shape"]
    row = (width[0] if width else 1) * DTYPE_SIZES[dtype]
    if len(frame.payload) != total * row:
        raise WireError("bad_input", f"payload of {len(frame.payload)} bytes does not hold {dtype} {header['shape']}")
    view = memoryview(frame.payload)
    steps, at = [], 0
    for item in header["items"]:
        n = item["n"]
        step = {"t": STEP, "session": item["session"], "dtype": dtype, "shape": [n, *width]}
        step.update((k, item[k]) for k in ITEM_FIELDS if k in item)
        steps.append((session_key(item["session"], item["start"]), Frame(step, bytes(view[at : at + n * row]))))
        at += n * row
    return steps


def results_frame(results: Sequence[tuple[int, dict[str, Any], bytes]]) -> tuple[dict[str, Any], bytes]:
    """One ``results`` frame for ``results`` (``(_, result header, b"")`` each, as a
    trunk holds them): their frames, one after the other, as its payload."""
    return {"t": RESULTS, "count": len(results)}, b"".join(encode_frame(header) for _, header, _ in results)


def split_results(frame: Frame) -> list[Frame]:
    """The ``result`` frames inside ``frame`` (a ``results`` frame), each header decoded
    as a frame's is (plain CBOR, at most :data:`~.wire.MAX_HEADER_BYTES`), each a map of
    type ``result`` naming a session; anything else is wrong with the whole frame."""
    count, payload = frame.header.get("count"), frame.payload
    if type(count) is not int or not 0 < count <= MAX_TRUNK_ITEMS:
        raise WireError("bad_frame", f"a results frame carries 1 to {MAX_TRUNK_ITEMS} results")
    results, at = [], 0
    for _ in range(count):
        if at + 4 > len(payload):
            raise WireError("bad_frame", "a results frame holds fewer results than it counts")
        (size,) = struct.unpack_from(">I", payload, at)
        if not 0 < size <= min(MAX_HEADER_BYTES, len(payload) - at - 4):
            raise WireError("bad_frame", f"a result of {size} bytes in a results frame")
        try:
            header = loads_plain(payload[at + 4 : at + 4 + size])
        except PlainCborError as exc:
            raise WireError("bad_frame", f"a result that is not plain CBOR: {exc}") from None
        if not isinstance(header, dict) or header.get("t") != RESULT or not isinstance(header.get("session"), str):
            raise WireError("bad_frame", "each result of a results frame is a result frame's header with its session")
        results.append(Frame(header))
        at += 4 + size
    if at != len(payload):
        raise WireError("bad_frame", "a results frame holds more than it counts")
    return results
