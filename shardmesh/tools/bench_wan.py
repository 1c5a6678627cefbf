"""``shardmesh bench --wan``: a chain over emulated distance, on loopback.

Every node (the hops and the gateway) listens on a port of its own and announces the
port of a :class:`~.delay_line.DelayLine` in front of it (``--announce``), so every
connection to it, hop links included, crosses that line and pays ``--delay-ms`` each
way. A decode step goes gateway -> hop 1 -> ... -> hop N -> gateway: ``hops + 1`` links,
one delay each. The same chain is measured twice, through lines with no delay and with
the delay, and printed:

* decode tokens/s (the gateway's streamed answer, as a client reads it);
* the latency bound: one token per trip around the chain plus what a token costs the
  same chain with no delay (its compute and every hop's overhead), and the ratio of
  the measured rate to it;
* time to first token for a 32-token and a 2,048-token prompt;
* aggregate tokens/s of 8 answers sent at once against one alone (all completion
  tokens over the wall time), with speculation off and on: while one session's step
  travels, the hops can serve the others';
* speculative decoding on and off: the same answer with no draft tokens
  (``speculative: false``), with prompt lookup (the gateway's default), and, at the
  delay, through a second gateway whose draft model is the target itself with at most
  ``--draft-k`` drafts per step (every draft is kept: the upper bound of tokens per
  trip). Tokens per trip and the share of drafts kept come from the gateway's
  ``/metrics``.

The latency bound and its ratio are for decoding without speculation, which can
only do one token per trip. Last, pipelined prefill: a 2,048-token prompt sent by a
client in this process straight to the hops, in chunks one after the other (each
waits for the one before to come out of the last hop) and pipelined (all sent at
once, the gateway's way), at 512 tokens per chunk and at the size the gateway picks
for this many hops (:func:`~shardmesh.api.resumable.prefill_chunk`).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from .bench_common import gateway_model, http_decode_rate, http_ttft, prompt_ids
from .node_processes import NodeProcess, start_node, stop_all, wait_gateway, wait_serving

TTFT_PROMPTS = (32, 2048)
CONCURRENT = 8  # sessions at once: does the chain serve others while one session's step travels?
TEXT = "The history of the fox, told in many parts: " * 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spans(total: int, hops: int) -> list[str]:
    edges = [round(i * total / hops) for i in range(hops + 1)]
    return [f"{a}:{b}" for a, b in zip(edges, edges[1:])]


class WanChain:
    """``hops`` serving nodes and a gateway, each behind its own delay line."""

    def __init__(self, path: Path, dtype: str, total_blocks: int, hops: int, delay_ms: float) -> None:
        self.path, self.dtype, self.delay_ms = path, dtype, delay_ms
        self.keys = Path(tempfile.mkdtemp(prefix="shardmesh-wan-"))
        self.lines: list[subprocess.Popen] = []
        self.nodes: list[NodeProcess] = []
        self.announced: list[str] = []  # each node's address at its delay line
        self.spans = _spans(total_blocks, hops)
        self.join: str | None = None  # the first node, at its line: every other joins it
        try:
            for span in self.spans:
                self.start(span)
            self.gateway = self.start("none")
        except BaseException:
            self.stop()
            raise

    def add_gateway(self, extra: tuple[str, ...]) -> NodeProcess:
        """One more ``--layers none`` gateway on the chain, behind a line of its own."""
        return self.start("none", extra)

    def start(self, span: str, extra: tuple[str, ...] = ()) -> NodeProcess:
        """A node serving ``span`` (``none``: a gateway) behind a delay line of its own,
        once it serves (or its gateway is ready)."""
        gateway = span == "none"
        port, line_port = _free_port(), _free_port()
        self.lines.append(subprocess.Popen(
            [sys.executable, "-m", "shardmesh.tools.delay_line", "--to", f"127.0.0.1:{port}",
             "--delay-ms", str(self.delay_ms), "--port", str(line_port)], stdout=subprocess.DEVNULL))
        node = start_node(self.path, span, self.dtype, self.keys, self.join, threads=1, api=gateway, name=f"wan{len(self.nodes)}",
                          listen=f"/ip4/127.0.0.1/tcp/{port}", extra=("--announce", f"/ip4/127.0.0.1/tcp/{line_port}", *extra))
        self.nodes.append(node)
        if gateway:
            wait_gateway(node)
        else:
            wait_serving(node)
        self.announced.append(f"/ip4/127.0.0.1/tcp/{line_port}/p2p/{node.peer}")
        if self.join is None:
            self.join = self.announced[-1]
        return node

    def stop(self) -> None:
        stop_all(self.nodes)
        for line in self.lines:
            line.terminate()
            line.wait(timeout=10)


async def _trips(url: str) -> tuple[float, float, float, float]:
    """The gateway's decode trips, their tokens, drafts proposed and kept (/metrics)."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(url + "/metrics")).text
    names = ("decode_trips", "decode_trip_tokens", "draft_tokens_proposed", "draft_tokens_accepted")
    found = {m.group(1): float(m.group(2)) for m in re.finditer(r"^shardmesh_(\w+)_total (\S+)$", text, re.M)}
    return tuple(found[n] for n in names)  # type: ignore[return-value]


