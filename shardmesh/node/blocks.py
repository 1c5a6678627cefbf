"""The blocks this node serves: how many fit, loading them, keeping them running.

Everything that needs torch (or mlx) is imported inside these functions, so that a
node with ``--layers none`` (a gateway) never loads a tensor library at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import trio

from ..backends.batch_stats import BatchStats
from ..backends.batcher import StepBatcher
from ..backends.compute_thread import compute_thread
from ..contract import ChainOpener, HopCompute, Stage
from .backend import build_stage, choose_backend
from .config import NodeConfig, UsageError
from .heap import settle
from .model import LoadedModel

log = logging.getLogger("shardmesh.node.blocks")


@dataclass
class LocalBlocks:
    """A loaded span: its stage, the batcher that runs it, the stage as a hop of other
    people's chains, and (when it holds the whole model) chains with no network."""

    stage: Stage
    batcher: StepBatcher
    hop: HopCompute
    local_chains: ChainOpener
    throughput: float
    prefill_step: int | None = None  # the prefill step size it computes best (measured; None: not measured)


async def load_blocks(
    config: NodeConfig, model: LoadedModel, model_id: str, span: tuple[int, int], say: Callable[[str], None],
    stats: BatchStats | None = None,
) -> LocalBlocks:
    """Loads blocks ``[start, end)`` on the compute thread and measures their speed;
    its batches are recorded in ``stats`` (the node's, over every span it serves)."""
    from ..backends.hop_compute import StageHopCompute
    from ..backends.local_chain import LocalChains
    from ..backends.sampler_state import draw_greedy_together
    from ..backends.torch.throughput import cached_block_throughput, cached_prefill_step, default_cache_dir, throughput_cache_key
    from ..mesh.open_request import Limits

    start, end = span
    backend = choose_backend(config.backend)
    say(f"loading blocks [{start}, {end}) of {model.name} ({backend})")
    compute = compute_thread()
    stage = await compute.run(
        lambda: build_stage(
            backend,
            model.files,
            start,
            end,
            model_name=model.name,
            dtype=config.dtype,
            device=config.device,
            cache_budget_bytes=int(config.kv_cache_gb * (1 << 30)),
            threads=config.threads,
            prefill_dtype=config.prefill_dtype,
        )
    )
    threads = "" if config.threads is None else f"|threads={config.threads}"  # the speed measured depends on them
    key = throughput_cache_key(f"{model_id}|{backend}{threads}", stage.info.device, stage.info.dtype)
    throughput = await compute.run(cached_block_throughput, stage, default_cache_dir(), key)
    prefill_step = await compute.run(cached_prefill_step, stage, default_cache_dir(), key, Limits().max_tokens_per_step)
    prefill = str(getattr(stage, "prefill_dtype", "")).removeprefix("torch.")
    say(
        f"serving {model.name} blocks [{start}, {end}) with {backend} on {stage.info.device} in {stage.info.dtype} "
        f"({throughput:.0f} tokens/s per block)" + (f"; prefills in {prefill}" if prefill and prefill != stage.info.dtype else "")
    )
    batcher = StepBatcher(stage, draw_together=draw_greedy_together, stats=stats)
    batcher.memory.after_free(force=True)  # the heap the measurements above grew and let go
    vocabulary = grammar_vocabulary(model) if end == model.total_blocks else None  # only the last stage samples
    settle()  # its modules and tensors live as long as it does (heap.py)
    chains = LocalChains([batcher], config.prefix_cache, vocabulary, prefill_step)
    return LocalBlocks(stage, batcher, StageHopCompute(batcher, vocabulary), chains, throughput, prefill_step)


def grammar_vocabulary(model: LoadedModel):  # -> backends.grammar.Vocabulary | None
    """The model's tokens for grammars (structured output), from its tokenizer's
    serialised form; None for a tokenizer that has none (a slow transformers one)."""
    from copy import copy

    from ..api.generate import eos_token_ids
    from ..backends.grammar import Vocabulary

    backend = getattr(model.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    backend = copy(backend)
    backend.no_padding()
    backend.no_truncation()
    size = max(model.config.vocab_size or 0, len(model.tokenizer))
    return Vocabulary(backend.to_str(), size, tuple(sorted(eos_token_ids(model.tokenizer, model.generation_config))))


async def expire_idle_sessions(batcher: StepBatcher, idle_seconds: float) -> None:
    """Frees the caches of sessions whose client vanished without closing them."""
    while True:
        await trio.sleep(min(30.0, idle_seconds))
        for session_id in await batcher.expire_idle(idle_seconds):
            log.info("closed idle session %s", session_id)


async def run_blocks(blocks: LocalBlocks, idle_seconds: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A loaded stage at work: its batcher and its idle-session sweeper."""
    async with trio.open_nursery() as nursery:
        await nursery.start(blocks.batcher.run)
        nursery.start_soon(expire_idle_sessions, blocks.batcher, idle_seconds)
        task_status.started()


def auto_capacity(config: NodeConfig, model: LoadedModel) -> int:
    """Blocks this node can hold (``--layers auto``): its memory budget less the KV
    cache it reserves, over the model's per-block weight bytes."""
    from ..backends.footprint import free_memory_bytes, weight_bytes
    from ..placement.capacity import blocks_that_fit

    sizes = weight_bytes(model.files, model.total_blocks, model.config.tie_word_embeddings, config.dtype)
    if config.memory_gb is not None:
        memory = int(config.memory_gb * (1 << 30))
    else:
        memory = int(free_memory_bytes(config.device) * config.memory_fraction)
    budget = memory - int(config.kv_cache_gb * (1 << 30))
    capacity = blocks_that_fit(sizes.blocks, sizes.embeddings, sizes.head, budget)
    if config.max_blocks is not None:
        capacity = min(capacity, config.max_blocks)
    if capacity < 1:
        heaviest = max(sizes.blocks, default=0) + max(sizes.embeddings, sizes.head)
        raise UsageError(
            f"not enough memory for one block of {model.name}: {memory / 2**30:.2f} GiB for weights and KV cache, "
            f"{config.kv_cache_gb:g} GiB of it reserved for the cache, and a block with embeddings or head needs "
            f"{heaviest / 2**30:.2f} GiB (see --memory-gb, --memory-fraction, --kv-cache-gb, --max-blocks)"
        )
    return capacity
