"""Names every node computes the same way: a model's identity and the DHT keys of records.

Nodes never agree on these by talking: each derives them from what it already knows
(a model's files, a peer id, a block number) with the pure functions below, so two
nodes that load the same model look each other up under the same keys
(docs/PROTOCOL.md, 2 and 4.2).
"""

from __future__ import annotations

import base64
import hashlib

RECORD_NAMESPACE = "shardmesh"  # DHT value keys are /shardmesh/<hash>

__all__ = ["RECORD_NAMESPACE", "block_key", "block_key_multihash", "model_identity", "record_key"]


def model_identity(name: str, config_bytes: bytes, index_bytes: bytes) -> str:
    """``name@<12 hex>``: two nodes agree on a model only if config *and* weight index match.

    The name alone is not enough (two fine-tunes share one), and hashing the weights
    themselves would take minutes; the config plus the safetensors index (tensor names,
    shapes, shard layout) is cheap and catches the mismatches that would corrupt a chain.
    The NUL separator keeps ``(a, bc)`` and ``(ab, c)`` apart.
    """
    digest = hashlib.sha256(config_bytes + b"\0" + index_bytes).hexdigest()
    return f"{name}@{digest[:12]}"


def record_key(model_id: str, peer: str) -> str:
    """DHT value key holding ``peer``'s record for ``model_id``: ``/shardmesh/<32 base32>``.

    43 bytes: py-libp2p's FIND_NODE handler drops keys over 50 bytes that are not
    multihashes, and other implementations send value keys there. 160 bits of sha256
    leave no room for collisions. The DHT validator recomputes this key from the
    record's own ``model`` and ``peer``, so a node can only write under its own key.
    """
    digest = hashlib.sha256(f"{model_id}\0{peer}".encode()).digest()[:20]
    return f"/{RECORD_NAMESPACE}/" + base64.b32encode(digest).decode().lower()


_CIDV1_RAW_SHA256 = bytes([0x01, 0x55, 0x12, 0x20])  # cid v1, codec raw, sha2-256, 32 bytes


def block_key(model_id: str, block: int) -> str:
    """Provider key for "serves block ``block`` of ``model_id``": a CIDv1 (raw, sha2-256), base32.

    Provider keys must be CIDs for js-libp2p to accept them. py-libp2p's
    ``KadDHT.provide`` / ``find_providers`` take this string and put the CID's
    *multihash* on the wire, which is also what js-libp2p and go-libp2p do.
    """
    digest = hashlib.sha256(f"shardmesh/{model_id}/block/{block}".encode()).digest()
    return "b" + base64.b32encode(_CIDV1_RAW_SHA256 + digest).decode().lower().rstrip("=")


def block_key_multihash(model_id: str, block: int) -> bytes:
    """The bytes a provider record is stored under on the wire (sha2-256 multihash)."""
    digest = hashlib.sha256(f"shardmesh/{model_id}/block/{block}".encode()).digest()
    return bytes([0x12, 0x20]) + digest
