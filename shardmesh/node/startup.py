"""What every kind of node does first: read its swarm key, write its first record, say its URL.

Shared by a node that serves a model (``run.py``) and a gateway for whatever the swarm
serves (``open_gateway.py``).
"""

from __future__ import annotations

from .. import __version__
from ..mesh.hop_server import Limits
from ..mesh.host import MeshHost
from ..mesh.records import NodeRecord
from ..mesh.swarm_key import SwarmKey, SwarmKeyError, read_swarm_key
from ..placement.spans import ONLINE
from .config import NodeConfig, UsageError
from .model import LoadedModel

__all__ = ["http_url", "local_record", "read_key"]


def local_record(mesh: MeshHost, addrs: list[str], model: LoadedModel, model_id: str, limits: Limits) -> NodeRecord:
    """The record a node starts with: no blocks yet (a span is announced when chosen)."""
    return NodeRecord(
        peer=mesh.peer_id_str,
        addrs=tuple(addrs),
        model=model_id,
        start=0,
        end=0,
        total_blocks=model.total_blocks,
        state=ONLINE,
        throughput=0.0,
        cache_tokens_free=0,
        backend="none",
        device="none",
        dtype="none",
        rtt={},
        version=__version__,
        seq=0,
        expires=0.0,
        api=None,
        limits=limits.as_record(),
    )


def read_key(config: NodeConfig) -> SwarmKey | None:
    """The pre-shared key of ``--swarm-key``, or None for a swarm open to anyone."""
    if config.swarm_key is None:
        return None
    try:
        return read_swarm_key(config.swarm_key)
    except SwarmKeyError as exc:
        raise UsageError(str(exc)) from exc


def http_url(host: str, port: int) -> str:
    """The base URL of a server bound to ``host`` (an IPv6 address goes in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
