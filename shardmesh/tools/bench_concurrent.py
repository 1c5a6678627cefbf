"""``shardmesh bench --concurrent 1,4,12``: many chats at once, through one node and
through chains, from one run.

A public swarm's capacity is the tokens/s it gives many people at once, not one. For
each model (by default the tiny Qwen3 and the 100M-parameter tiny Llama; with
``--model``, that one) and each thread setting, three setups are started in turn as real
node processes on loopback:

* **one node**: ``--layers all`` with its gateway;
* **2-node chain**: two nodes holding the two halves, and a ``--layers none`` gateway;
* **3-node chain**: three nodes holding thirds, and a ``--layers none`` gateway;
* **3-node no trunks**: the same with ``--no-trunks`` (each session's steps and tokens
  on its own links, not many sessions' in one frame).

For each number of sessions N, N clients each send two greedy chats of
``--tokens`` tokens at once through the gateway's OpenAI API (over HTTP, not
streamed). The figure is all completion tokens over the wall time (prompts are a few
tokens, so this is nearly all decode), and beside it:

* the ratio to one session's figure in the same setup (how concurrency scales);
* each process's CPU time per token (from ``/proc``: where the machine's cores went);
* the mean batch each stage saw (``shardmesh_stage_steps`` over
  ``shardmesh_stage_batches`` in its ``/metrics``), which is why concurrency pays:
  a batch of N steps costs far less than N steps;
* the mean steps per frame each hop's trunks brought in (``shardmesh_batched_frame_steps``
  over ``shardmesh_batched_frames``), and last, the gateway's tokens per frame from the
  last hop (``shardmesh_batched_result_frame_tokens`` over ``..._result_frames``).

All processes share this machine's cores. With torch's default threads each process
starts one OpenMP thread per core, so a chain of processes puts several teams on the
same cores; ``--threads 1`` (one thread per process) shows the chain without that.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from .node_processes import NodeProcess, add_gateway, start_chain, stop_all

TINY_QWEN3 = dict(arch="qwen3", layers=8, hidden=256, seed=9)  # the model of issue 23's figures
SETUPS = ("one node", "2-node chain", "3-node chain", "3-node no trunks")


@dataclass
class Measured:
    sessions: int
    tokens_per_s: float
    cpu_ms_per_token: list[float]  # per process: hops in route order, the gateway last
    mean_batch: list[float]  # per hop
    per_frame: list[float]  # per hop: steps per trunk frame received; then the gateway's tokens per results frame (0: none)


def spans(total: int, parts: int) -> list[str]:
    """``parts`` contiguous spans covering ``total`` blocks, as even as they come."""
    cuts = [round(i * total / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (Linux; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_setup(path: Path, dtype: str, total: int, setup: str, threads: int | None, key_dir: Path) -> tuple[list[NodeProcess], NodeProcess]:
    """The setup's processes (hops in route order, then the gateway if apart) and its gateway."""
    parts = ["all"] if setup == "one node" else spans(total, 2 if setup == "2-node chain" else 3)
    extra = ("--no-trunks",) if setup.endswith("no trunks") else ()
    nodes = start_chain(path, dtype, parts, key_dir, threads, api=True, extra=extra)  # every hop with a gateway, for its /metrics
    if setup == "one node":
        return nodes, nodes[0]
    return nodes, add_gateway(nodes, path, dtype, key_dir, threads)


def stage_counts_from(metrics: str, items: str = "stage_steps", groups: str = "stage_batches") -> tuple[float, float] | None:
    """Two counters in a node's ``/metrics`` text (by default the stage's steps and
    batches; the trunks' steps and frames with ``batched_frame_steps``,
    ``batched_frames``); None if it has none."""
    steps = re.search(rf"^shardmesh_{items}_total (\S+)", metrics, re.M)
    batches = re.search(rf"^shardmesh_{groups}_total (\S+)", metrics, re.M)
    return (float(steps.group(1)), float(batches.group(1))) if steps and batches else None


Pairs = list[tuple[float, float]]


async def _counts(client, node: NodeProcess) -> Pairs:
    """The stage's (steps, batches), the trunks' (steps, frames) and the results
    trunks' (results, frames) of ``node``."""
    text = (await client.get(f"{node.url}/metrics")).text
    names = [("stage_steps", "stage_batches"), ("batched_frame_steps", "batched_frames"),
             ("batched_result_frame_tokens", "batched_result_frames")]  # fmt: skip
    return [stage_counts_from(text, *pair) or (0.0, 0.0) for pair in names]


