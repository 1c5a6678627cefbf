"""``shardmesh bench --prefill``: time to first token for a long prompt, and over a chat.

From one run, on the bench model (or ``--model``):

* **the floor**: transformers' own forward over a 2,048-token prompt in bfloat16 and in
  float32, in this process (best of two after a warm-up). Whichever is faster is what
  a prefill can reach on this machine: bfloat16 matmuls are native on some CPUs (AVX-512
  BF16, AMX) and emulated, several times slower, on others;
* **through chains**: the same prompt's time to first token through a 1-node chain
  (``--layers all`` with its gateway, torch's own threads, as transformers has) and a
  3-node chain with a ``--layers none`` gateway (one torch thread per process, as
  processes sharing a machine should): node processes on loopback, a streamed
  completion over HTTP (best of two);
* **a chat's turns** through the 3-node chain: a history of 1,376 tokens that grows by
  64 new tokens a turn, ten turns, each turn's time to first token, with the prefix
  cache (each turn computes only what the last one did not) and without it (each turn
  prefills its whole history: ``--no-prefix-cache``).

In bfloat16 (the default) the nodes serve a copy of the checkpoint stored in bfloat16
(made once, beside it) at ``--dtype auto``, as a user would run a bfloat16 model: each
node then chooses its prefill's dtype itself (float32 where bfloat16 is emulated).

Each prefill of the first two parts is a prompt of its own: with the prefix cache on,
a prompt sent twice would be all but free the second time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import trio

from .bench_common import gateway_model, http_ttft, prompt_ids
from .bench_concurrent import spans
from .node_processes import NodeProcess, add_gateway, start_chain, stop_all

PREFILL_TOKENS = 2048
CHAT_START = 1376  # the first turn's history; the tenth reaches 2,016 tokens
CHAT_TURN = 64  # new tokens a turn
CHAT_TURNS = 10
READING = 0.5  # seconds between a turn's answer and the next question: a person reads it

__all__ = ["run_prefill_bench"]


def prefill_dtype_here(dtype: str) -> str:
    """The dtype a node on this machine prefills a ``dtype`` checkpoint in at ``--dtype auto``."""
    import torch

    from ..backends.torch.prefill_dtype import pick_prefill_dtype

    chosen = pick_prefill_dtype("auto", getattr(torch, dtype), torch.device("cpu"), dtype_forced=False)
    return str(chosen).removeprefix("torch.")


def transformers_prefill(path: Path, dtype: str, prompt: list[int]) -> float:
    """Best of two of transformers' forward over ``prompt`` in ``dtype``, after a warm-up."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt])
    best = float("inf")
    with torch.no_grad():
        model(ids[:, :128])
        for _ in range(2):
            t0 = time.perf_counter()
            model(ids)
            best = min(best, time.perf_counter() - t0)
    return best


