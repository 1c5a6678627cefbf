"""NodeConfig: everything a node is told, from CLI flags or the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..api.speculation import MAX_K
from ..mesh.audit_policy import DEFAULT_RATE


class UsageError(ValueError):
    """A flag or setting the user can fix; the CLI prints it as one line."""


@dataclass(frozen=True)
class NodeConfig:
    model: str | None  # None with --layers none: a gateway for whatever the swarm serves (open_gateway.py)
    layers: str = "auto"  # "auto" (the swarm's weakest blocks), "all", "A:B", or "none" (no weights)
    api: str = "127.0.0.1:8000"  # HOST:PORT of the OpenAI gateway, or "off"
    api_key: str | None = None  # bearer key the gateway requires; None = open
    metrics: str | None = None  # HOST:PORT of a /metrics-only server (for --api off); None: none
    cors_origins: tuple[str, ...] = ()  # web origins whose pages may call the API from a browser; none by default
    dtype: str = "auto"
    backend: str = "auto"  # "torch", "mlx", or "auto": MLX on Apple silicon, torch elsewhere
    device: str = "auto"
    kv_cache_gb: float = 2.0  # KV cache budget of this node's stage
    threads: int | None = None  # torch CPU threads for the blocks; None: torch's default (one per core)
    revision: str | None = None  # hub revision (branch, tag or commit)
    session_idle_timeout: float = 300.0  # seconds before an idle session's cache is freed
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)  # libp2p listen multiaddrs
    join: tuple[str, ...] = ()  # bootstrap multiaddrs (.../p2p/<peer id>); none: a new swarm
    announce: tuple[str, ...] = ()  # addresses our record carries instead of the listening ones (mesh/own_addresses.py)
    key_file: str | None = None  # the node's identity; None: in the user's data directory
    mdns: bool = True  # find peers on the LAN by multicast DNS
    links: bool = True  # move sessions' frames to hop links (mesh/link.py) when both ends can
    trunks: bool = True  # send the steps of sessions to the same next hop in one frame per batch (mesh/trunk.py)
    prefill_dtype: str = "auto"  # the dtype long steps compute in (backends/torch/prefill_dtype.py)
    prefix_cache: bool = True  # keep finished sessions' prefixes for later ones, and route to them (backends/prefix_cache.py)
    relay_service: bool = True  # relay for nodes behind NATs while this node is public (mesh/relay_service.py)
    link_port: int | None = None  # hop links on a TCP port of their own (0: any free one); None: on the libp2p port
    max_blocks: int | None = None  # `--layers auto` serves at most this many blocks
    memory_fraction: float = 0.8  # share of the free memory `--layers auto` may fill
    memory_gb: float | None = None  # memory for weights + KV cache instead of measuring free memory
    rebalance_interval: float = 30.0  # mean seconds between checks whether moving would help
    route_wait: float = 30.0  # seconds a request waits for a working chain before a 503
    drain_timeout: float = 30.0  # seconds running sessions get to finish when stopping or moving
    audit_rate: float = DEFAULT_RATE  # share of steps this gateway re-checks on independent peers (mesh/audit_policy.py)
    allow_peers: str | None = None  # file of the peer ids of a private swarm (mesh/allow_list.py); None: anyone
    swarm_key: str | None = None  # file of a private swarm's pre-shared key (mesh/swarm_key.py); None: open
    speculation: bool = True  # the gateway proposes draft tokens that chains check in one trip (api/speculation.py)
    draft_tokens: int = MAX_K  # the most draft tokens per decode step (1..16); how many up to that adapts to what is kept
    draft_model: str | None = None  # a small model with the target's tokenizer that drafts (backends/draft_model.py); None: prompt lookup

    @property
    def auto_layers(self) -> bool:
        return self.layers == "auto"

    @property
    def api_host_port(self) -> tuple[str, int] | None:
        if self.api == "off":
            return None
        return _host_port(self.api, "--api wants HOST:PORT or 'off'")

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        return None if self.metrics is None else _host_port(self.metrics, "--metrics wants HOST:PORT")

    def span(self, total_blocks: int) -> tuple[int, int] | None:
        """The blocks ``[start, end)`` this node serves; None for ``--layers none`` (and
        for ``auto`` until the swarm has been looked at: see :mod:`shardmesh.node.span_keeper`)."""
        if self.layers in ("none", "auto"):
            return None
        if self.layers == "all":
            return 0, total_blocks
        start_s, sep, end_s = self.layers.partition(":")
        if not sep or not start_s.isdigit() or not end_s.isdigit():
            raise UsageError(f"--layers wants 'auto', 'all', 'none' or START:END, got {self.layers!r}")
        start, end = int(start_s), int(end_s)
        if not 0 <= start < end <= total_blocks:
            raise UsageError(f"--layers {self.layers} is not inside the model's {total_blocks} blocks")
        return start, end


def _host_port(value: str, usage: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"{usage}, got {value!r}")
    return host.strip("[]"), int(port)


def env_api_key() -> str | None:
    """The API key may come from the environment so that it stays out of `ps` output."""
    return os.environ.get("SHARDMESH_API_KEY") or None