async def _rate(url: str, model: str, tokens: int, repeats: int, **fields) -> dict[str, float]:
    """Best decode rate of ``repeats`` answers, with the tokens per trip and the share of
    drafts kept over all of them."""
    before = await _trips(url)
    rate = max([await http_decode_rate(url, model, TEXT, tokens, **fields) for _ in range(repeats)])
    trips, got, proposed, kept = (b - a for a, b in zip(before, await _trips(url)))
    return {"rate": rate, "per_trip": got / max(trips, 1), "kept": kept / proposed if proposed else 0.0}


async def _aggregate(url: str, model: str, sessions: int, tokens: int, **fields) -> float:
    """All completion tokens over the wall time of ``sessions`` answers sent at once."""
    import httpx

    done: list[int] = []

    async def one(client, i: int) -> None:
        body = {"model": model, "prompt": f"{i}: {TEXT}", "max_tokens": tokens, "temperature": 0, **fields}
        r = await client.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        done.append(r.json()["usage"]["completion_tokens"])

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(sessions):
                nursery.start_soon(one, client, i)
        return sum(done) / (time.perf_counter() - t0)


async def _measure(url: str, tokens: int, repeats: int, vocab: int) -> dict[str, dict[str, float]]:
    model = await gateway_model(url)
    figures = {"plain": await _rate(url, model, tokens, repeats, speculative=False),
               "lookup": await _rate(url, model, tokens, repeats)}
    figures["ttft"] = {str(n): await http_ttft(url, model, prompt_ids(vocab, n)) for n in TTFT_PROMPTS}
    figures["sessions"] = {f"{n}{'' if spec else '-plain'}": await _aggregate(url, model, n, tokens, speculative=spec)
                           for spec in (False, True) for n in (1, CONCURRENT)}
    return figures


