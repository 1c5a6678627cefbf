"""Prefill in float32 where bfloat16 is emulated; decode in the weights' own dtype.

A bfloat16 matmul is native on GPUs and on CPUs with AVX-512 BF16 or AMX (and ARM's
BF16 extension), but emulated, several times slower than float32, on other CPUs: a
2,048-token prefill of the 100M bench model took 22.0 s in bfloat16 and 4.7 s in
float32 on an AVX2 machine (docs/PERFORMANCE.md 19). Decode is bound by memory, not
arithmetic, and stays faster in the smaller dtype. So on such a CPU a stage stored in
bfloat16 (or float16) runs a step of :data:`PREFILL_PHASE_TOKENS` tokens or more in
float32 and the rest in its own dtype; ``--dtype`` given explicitly, or
``--prefill-dtype``, decides instead.

The weights stay in their dtype. Each layer's are upcast, just before the layer runs,
into float32 buffers that every layer of the stage reuses (:class:`Upcast`): the extra
memory is one layer's weights in float32, not the whole span's. The keys and values a
float32 prefill writes go into the session's cache in its dtype, as a decode step
would store them; attention reads them back in the step's dtype (:mod:`.kv_attention`).
Hidden states leave the stage in its dtype, so the next hop sees no difference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .tensors import torch_dtype

PREFILL_PHASE_TOKENS = 16  # a step of this many tokens or more is a prefill's
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86, x86, ARM (/proc/cpuinfo)

__all__ = ["PREFILL_PHASE_TOKENS", "Upcast", "cpu_has_native_bf16", "pick_prefill_dtype"]


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bfloat16 natively, from the kernel's CPU flags. True
    where they cannot be read: the weights' own dtype is then kept, as before."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return True
    flags = {flag for line in text.splitlines() if line.split(":")[0].strip() in ("flags", "Features")
             for flag in line.split(":", 1)[1].split()}  # fmt: skip
    return not flags or bool(flags & NATIVE_BF16_FLAGS)


def pick_prefill_dtype(requested: str, dtype: torch.dtype, device: torch.device, dtype_forced: bool) -> torch.dtype:
    """The dtype prefill steps compute in: ``requested`` unless ``auto``; with ``auto``,
    the stage's ``dtype``, except float32 for a 16-bit stage on a CPU without native
    bfloat16, unless the stage's dtype was given explicitly (it then serves everything)."""
    if requested != "auto":
        return torch_dtype(requested)
    if dtype_forced or device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    return dtype if cpu_has_native_bf16() else torch.float32


class Upcast:
    """One layer's parameters in another dtype, in buffers reused from layer to layer
    (the layers of a stage have the same shapes; a new shape gets a buffer of its own)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._buffers: dict[tuple[str, torch.Size], torch.Tensor] = {}

    def params(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """``layer``'s parameters by name, copied into this dtype."""
        out = {}
        for name, param in layer.named_parameters():
            key = (name, param.shape)
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = self._buffers[key] = torch.empty(param.shape, dtype=self.dtype, device=param.device)
            buffer.copy_(param)
            out[name] = buffer
        return out
