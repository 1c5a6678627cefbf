"""Which backend serves a node's blocks: ``--backend auto|torch|mlx``.

``auto`` picks MLX on Apple silicon, where it uses the unified memory and the GPU
directly, and torch everywhere else (CUDA, ROCm, CPU). MLX also runs on Linux CPUs
(``pip install "shardmesh[mlx]"``), which is how its tests run in CI, but torch is the
faster CPU backend there, so ``auto`` does not pick it.
"""

from __future__ import annotations

import importlib.util
import platform
import sys

from .config import UsageError


def mlx_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("mlx", "mlx_lm"))


def choose_backend(requested: str) -> str:
    """``torch`` or ``mlx``; a clear error when MLX is asked for but not installed."""
    if requested == "torch":
        return "torch"
    if requested == "mlx":
        if not mlx_available():
            raise UsageError('--backend mlx needs MLX: pip install "shardmesh[mlx]" (on Linux this brings mlx[cpu])')
        return "mlx"
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    return "mlx" if apple_silicon and mlx_available() else "torch"


def build_stage(
    backend: str, files, start: int, end: int | None, *, model_name: str, dtype: str, device: str, cache_budget_bytes: int,
    threads: int | None = None, prefill_dtype: str = "auto",
):
    """The stage for blocks ``[start, end)`` (``end`` None: to the last); call it on the compute thread, which then
    computes with ``threads`` CPU threads (torch; None: torch's default)."""
    if backend == "mlx":
        from ..backends.mlx.stage import MlxStage

        return MlxStage(files, start, end, model_name=model_name, dtype=dtype, cache_budget_bytes=cache_budget_bytes)
    import torch

    from ..backends.torch.stage import TorchStage

    if threads is not None:
        # OpenMP's team size is per calling thread: this is the compute thread.
        torch.set_num_threads(threads)
    return TorchStage(files, start, end, model_name=model_name, dtype=dtype, device=device, cache_budget_bytes=cache_budget_bytes,
                      prefill_dtype=prefill_dtype)