def stored_in(path: Path, dtype: str) -> Path:
    """The checkpoint at ``path`` with its weights stored in ``dtype``, as a real
    bfloat16 checkpoint is (built once, beside it): nodes then start at ``--dtype auto``,
    and each chooses its prefill's dtype itself (backends/torch/prefill_dtype.py)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = path.with_name(f"{path.name}-{dtype}")
    if (out / "config.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(dir=path.parent))
    for f in path.iterdir():
        if f.suffix == ".safetensors":
            tensors = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in load_file(f).items()}
            save_file(tensors, tmp / f.name, metadata={"format": "pt"})
        elif f.name == "config.json":
            config = json.loads(f.read_text())
            config["dtype"] = config["torch_dtype"] = dtype
            (tmp / f.name).write_text(json.dumps(config, indent=2))
        elif f.is_file():
            shutil.copy(f, tmp / f.name)
    try:
        tmp.rename(out)
    except OSError:  # another run built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def start_setup(path: Path, dtype: str, total: int, hops: int, key_dir: Path, extra: tuple[str, ...] = ()) -> tuple[list[NodeProcess], NodeProcess]:
    """``hops`` serving node processes (one alone with torch's threads, several with one
    thread each) and the gateway to use."""
    nodes = start_chain(path, dtype, ["all"] if hops == 1 else spans(total, hops), key_dir, None if hops == 1 else 1,
                        api=hops == 1, extra=extra)  # fmt: skip
    if hops == 1:
        return nodes, nodes[0]
    return nodes, add_gateway(nodes, path, dtype, key_dir, 1)


async def chain_ttft(url: str, prompts: list[list[int]], history: list[int] | None) -> tuple[float, list[float]]:
    """The best time to first token of ``prompts`` (none: 0), and each turn's of a chat
    over ``history`` (its first turn ``CHAT_START`` tokens long, each next turn
    ``CHAT_TURN`` tokens longer)."""
    model = await gateway_model(url)
    await http_ttft(url, model, [3] * 64)  # warm-up: routes, links, the first allocation
    best = min([await http_ttft(url, model, prompt) for prompt in prompts], default=0.0)
    chat = []
    for turn in range(1, CHAT_TURNS + 1) if history else ():
        await trio.sleep(READING)
        chat.append(await http_ttft(url, model, history[: CHAT_START + CHAT_TURN * turn]))
    return best, chat


def run_prefill_bench(path: Path, dtype: str) -> int:
    from tokenizers import Tokenizer

    config = json.loads((path / "config.json").read_text())
    # Prompt ids the gateway takes: within the tokenizer's vocabulary.
    vocab = min(config["vocab_size"], Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size())
    prompts = [prompt_ids(vocab, PREFILL_TOKENS, seed=10 + i) for i in range(2)]
    history = prompt_ids(vocab, CHAT_START + CHAT_TURN * CHAT_TURNS, seed=1)  # shares no prefix with the prompts
    served, node_dtype = (stored_in(path, dtype), "auto") if dtype in ("bfloat16", "float16") else (path, dtype)
    print(f"{PREFILL_TOKENS}-token prefill, {path.name}, nodes at --dtype {node_dtype} on its weights in {dtype} "
          f"(prefills in {prefill_dtype_here(dtype)} here) on 127.0.0.1, one torch thread each in the 3-node chain", flush=True)
    floor = {dt: transformers_prefill(path, dt, prompts[0]) for dt in ("bfloat16", "float32")}
    for dt, seconds in floor.items():
        print(f"transformers forward, {dt:9s} {seconds:6.2f} s", flush=True)
    fastest = min(floor.values())
    key_dir = Path(tempfile.mkdtemp(prefix="shardmesh-bench-"))
    chats: dict[bool, list[float]] = {}
    # (hops, prefix cache): the prompts through both chains, the chat with the cache and without
    for hops, cache in ((1, True), (3, True), (3, False)):
        extra = () if cache else ("--no-prefix-cache",)
        nodes, gateway = start_setup(served, node_dtype, config["num_hidden_layers"], hops, key_dir, extra)
        try:
            seconds, turns = trio.run(chain_ttft, gateway.url, prompts if cache else [], history if hops == 3 else None)
        finally:
            stop_all(nodes)
        if turns:
            chats[cache] = turns
        if cache:
            print(f"{hops}-node chain, time to first token {seconds:6.2f} s   {seconds / fastest:.2f}x transformers' faster dtype", flush=True)
    print(f"\na chat through the 3-node chain: {CHAT_START} tokens, then {CHAT_TURN} more a turn; time to first token per turn")
    for cache, chat in sorted(chats.items(), reverse=True):
        print(f"prefix cache {'on ' if cache else 'off'}  " + "  ".join(f"{i}: {s:.2f} s" for i, s in enumerate(chat, 1)))
    on, off = chats[True], chats[False]
    print(f"turn 2 {on[1]:.2f} s with the prefix cache, {off[1]:.2f} s without ({on[1] / off[1]:.2f}x); "
          f"turn {CHAT_TURNS} {on[-1]:.2f} s with, {off[-1]:.2f} s without ({on[-1] / off[-1]:.2f}x)")
    return 0