async def _prefill_times(chain: WanChain, prompt: list[int], chunks: tuple[int, ...], repeats: int = 2) -> dict[str, float]:
    """A prompt's time to first token through the chain's hops, from a client in this
    process, per chunk size: sent as sequential chunks (each waits for the one before to
    come out of the last hop) and pipelined (sent at once, only the last wants a token),
    best of ``repeats``."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from ..backends.weights import identity_bytes, resolve_local
    from ..contract import SamplingParams
    from ..mesh.gateway_ticket import TicketIssuer
    from ..mesh.hop_server import HopServer
    from ..mesh.host import running_host
    from ..mesh.link_offers import Links
    from ..mesh.records import model_identity
    from ..placement.routing import Hop
    from .bench_mesh import FixedRoute

    model_id = model_identity(chain.path.resolve().name, *identity_bytes(resolve_local(str(chain.path))))
    route = [Hop(node.peer, *map(int, span.split(":"))) for node, span in zip(chain.nodes, chain.spans)]
    times: dict[str, float] = {}
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as mesh, trio.open_nursery() as nursery:
        server = HopServer(mesh, None, model_id, route[-1].end, 1 << 16)
        await nursery.start(server.run)
        for address in chain.announced[: len(route)]:
            await mesh.connect(address)
        opener = FixedRoute(nursery, server, route, model_id, TicketIssuer(mesh.peer_id_str, mesh.key_pair), Links())
        for size in chunks:
            for pipelined in (False, True):
                best = float("inf")
                for _ in range(repeats):
                    one = opener.chain(f"prefill-{time.monotonic_ns()}", SamplingParams(temperature=0.0), prompt, [])
                    try:
                        await one.open(len(prompt) + 1)
                        t0 = time.perf_counter()
                        for start in range(0, len(prompt), size):
                            last = start + size >= len(prompt)
                            await one.step(prompt[start : start + size], start, last or not pipelined)
                        best = min(best, time.perf_counter() - t0)
                    finally:
                        await one.close()
                times[f"{size}{' pipelined' if pipelined else ''}"] = best
        nursery.cancel_scope.cancel()
    return times


async def _measure_draft(url: str, tokens: int, repeats: int) -> dict[str, float]:
    return await _rate(url, await gateway_model(url), tokens, repeats)


def _line(name: str, r: dict[str, float]) -> str:
    extra = f" ({r['per_trip']:.2f} tokens per trip, {r['kept']:.0%} of drafts kept)" if name != "no speculation" else ""
    return f"{name} {r['rate']:.1f} tok/s{extra}"


def run_wan_bench(path: Path, dtype: str, tokens: int, repeats: int, hops: int, delay_ms: float, draft_k: int = 4) -> int:
    from transformers import AutoConfig

    from tokenizers import Tokenizer

    from ..api.resumable import PREFILL_CHUNK, prefill_chunk

    config = AutoConfig.from_pretrained(path)
    # Prompt ids the gateway takes: within the tokenizer's vocabulary (the bench model's
    # is smaller than its embedding).
    total, vocab = config.num_hidden_layers, min(config.vocab_size, Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size())
    print(f"{hops}-hop chain and a gateway on 127.0.0.1, each node behind a delay line (--threads 1 each); "
          f"decode {tokens} tokens, best of {repeats}", flush=True)
    results = {}
    draft: dict[str, float] = {}
    chunk = prefill_chunk(2048, hops)
    for delay in (0.0, delay_ms):
        chain = WanChain(path, dtype, total, hops, delay)
        try:
            results[delay] = trio.run(_measure, chain.gateway.url, tokens, repeats, vocab)
            results[delay]["prefill"] = trio.run(_prefill_times, chain, prompt_ids(vocab, 2048), sorted({PREFILL_CHUNK, chunk}))
            if delay == delay_ms:
                drafting = chain.add_gateway(("--draft-model", str(path), "--draft-tokens", str(draft_k)))
                draft = trio.run(_measure_draft, drafting.url, tokens, repeats)
        finally:
            chain.stop()
        r = results[delay]
        print(f"  {delay:5.1f} ms each way: {_line('no speculation', r['plain'])}; {_line('prompt lookup', r['lookup'])}; "
              f"TTFT {r['ttft']['32']:.2f} s (32 tokens), {r['ttft']['2048']:.1f} s (2,048 tokens)", flush=True)
        p = r["prefill"]
        print(f"  {'':5} 2,048-token prefill, a client to the hops: {PREFILL_CHUNK}-token chunks one after the other "
              f"{p[str(PREFILL_CHUNK)]:.2f} s, pipelined {p[f'{PREFILL_CHUNK} pipelined']:.2f} s; {chunk}-token chunks "
              f"(the gateway's for {hops} hops) one after the other {p[str(chunk)]:.2f} s, pipelined "
              f"{p[f'{chunk} pipelined']:.2f} s = {p[f'{chunk} pipelined'] / p[str(chunk)]:.2f} of sequential", flush=True)
        c = r["sessions"]
        print(f"  {'':5} {CONCURRENT} sessions at once, all tokens over the wall time: no speculation "
              f"{c[f'{CONCURRENT}-plain']:.1f} tok/s = {c[f'{CONCURRENT}-plain'] / c['1-plain']:.2f}x one session's "
              f"{c['1-plain']:.1f}; prompt lookup {c[str(CONCURRENT)]:.1f} tok/s = {c[str(CONCURRENT)] / c['1']:.2f}x "
              f"one session's {c['1']:.1f}", flush=True)
    print(f"  {delay_ms:5.1f} ms each way, a gateway whose draft model is the target (k <= {draft_k}): {_line('draft model', draft)}")
    per_token = 1 / results[0.0]["plain"]["rate"]
    trip = (hops + 1) * delay_ms / 1000
    bound = 1 / (trip + per_token)
    plain, lookup = results[delay_ms]["plain"]["rate"], results[delay_ms]["lookup"]["rate"]
    print(f"\nlatency bound at {delay_ms:g} ms: one trip ({hops + 1} links, {trip * 1000:.0f} ms) + {per_token * 1000:.1f} ms "
          f"per token with no delay = {bound:.1f} tok/s")
    print(f"measured without speculation {plain:.1f} tok/s = {plain / bound:.2f} of the bound")
    print(f"speculation at {delay_ms:g} ms: prompt lookup {lookup / plain:.2f}x, draft model {draft['rate'] / plain:.2f}x "
          f"the rate without it")
    return 0
