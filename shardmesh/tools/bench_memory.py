"""``shardmesh bench --memory``: the resident memory of a gateway and of a serving node.

Two real node processes on loopback, as a user would start them: a serving node holding
every block of the model (``--layers all --api off``) and a ``--layers none`` gateway
joined to it. One completion goes through the gateway, so both have done real work
(tokenizer, chat over the mesh, a KV cache session opened and closed), then each
process's resident set (RSS) is read. For the serving node the report splits it:

* its weights, from the safetensors headers (no tensor read), in the dtype it loaded;
* its KV cache: caches are allocated per session as the session grows and freed when it
  closes, so at rest a node holds none; the figure is what the node's record says is
  allocated (its byte budget minus what it reports free);
* the overhead: RSS less the two, that is the interpreter, its libraries (torch, trio,
  py-libp2p, ...) and everything else a node keeps.

Sizes are in MB of 10^6 bytes; the targets are explained in docs/PERFORMANCE.md ("Memory").
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from ..node.model import read_model_config, text_part
from .node_processes import NodeProcess, start_node, stop_all, wait_gateway, wait_serving

MB = 1_000_000
GATEWAY_TARGET_MB = 150
OVERHEAD_TARGET_MB = 350
KV_CACHE_GB = 2.0  # the serving node's --kv-cache-gb (its default)


@dataclass
class MemoryReport:
    gateway_rss: int
    gateway_has_torch: bool
    node_rss: int
    weights: int
    kv_allocated: int
    kv_budget: int

    @property
    def overhead(self) -> int:
        return self.node_rss - self.weights - self.kv_allocated


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def maps_torch(pid: int) -> bool:
    """Whether the process has torch's shared library mapped (it imported torch)."""
    try:
        return any("libtorch" in Path(m.path).name for m in psutil.Process(pid).memory_maps())
    except (psutil.AccessDenied, NotImplementedError):  # no maps to read on this platform
        return False


def served_weight_bytes(path: Path, dtype: str) -> int:
    """Bytes of a stage that holds every block, as loaded in ``dtype``.

    Tied embeddings are counted once: a stage with both ends keeps one matrix for the
    embeddings and the head (``weight_bytes`` counts a second one for the case where
    another stage holds the head).
    """
    from ..backends.footprint import weight_bytes
    from ..backends.weights import resolve_local

    layers = read_model_config(path).num_hidden_layers
    sizes = weight_bytes(resolve_local(str(path)), layers, False, dtype)
    return sum(sizes.blocks) + sizes.embeddings + sizes.head


def kv_bytes_per_token(path: Path, dtype: str) -> int:
    """Keys and values of one token over every block (what the torch stage reserves)."""
    from ..contract import DTYPE_SIZES

    text = text_part(json.loads((path / "config.json").read_text()))
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", text["num_attention_heads"])
    return int(text["num_hidden_layers"]) * 2 * kv_heads * head_dim * DTYPE_SIZES[dtype]


def complete_once(url: str) -> None:
    """One chat completion through the gateway, once a chain of peers serves it."""
    with httpx.Client(base_url=url, timeout=120) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway found no chain for the model in time")
            time.sleep(0.2)
        model = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16, "temperature": 0}
        client.post("/v1/chat/completions", json=body).raise_for_status()


def kv_allocated(url: str, peer: str, budget: int, per_token: int, settle: float = 10.0) -> int:
    """KV cache bytes the serving node holds, read from its record as the gateway sees it.

    The record follows the node by a few seconds, so this waits (up to ``settle``) for
    the closed session's cache to show as free again before it answers.
    """
    allocated = budget
    deadline = time.monotonic() + settle
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            peers = client.get("/v1/swarm").json()["peers"]
            free = next(p["cache_tokens_free"] for p in peers if p["peer"] == peer)
            allocated = (budget // per_token - free) * per_token
            if allocated == 0 or time.monotonic() > deadline:
                return allocated
            time.sleep(0.5)


def measure(path: Path, dtype: str) -> MemoryReport:
    key_dir = Path(tempfile.mkdtemp(prefix="shardmesh-bench-keys-"))
    nodes: list[NodeProcess] = []
    try:
        server = start_node(path, "all", dtype, key_dir)
        nodes.append(server)
        wait_serving(server)
        gateway = start_node(path, "none", dtype, key_dir, join=server.address, api=True)
        nodes.append(gateway)
        wait_gateway(gateway)
        complete_once(gateway.url)
        budget = int(KV_CACHE_GB * (1 << 30))
        kv = kv_allocated(gateway.url, server.peer, budget, kv_bytes_per_token(path, dtype))
        return MemoryReport(
            gateway_rss=rss_bytes(gateway.proc.pid),
            gateway_has_torch=maps_torch(gateway.proc.pid),
            node_rss=rss_bytes(server.proc.pid),
            weights=served_weight_bytes(path, dtype),
            kv_allocated=kv,
            kv_budget=budget,
        )
    finally:
        stop_all(nodes)


def report(r: MemoryReport) -> None:
    def mb(n: int) -> str:
        return f"{n / MB:8.1f} MB"

    torch = "yes" if r.gateway_has_torch else "no"
    print(f"\n{'process':38s} {'resident':>11s}")
    print(f"{'gateway (--layers none) RSS':38s} {mb(r.gateway_rss)}   target <= {GATEWAY_TARGET_MB} MB; torch loaded: {torch}")
    print(f"{'serving node (--layers all) RSS':38s} {mb(r.node_rss)}")
    print(f"{'  weights':38s} {mb(r.weights)}   from the safetensors headers")
    print(
        f"{'  KV cache allocated':38s} {mb(r.kv_allocated)}   per session as it grows, freed when it closes; "
        f"budget {r.kv_budget / MB:.0f} MB"
    )
    print(f"{'  overhead (RSS - weights - KV)':38s} {mb(r.overhead)}   target <= {OVERHEAD_TARGET_MB} MB")


def run_memory_bench(path: Path, dtype: str) -> int:
    print(f"memory of real node processes after one chat completion through the gateway ({dtype})", flush=True)
    report(measure(path, dtype))
    return 0
