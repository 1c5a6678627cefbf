"""``shardmesh bench --mesh``: what the network costs, from one run on one machine.

Node processes on loopback serve the same 100M-parameter tiny Llama as the one-process
figure, and this process plays the gateway (a libp2p host that holds no weights):

* **one process**: the one-node stage path (generation loop, batcher, torch stage on
  the compute thread, sampling) in this process: no network at all.
* **1-node chain**: one node process holds all 12 blocks; each decode step is two
  messages (gateway → node → gateway).
* **3-node chain**: three node processes hold 0:4, 4:8, 8:12; each decode step is four
  one-way messages (gateway → A → B → C → gateway).
* **3-node chain, no links**: the same with ``--no-links``: every frame stays on its
  libp2p stream (Yamux over Noise in py-libp2p) instead of moving to a hop link.
* **the same split with no mesh** (:mod:`.bench_no_mesh`): plain processes holding the
  same spans pass each step over socketpairs, the same one-way messages and nothing
  else, next to one of them running the decode loop alone. It shows what splitting a
  step over processes costs on this machine whatever the mesh does, and the last line
  says how much of that the 3-node chain reaches.

The added latency per hop is ``(t3 - t1) / 2`` per decode step: two more hops, same
blocks. It is printed twice: from the tokens/s figures (means, so a step slowed by some
background work in any of four processes counts in full) and from the median step of a
decode loop that drives the chain directly (the latency a typical step sees). The
second is split in two. Each hop reports the compute seconds it spent on a step
(``spent``, summed along the chain); a step's time minus that is the network and the
hand-offs between threads, the part the mesh adds. The rest of the difference is the
compute itself running slower when split over processes that share this machine's cores.
A 2,048-token prefill through each chain gives the bytes a hop moves (2,048 x hidden
states) and, from ``(p3 - p1) / 2``, the time one hop adds: MB/s per hop.

Each chain is up on its own, next to the one-process path in this process, and the two
take turns for ``--repeats`` rounds, so that a slow moment of a shared machine hits both
alike; each path's best round is reported.
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from ..contract import DTYPE_SIZES
from .bench_common import decode_rate
from .bench_no_mesh import measure_plain, report_plain, split_ratio
from .bench_wire import measure_hop_transfer
from .node_processes import NodeProcess, start_chain, stop_all

PREFILL_TOKENS = 2048


class FixedRoute:
    """A chain opener over one hand-made route (the bench knows where everything is)."""

    def __init__(self, nursery, server, route, model_id: str, issuer, links) -> None:
        self.nursery, self.server, self.route = nursery, server, route
        self.model_id, self.issuer, self.links = model_id, issuer, links

    def available(self) -> bool:
        return True

    def chain(self, session_id: str, sampling, prompt_ids: list[int], generated: list[int], avoid: frozenset[str] = frozenset()):
        from ..mesh.chain_client import RemoteChain

        return RemoteChain(
            nursery=self.nursery, open_stream=self.server.open_stream, route=self.route, session_id=session_id,
            model_id=self.model_id, gateway=self.issuer.peer, sampling=sampling.to_dict(), prompt_ids=prompt_ids,
            generated=generated, links=self.links, issuer=self.issuer,
        )


async def _prefill_seconds(chains: FixedRoute, prompt: list[int]) -> float:
    """One step of the whole prompt through the chain, first token back."""
    from ..contract import SamplingParams

    chain = chains.chain(f"prefill-{time.monotonic_ns()}", SamplingParams(temperature=0.0), prompt, [])
    try:
        await chain.open(len(prompt) + 1)
        t0 = time.perf_counter()
        await chain.step(prompt, 0, True)
        return time.perf_counter() - t0
    finally:
        await chain.close()


async def _one_process(path: Path, dtype: str):
    """The one-node stage path in this process: its generator, and the nursery task to run."""
    from transformers import AutoTokenizer

    from ..api.generate import Generator
    from ..backends.compute_thread import compute_thread
    from ..backends.local_chain import LocalChains
    from ..backends.batcher import StepBatcher
    from ..backends.torch.stage import TorchStage
    from ..backends.weights import resolve_local

    stage = await compute_thread().run(lambda: TorchStage(resolve_local(str(path)), 0, dtype=dtype, model_name="bench"))
    batcher = StepBatcher(stage)
    return Generator("bench", AutoTokenizer.from_pretrained(path), 1 << 20, LocalChains([batcher]), frozenset()), batcher


async def _chain_decode(opener: FixedRoute, prompt: list[int], tokens: int) -> tuple[float, float]:
    """Median milliseconds per decode step through the chain, driven directly, and the
    median compute milliseconds the hops report for it (``spent``): the difference is
    what the network and the hand-offs around it cost."""
    from ..contract import SamplingParams

    chain = opener.chain(f"split-{time.monotonic_ns()}", SamplingParams(temperature=0.0), prompt, [])
    walls, spents = [], []
    try:
        await chain.open(len(prompt) + tokens + 1)
        token = await chain.step(prompt, 0, True)
        for i in range(tokens):
            t0 = time.perf_counter()
            token = await chain.step([token.token_id], len(prompt) + i, True)
            walls.append(time.perf_counter() - t0)
            spents.append(token.spent or 0.0)
    finally:
        await chain.close()
    return 1000 * statistics.median(walls), 1000 * statistics.median(spents)


async def measure_paths(path: Path, dtype: str, prompt: list[int], tokens: int, repeats: int, chain: "Chain") -> dict:
    """One process and ``chain``, taking turns for ``repeats`` rounds (so that a slow
    moment of a shared machine hits both alike): best decode tokens/s of each, the
    chain's step time split into compute and the rest, and its best 2,048-token prefill."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from transformers import AutoConfig, AutoTokenizer

    from ..api.generate import Generator
    from ..backends.weights import identity_bytes, resolve_local
    from ..mesh.host import running_host
    from ..mesh.link_offers import Links
    from ..mesh.records import model_identity
    from ..mesh.gateway_ticket import TicketIssuer
    from ..mesh.hop_server import HopServer
    from ..placement.routing import Hop

    config = AutoConfig.from_pretrained(path)
    model_id = model_identity(path.resolve().name, *identity_bytes(resolve_local(str(path))))
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as mesh, trio.open_nursery() as nursery:
        server = HopServer(mesh, None, model_id, config.num_hidden_layers, config.max_position_embeddings)
        await nursery.start(server.run)
        local, batcher = await _one_process(path, dtype)
        await nursery.start(batcher.run)
        for node, _, _ in chain.hops:
            await mesh.connect(node.address)
        route = [Hop(n.peer, s, e) for n, s, e in chain.hops]
        opener = FixedRoute(nursery, server, route, model_id, TicketIssuer(mesh.peer_id_str, mesh.key_pair), Links() if chain.links else None)
        remote = Generator("bench", AutoTokenizer.from_pretrained(path), 1 << 20, opener, frozenset())
        for generator in (local, remote):
            await decode_rate(generator, prompt, 4)  # warm-up
        one = rate = 0.0
        for _ in range(repeats):
            one = max(one, await decode_rate(local, prompt, tokens))
            rate = max(rate, await decode_rate(remote, prompt, tokens))
        step_ms, compute_ms = min([await _chain_decode(opener, prompt, tokens) for _ in range(repeats)])
        long_prompt = (prompt * (PREFILL_TOKENS // len(prompt) + 1))[:PREFILL_TOKENS]
        prefill = min([await _prefill_seconds(opener, long_prompt) for _ in range(max(2, repeats))])
        nursery.cancel_scope.cancel()
    return {"one process": one, "chain": rate, "step ms": step_ms, "compute ms": compute_ms, "prefill": prefill}


@dataclass
class Chain:
    """Node processes serving a route: (process, start, end) per hop."""

    hops: list[tuple[NodeProcess, int, int]]
    links: bool = True  # nodes and the gateway use hop links (mesh/link.py)


PLAIN = "no mesh"  # the key of :func:`measure_plain`'s figures in :func:`measure`'s results
CHAINS = {  # name: (spans, hop links)
    "3-node chain": (["0:4", "4:8", "8:12"], True),
    "1-node chain": (["0:12"], True),
    "3-node chain, no links": (["0:4", "4:8", "8:12"], False),
}


def measure(path: Path, dtype: str, prompt: list[int], tokens: int, repeats: int, threads: int | None, key_dir: Path) -> dict:
    """Each chain of :data:`CHAINS` in turn, next to one process, with ``threads`` torch
    threads per process (None: torch's default). One chain is up at a time: with every
    chain up at once, four copies of the weights would compete for the caches and memory
    bandwidth the one-process path needs (docs/PERFORMANCE.md, section 2)."""
    import torch

    from ..backends.compute_thread import compute_thread

    # OpenMP's thread count is per calling thread: set it on the thread that runs torch.
    default_threads = compute_thread().call(torch.get_num_threads)
    compute_thread().call(torch.set_num_threads, threads or default_threads)
    results = {}
    try:
        for name, (spans, links) in CHAINS.items():
            print(f"  {name} and one process ({threads or default_threads} threads): node processes on 127.0.0.1 ...", flush=True)
            nodes = start_chain(path, dtype, spans, key_dir, threads, links)
            try:
                chain = Chain([(n, *map(int, span.split(":"))) for n, span in zip(nodes, spans)], links)
                results[name] = trio.run(measure_paths, path, dtype, prompt, tokens, repeats, chain)
            finally:
                stop_all(nodes)
                gc.collect()
    finally:
        compute_thread().call(torch.set_num_threads, default_threads)
    print(f"  the same split with no mesh ({threads or default_threads} threads): plain processes ...", flush=True)
    whole, three = CHAINS["1-node chain"][0][0], CHAINS["3-node chain"][0]
    results[PLAIN] = measure_plain(str(path), dtype, prompt, tokens, repeats, threads, whole, three)
    return results


def report(title: str, results: dict, hop_mb: float) -> None:
    print(f"\n{title}")
    print(f"{'path':24s} {'decode tok/s':>12s} {'one process':>12s} {'ratio':>6s} {'step ms':>8s} {'compute':>8s} {'rest':>6s}")
    for name, r in results.items():
        if name == PLAIN:
            continue
        rest = r["step ms"] - r["compute ms"]
        print(
            f"{name:24s} {r['chain']:12.1f} {r['one process']:12.1f} {r['chain'] / r['one process']:6.2f} "
            f"{r['step ms']:8.2f} {r['compute ms']:8.2f} {rest:6.2f}"
        )
    one, three = results["1-node chain"], results["3-node chain"]
    per_hop = (1000 / three["chain"] - 1000 / one["chain"]) / 2
    network = ((three["step ms"] - three["compute ms"]) - (one["step ms"] - one["compute ms"])) / 2
    compute = (three["compute ms"] - one["compute ms"]) / 2
    print(f"added latency per hop (decode step, (t3 - t1) / 2): {per_hop:.2f} ms from the tokens/s above (means)")
    median_hop = (three["step ms"] - one["step ms"]) / 2
    print(f"  {median_hop:.2f} ms from the median decode step (1-node {one['step ms']:.2f} ms, 3-node {three['step ms']:.2f} ms), of which:")
    print(f"    network and hand-offs (step minus the compute the hops report): {network:.2f} ms per hop")
    print(f"    compute: {compute:.2f} ms per hop (the same blocks, split over processes that share this machine's cores)")
    if "3-node chain, no links" in results:
        bare = results["3-node chain, no links"]
        network_bare = ((bare["step ms"] - bare["compute ms"]) - (one["step ms"] - one["compute ms"])) / 2
        print(f"    network and hand-offs with --no-links (libp2p streams only): {network_bare:.2f} ms per hop")
    p1, p3 = one["prefill"], three["prefill"]
    extra = (p3 - p1) / 2
    # Two prefills of over half a second each differ by their noise as well as by the
    # hops; when the 3-node one comes out no slower, no rate can be read from them.
    rate = f"= {hop_mb / extra:.0f} MB/s" if extra > 0 else "(no slower than the 1-node chain: lost in the noise; see the wire alone below)"
    print(
        f"{PREFILL_TOKENS}-token prefill: 1-node chain {p1 * 1000:.0f} ms, 3-node chain {p3 * 1000:.0f} ms; "
        f"one hop moves {hop_mb:.1f} MB in {extra * 1000:.0f} ms added {rate}"
    )
    report_plain(results[PLAIN])
    floor, mesh = split_ratio(results[PLAIN]), three["chain"] / three["one process"]
    print(f"the 3-node chain reaches {mesh / floor:.2f} of what the plain 3-process route reaches ({mesh:.2f} against {floor:.2f} of one process)")


def run_mesh_bench(path: Path, dtype: str, prompt: list[int], tokens: int, repeats: int, thread_settings: list[int | None]) -> int:
    """Once per thread setting; by default twice: with torch's default threads (as
    deployed: every process uses every core), and with one thread per process. On a
    machine with few cores the first puts three processes' OpenMP teams on the same
    cores (waking, and any spin left after :mod:`shardmesh.node.openmp_spin` shortened it,
    slow the next one's compute); the second shows what the mesh itself costs. On a
    machine with many cores, a setting such that three processes fit side by side
    (``--threads 4`` on 16 cores) stands for three machines. Every process here (this
    one too) runs with the spin the command line sets, unless ``GOMP_SPINCOUNT`` says
    otherwise."""
    from transformers import AutoConfig

    # py-libp2p warns, with a traceback, about a connection that arrives while this
    # gateway's host shuts down between chains: a race of no consequence to the figures.
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    key_dir = Path(tempfile.mkdtemp(prefix="shardmesh-bench-"))
    config = AutoConfig.from_pretrained(path)
    hop_mb = PREFILL_TOKENS * config.hidden_size * DTYPE_SIZES[dtype] / 1e6
    results = {}
    for threads in thread_settings:
        print(f"measuring with {'default' if threads is None else threads} torch thread(s) per process ...", flush=True)
        results[threads] = measure(path, dtype, prompt, tokens, repeats, threads, key_dir)
    import torch

    for threads, result in results.items():
        if threads is None:
            title = f"torch's default threads per process ({torch.get_num_threads()} each; this machine has {os.cpu_count()} cores)"
        else:
            title = f"{threads} torch thread{'s' if threads > 1 else ''} per process (this machine has {os.cpu_count()} cores)"
        report(title, result, hop_mb)
    rate = measure_hop_transfer(int(hop_mb * 1e6), max(3, repeats))
    print(f"\none {PREFILL_TOKENS}-token prefill hop on the wire alone ({hop_mb:.1f} MB frame to another process, acknowledged): {rate:.0f} MB/s")
    return 0
