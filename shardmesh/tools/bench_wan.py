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
* time to first token for a 32-token and a 2,048-token prompt.

Speculative decoding and pipelined prefill (issue 20) are not built yet; when they are,
each gets a line with it on and off.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from .bench_common import http_decode_rate
from .node_processes import NodeProcess, start_node, stop_all, wait_gateway, wait_serving

TTFT_PROMPTS = (32, 2048)


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
        self.keys = Path(tempfile.mkdtemp(prefix="shardmesh-wan-"))
        self.lines: list[subprocess.Popen] = []
        self.nodes: list[NodeProcess] = []
        join = None
        try:
            for i, span in enumerate([*_spans(total_blocks, hops), "none"]):
                gateway = span == "none"
                port, line_port = _free_port(), _free_port()
                self.lines.append(subprocess.Popen(
                    [sys.executable, "-m", "shardmesh.tools.delay_line", "--to", f"127.0.0.1:{port}",
                     "--delay-ms", str(delay_ms), "--port", str(line_port)], stdout=subprocess.DEVNULL))
                node = start_node(path, span, dtype, self.keys, join, threads=1, api=gateway, name=f"wan{i}",
                                  listen=f"/ip4/127.0.0.1/tcp/{port}", extra=("--announce", f"/ip4/127.0.0.1/tcp/{line_port}"))
                self.nodes.append(node)
                if gateway:
                    wait_gateway(node)
                else:
                    wait_serving(node)
                if join is None:
                    join = f"/ip4/127.0.0.1/tcp/{line_port}/p2p/{node.peer}"
            self.gateway = self.nodes[-1]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_all(self.nodes)
        for line in self.lines:
            line.terminate()
            line.wait(timeout=10)


async def _ttft(url: str, model: str, prompt: list[int]) -> float:
    """Seconds from sending a completion request to its first streamed token."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"a {len(prompt)}-token prompt: {resp.status_code} {(await resp.aread()).decode()[:300]}")
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                    return time.perf_counter() - t0
    raise RuntimeError("no token came back")


async def _measure(url: str, tokens: int, repeats: int, vocab: int) -> dict[str, float]:
    import httpx

    from .bench_common import prompt_ids

    async with httpx.AsyncClient(timeout=30) as client:
        deadline = time.monotonic() + 120
        while (await client.get(url + "/health")).status_code != 200:  # a complete chain
            if time.monotonic() > deadline:
                raise RuntimeError("no complete chain within 120 s")
            await trio.sleep(1)
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
    text = "The history of the fox, told in many parts: " * 3
    rate = max([await http_decode_rate(url, model, text, tokens) for _ in range(repeats)])
    figures = {"rate": rate}
    for n in TTFT_PROMPTS:
        figures[f"ttft{n}"] = await _ttft(url, model, prompt_ids(vocab, n))
    return figures


def run_wan_bench(path: Path, dtype: str, tokens: int, repeats: int, hops: int, delay_ms: float) -> int:
    from transformers import AutoConfig

    from tokenizers import Tokenizer

    config = AutoConfig.from_pretrained(path)
    # Prompt ids the gateway takes: within the tokenizer's vocabulary (the bench model's
    # is smaller than its embedding).
    total, vocab = config.num_hidden_layers, min(config.vocab_size, Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size())
    print(f"{hops}-hop chain and a gateway on 127.0.0.1, each node behind a delay line (--threads 1 each); "
          f"decode {tokens} tokens, best of {repeats}", flush=True)
    results = {}
    for delay in (0.0, delay_ms):
        chain = WanChain(path, dtype, total, hops, delay)
        try:
            results[delay] = trio.run(_measure, chain.gateway.url, tokens, repeats, vocab)
        finally:
            chain.stop()
        r = results[delay]
        print(f"  {delay:5.1f} ms each way: {r['rate']:6.1f} tok/s, TTFT {r['ttft32']:.2f} s (32 tokens), "
              f"{r['ttft2048']:.1f} s (2,048 tokens)", flush=True)
    per_token = 1 / results[0.0]["rate"]
    trip = (hops + 1) * delay_ms / 1000
    bound = 1 / (trip + per_token)
    rate = results[delay_ms]["rate"]
    print(f"\nlatency bound at {delay_ms:g} ms: one trip ({hops + 1} links, {trip * 1000:.0f} ms) + {per_token * 1000:.1f} ms "
          f"per token with no delay = {bound:.1f} tok/s")
    print(f"measured {rate:.1f} tok/s = {rate / bound:.2f} of the bound")
    print("speculative decoding, pipelined prefill: not built yet (issue 20)")
    return 0