def _ratios(after: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[float]:
    return [(s - s0) / (b - b0) if b > b0 else 0.0 for (s, b), (s0, b0) in zip(after, before)]


async def _chats(client, url: str, model: str, sessions: int, tokens: int, first: int) -> int:
    """``sessions`` clients, two chats each, all at once; the completion tokens."""
    done: list[int] = []

    async def client_task(i: int) -> None:
        for round_ in range(2):
            body = {
                "model": model, "max_tokens": tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"question {first + 2 * i + round_} about swarms"}],
            }
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"a chat failed with HTTP {r.status_code}: {r.text}")
            done.append(r.json()["usage"]["completion_tokens"])

    async with trio.open_nursery() as nursery:
        for i in range(sessions):
            nursery.start_soon(client_task, i)
    return sum(done)


async def measure_setup(nodes: list[NodeProcess], gateway: NodeProcess, model: str, counts: list[int], tokens: int) -> list[Measured]:
    import httpx

    hops = [n for n in nodes if n is not gateway] or [gateway]
    figures = []
    async with httpx.AsyncClient(timeout=600) as client:
        with trio.fail_after(60):  # until the gateway has a complete route
            while (await client.get(f"{gateway.url}/health")).status_code != 200:
                await trio.sleep(0.2)
        await _chats(client, gateway.url, model, max(counts), 4, 0)  # warm-up: every session size's first steps
        for n, sessions in enumerate(counts):
            cpu0 = [cpu_seconds(p.proc.pid) for p in nodes]
            counts0 = [await _counts(client, h) for h in hops]
            results0 = (await _counts(client, gateway))[2]
            t0 = time.perf_counter()
            generated = await _chats(client, gateway.url, model, sessions, tokens, 1000 * (n + 1))
            elapsed = time.perf_counter() - t0
            cpu = [1000 * (cpu_seconds(p.proc.pid) - c) / max(1, generated) for p, c in zip(nodes, cpu0)]
            counts1 = [await _counts(client, h) for h in hops]
            results1 = (await _counts(client, gateway))[2]
            batch = _ratios([c[0] for c in counts1], [c[0] for c in counts0])
            per_frame = _ratios([c[1] for c in counts1] + [results1], [c[1] for c in counts0] + [results0])
            figures.append(Measured(sessions, generated / elapsed, cpu, batch, per_frame))
    return figures


def report(name: str, setup: str, figures: list[Measured]) -> None:
    one = figures[0].tokens_per_s if figures and figures[0].sessions == 1 else None
    for f in figures:
        ratio = f"{f.tokens_per_s / one:5.2f}x" if one else "     -"
        cpu = " ".join(f"{c:5.1f}" for c in f.cpu_ms_per_token)
        batch = " ".join(f"{b:4.1f}" for b in f.mean_batch)
        frame = " ".join(f"{b:4.1f}" if b else "   -" for b in f.per_frame)
        print(f"{name:22s} {setup:16s} {f.sessions:8d} {f.tokens_per_s:8.1f} {ratio:>7s}   {cpu:24s} {batch:16s} {frame}", flush=True)


def run_concurrent_bench(models: list[tuple[str, Path]], dtype: str, counts: list[int], tokens: int, thread_settings: list[int | None]) -> int:
    import json

    key_dir = Path(tempfile.mkdtemp(prefix="shardmesh-bench-"))
    print(f"{tokens}-token greedy chats, two per session, {dtype}, node processes on 127.0.0.1 sharing {os.cpu_count()} cores")
    print("tok/s: all sessions' completion tokens over the wall time; CPU: ms per token of each process "
          "(hops in route order, then the gateway); batch: mean steps per batch on each hop; "
          "per frame: mean steps per trunk frame each hop received, then tokens per frame the gateway received")
    for threads in thread_settings:
        label = "torch's default threads" if threads is None else f"{threads} torch thread{'s' if threads > 1 else ''}"
        print(f"\n{label} per process")
        print(f"{'model':22s} {'setup':16s} {'sessions':>8s} {'tok/s':>8s} {'ratio':>7s}   {'CPU ms/token':24s} {'batch':16s} per frame")
        for name, path in models:
            total = json.loads((path / "config.json").read_text())["num_hidden_layers"]
            for setup in SETUPS:
                nodes, gateway = start_setup(path, dtype, total, setup, threads, key_dir)
                try:
                    report(name, setup, trio.run(measure_setup, nodes, gateway, path.name, counts, tokens))
                except BaseException:
                    for node in nodes:  # what the nodes saw, to tell why
                        print(f"---- {' '.join(node.proc.args[3:7])}: last lines ----\n{''.join(node.lines[-30:])}", flush=True)
                    raise
                finally:
                    stop_all(nodes)
    return 0


def default_models(model: str | None) -> list[tuple[str, Path]]:
    """``--model`` alone, or the tiny Qwen3 and the 100M bench Llama."""
    from .bench_common import bench_model_path
    from .tiny_model import cached_tiny_model

    if model:
        return [(Path(model).name, Path(model))]
    return [("tiny Qwen3 (8x256)", cached_tiny_model(**TINY_QWEN3)), ("100M Llama (12x768)", bench_model_path(None))]
