"""Names for a token history's prefixes, shared by the hops that cache them and the
gateway that routes to them.

A history is cut into blocks of :data:`PREFIX_BLOCK` tokens. Block ``i``'s name is a
hash of block ``i - 1``'s name and block ``i``'s tokens, so one name stands for the
whole prefix before it: two histories share block ``i``'s name only if their first
``(i + 1) * PREFIX_BLOCK`` tokens are equal. The first name also hashes a ``scope``
(a hop uses the gateway's peer id and the blocks it runs), so that equal prompts from
different scopes never share a name. An unfinished last block has no name: a cache
never holds part of a block, which keeps one session from reading another's keys and
values past the exact prefix they share.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Sequence

PREFIX_BLOCK = 64  # tokens per named block


def prefix_names(tokens: Sequence[int], scope: str = "") -> list[bytes]:
    """The name of every whole block of ``tokens``, first block first (``len(tokens) //
    PREFIX_BLOCK`` of them). O(len(tokens))."""
    name = hashlib.blake2b(scope.encode(), digest_size=16, person=b"shardmesh-prefix").digest()
    names = []
    for start in range(0, len(tokens) - PREFIX_BLOCK + 1, PREFIX_BLOCK):
        block = array("q", tokens[start : start + PREFIX_BLOCK]).tobytes()
        name = hashlib.blake2b(name + block, digest_size=16).digest()
        names.append(name)
    return names
