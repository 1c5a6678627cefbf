"""How fast this node runs one block, so routing can price a chain of blocks.

A node publishes ``throughput``: decode tokens per second through ONE transformer block
on its device and dtype. Blocks of one model cost about the same, so ``k`` blocks cost
``k / throughput`` seconds per token: one number compares nodes of any span length.

It also publishes ``prefill_step`` (in its record's ``limits``): how many tokens one
prefill step should carry here. Larger steps make better use of the matrix units, up to
a point that depends on the device, the dtype and the model's width, so it is measured:
the same prompt prefilled in steps of each candidate size, the smallest within
:data:`STEP_TOLERANCE` of the fastest taken. Gateways cut prefills at the least of the
hops' figures (``api/resumable.py``).

The benchmark runs the stage's own first layers (nothing new is loaded) with private KV
caches. The result is cached on disk per model, device and dtype, so a node does not
re-measure (and re-jitter) on every start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import kv_attention
from .prefill_dtype import PREFILL_PHASE_TOKENS
from .stage import TorchStage

PREFILL = 16  # tokens of context before the timed steps: a decode step attends over a cache
# Several layers: one layer run over and over keeps its weights in the CPU/GPU cache, where
# real decoding streams them from memory. At most eight, so big blocks still take seconds.
MAX_LAYERS = 8
PREFILL_STEPS = (256, 512, 1024, 2048)  # candidate prefill step sizes, timed over PREFILL_STEPS[-1] tokens
STEP_TOLERANCE = 0.05  # a smaller step within 5 % of the fastest wins: it pipelines better


def _sync(device: torch.device) -> None:
    if device.type in ("cuda", "mps"):  # their kernels run async: we would time the launches
        getattr(torch, device.type).synchronize()


def _private_caches(stage: TorchStage, layers: Any, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values for ``length`` tokens of ``layers``, outside ``stage.sessions``: no
    session or budget sees them, nothing to clean up."""
    shape = (1, stage.num_kv_heads, length, stage.head_dim)
    keys = [torch.zeros(shape, dtype=stage.dtype, device=stage.device) for _ in layers]
    return keys, [torch.zeros_like(k) for k in keys]


