"""torch tensors ↔ :class:`RawTensor` without copies where torch allows it."""

from __future__ import annotations

import torch

from ...contract import BadInput, RawTensor

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}") from None


def raw_from_tensor(tensor: torch.Tensor) -> RawTensor:
    """The tensor's bytes (bf16 as its 2-byte pattern); shares memory when contiguous on CPU."""
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise BadInput(f"dtype {tensor.dtype} cannot cross the stage boundary")
    flat = tensor.detach().to("cpu").contiguous()
    data = memoryview(flat.view(torch.uint8).reshape(-1).numpy())
    return RawTensor(name, tuple(flat.shape), data)


def tensor_from_raw(raw: RawTensor) -> torch.Tensor:
    """A CPU tensor over the raw bytes (copied once if the buffer is read-only)."""
    data = raw.data
    if isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly):
        data = bytearray(data)
    if raw.nbytes == 0:
        return torch.empty(raw.shape, dtype=_DTYPES[raw.dtype])
    flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(_DTYPES[raw.dtype]).reshape(raw.shape)
