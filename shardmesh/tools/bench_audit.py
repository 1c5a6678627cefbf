"""``shardmesh bench --audit``: what auditing costs a gateway's answers.

Two servers of the whole model (A and B, so that every chain has an independent one to
be checked against) and two ``--layers none`` gateways on loopback: one with the
default ``--audit-rate``, one with ``--audit-rate 0``. Each gateway answers the same
greedy chats one after another. The first three answers through the new servers carry
the shadow audits (their first token is checked before it is sent), later ones the
rate's spot checks (beside the answer); the bench prints seconds per answer and
tokens per second for each gateway. On one machine the audits' prefills share its
cores with the answers: this is the cost to the swarm, not only to the answer's wait.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import httpx

from ..mesh.audit_policy import DEFAULT_RATE
from .node_processes import NodeProcess, start_node, stop_all, wait_gateway, wait_serving

CHATS = 10
SHADOWED = 3  # answers while the servers are new (mesh/audit_policy.py's shadow)


def _chat(url: str, model: str, tokens: int, i: int) -> tuple[float, int]:
    """One greedy chat; (seconds, completion tokens)."""
    body = {"model": model, "max_tokens": tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Question number {i}: what do foxes eat?"}]}
    began = time.perf_counter()
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    return time.perf_counter() - began, reply.json()["usage"]["completion_tokens"]


def _wait_for_route(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateways found no complete chain in time")
        time.sleep(0.3)


def run_audit_bench(path: Path, dtype: str, tokens: int) -> int:
    key_dir = Path(tempfile.mkdtemp(prefix="shardmesh-bench-keys-"))
    nodes: list[NodeProcess] = []
    try:
        a = start_node(path, "all", dtype, key_dir, name="a")
        nodes.append(a)
        wait_serving(a)
        nodes.append(start_node(path, "all", dtype, key_dir, join=a.address, name="b"))
        gateways = {rate: start_node(path, "none", dtype, key_dir, join=a.address, api=True, name=f"g{rate}",
                                     extra=("--audit-rate", str(rate)))
                    for rate in (DEFAULT_RATE, 0.0)}
        nodes += gateways.values()
        for node in nodes[1:2]:
            wait_serving(node)
        for g in gateways.values():
            wait_gateway(g)
            _wait_for_route(g.url)
        time.sleep(3)  # both servers in both views
        model = httpx.get(f"{gateways[0.0].url}/v1/models", timeout=10).json()["data"][0]["id"]
        print(f"{CHATS} greedy chats of up to {tokens} tokens, one after another, through each gateway "
              f"(2 servers of the whole model, {dtype})")
        print(f"{'--audit-rate':>12s} {'answers 1-3 s (each)':>22s} {'answers 4-10 s (median)':>24s} {'4-10 tok/s':>10s}")
        for rate in (0.0, DEFAULT_RATE):
            runs = [_chat(gateways[rate].url, model, tokens, i) for i in range(CHATS)]
            first = " ".join(f"{s:.2f}" for s, _ in runs[:SHADOWED])
            rest = runs[SHADOWED:]
            rate_tok = sum(n for _, n in rest) / sum(s for s, _ in rest)
            print(f"{rate:12g} {first:>22s} {statistics.median(s for s, _ in rest):24.2f} {rate_tok:10.1f}", flush=True)
        return 0
    finally:
        stop_all(nodes)