def _inputs(stage: TorchStage, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` hidden states, seeded so every node feeds the same (MoE routing, hence cost, depends on them)."""
    return torch.randn(1, n, stage.info.hidden_size, generator=torch.Generator().manual_seed(0)).to(device=stage.device, dtype=dtype)


def _run(stage: TorchStage, layers: Any, caches: tuple[list[torch.Tensor], list[torch.Tensor]], hidden: torch.Tensor,
         position: int) -> None:  # fmt: skip
    """``hidden`` at ``position`` through ``layers``, in its dtype, as a step runs them."""
    position_ids = torch.arange(position, position + hidden.shape[1], device=stage.device)[None]
    rotary = stage.module.rotary_emb(hidden, position_ids)
    step = kv_attention.StepCaches([caches[0]], [caches[1]], [position], first_layer=stage.start)  # one row: us
    extra = {"attention_mask": None, "position_ids": position_ids, "position_embeddings": rotary, "shardmesh_step": step}
    for layer in layers:
        # Each layer gets the same input, not its predecessor's output: through random
        # weights that can overflow, and inf/NaN arithmetic is slow on some CPUs.
        stage.run_layer(layer, hidden, extra)


@torch.inference_mode()
def measure_block_throughput(stage: TorchStage, *, steps: int = 8, warmup: int = 2) -> float:
    """Decode tokens per second through one block of ``stage``, measured now.

    Prefills ``PREFILL`` tokens into the stage's first ``MAX_LAYERS`` layers, runs ``warmup``
    untimed decode steps (first calls pay for allocation and kernel choice), then times ``steps``
    single-token steps. Runs on the caller's thread: the node's compute thread (:mod:`.compute_thread`).
    """
    if steps < 1 or warmup < 0:
        raise ValueError("steps must be positive and warmup non-negative")
    layers = stage.module.layers[:MAX_LAYERS]
    caches = _private_caches(stage, layers, PREFILL + warmup + steps)
    prompt, token = _inputs(stage, PREFILL + 1, stage.dtype).split([PREFILL, 1], dim=1)
    _run(stage, layers, caches, prompt, 0)
    began = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:  # the clock starts after the untimed warmup steps
            _sync(stage.device)
            began = time.perf_counter()
        _run(stage, layers, caches, token, PREFILL + i)
    _sync(stage.device)
    return steps * len(layers) / max(time.perf_counter() - began, 1e-9)


@torch.inference_mode()
def measure_prefill_step(stage: TorchStage, *, sizes: tuple[int, ...] = PREFILL_STEPS, rounds: int = 2) -> int:
    """The prefill step size this stage computes best, measured now (see the module
    docstring): ``sizes[-1]`` tokens through the stage's first ``MAX_LAYERS`` layers in
    steps of each size, in the dtype the stage prefills in, each size's best of
    ``rounds`` runs (after one untimed run)."""
    layers, total = stage.module.layers[:MAX_LAYERS], sizes[-1]
    caches = _private_caches(stage, layers, total)
    prompt = _inputs(stage, total, stage.prefill_dtype if min(sizes) >= PREFILL_PHASE_TOKENS else stage.dtype)

    def prefill(size: int) -> float:
        began = time.perf_counter()
        for position in range(0, total, size):
            _run(stage, layers, caches, prompt[:, position : position + size], position)
        _sync(stage.device)
        return time.perf_counter() - began

    prefill(sizes[0])  # untimed: allocation, kernel choice
    seconds = {size: min(prefill(size) for _ in range(rounds)) for size in sizes}
    fastest = min(seconds.values())
    return min(size for size, s in seconds.items() if s <= fastest * (1 + STEP_TOLERANCE))


def measure_stage_throughput(stage, *, steps: int = 8) -> float:
    """The same figure for any :class:`~shardmesh.contract.Stage` (the MLX one), through
    its public protocol: a private session, a short prefill, then timed single-token steps over the
    whole span. Less exact than the torch path (it includes the head on a last stage)."""
    from array import array

    from ...contract import RawTensor, StepRequest

    info = stage.info
    session = f"throughput-probe-{time.monotonic_ns()}"

    def inputs(n: int) -> RawTensor:
        if info.start == 0:
            return RawTensor("int64", (n,), array("q", [1] * n).tobytes())
        return RawTensor("float32", (n, info.hidden_size), bytes(4 * n * info.hidden_size))

    stage.open(session, PREFILL + steps + 2)
    try:
        stage.step([StepRequest(session, inputs(PREFILL), 0)])
        stage.step([StepRequest(session, inputs(1), PREFILL)])  # warm-up
        began = time.perf_counter()
        for i in range(steps):
            stage.step([StepRequest(session, inputs(1), PREFILL + 1 + i)])
        elapsed = time.perf_counter() - began
    finally:
        stage.close(session)
    return steps * (info.end - info.start) / max(elapsed, 1e-9)


def throughput_cache_key(model_id: str, device: str, dtype: str) -> str:
    """The cache key of one measurement, e.g. ``"Qwen/Qwen3-0.6B|cuda|bfloat16"``."""
    return f"{model_id}|{device}|{dtype}"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/shardmesh``, or ``~/.cache/shardmesh`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shardmesh"


def _read_cache(path: Path) -> dict:
    """The cache's entries, or ``{}`` if it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_block_throughput(stage: TorchStage, cache_dir: Path, key: str) -> float:
    """The throughput stored for ``key`` in ``cache_dir/throughput.json``, else measure and store it.

    Only a positive finite number counts as stored: a corrupt file or bad entry is measured
    again and rewritten. Delete the file to re-measure after changing hardware.
    """
    measure = measure_block_throughput if isinstance(stage, TorchStage) else measure_stage_throughput
    return float(_cached(cache_dir, key, lambda: measure(stage)))


def cached_prefill_step(stage: Any, cache_dir: Path, key: str, largest: int) -> int | None:
    """:func:`measure_prefill_step`, stored beside the throughput (``key|prefill_step``),
    at most ``largest`` (the node's ``max_tokens_per_step``); None for a stage that is
    not torch's (MLX: not measured, gateways use their default)."""
    if not isinstance(stage, TorchStage):
        return None
    sizes = tuple(size for size in PREFILL_STEPS if size <= largest) or (largest,)
    measured = _cached(cache_dir, f"{key}|prefill_step|{largest}", lambda: measure_prefill_step(stage, sizes=sizes))
    return max(1, min(largest, int(measured)))  # whatever the file says


def _cached(cache_dir: Path, key: str, measure: Callable[[], float]) -> float:
    """The positive finite number stored for ``key``, else ``measure()``, stored."""
    path = Path(cache_dir) / "throughput.json"
    value = _read_cache(path).get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return value
    value = measure()
    with contextlib.suppress(OSError):  # a read-only cache costs a re-measure, never a failed start
        path.parent.mkdir(parents=True, exist_ok=True)
        # Re-read just before writing, so another node's fresh entry is kept; write a
        # temp file and rename it over, so a reader never sees a half-written file.
        entries = {**_read_cache(path), key: value}
        fd, tmp = tempfile.mkstemp(prefix=".throughput.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=2, sort_keys=True)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)  # still there only if the replace failed
    return value
