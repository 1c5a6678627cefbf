"""Tensors as plain bytes: what crosses the stage boundary and the wire.

A :class:`RawTensor` is a dtype name, a shape and the raw bytes, nothing more. The
mesh and the gateway never import torch or mlx, and a torch stage can feed an MLX
stage: only bytes travel. bfloat16 travels as its 2-byte pattern; nothing is ever
pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import BadInput

#: Element sizes of the dtypes that may cross the boundary.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
}


@dataclass(frozen=True)
class RawTensor:
    """A tensor as a dtype name, a shape and exactly as many bytes as they need."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise BadInput(f"unsupported dtype {self.dtype!r}")
        if any((not isinstance(d, int)) or d < 0 for d in self.shape):
            raise BadInput(f"bad shape {self.shape!r}")
        if len(memoryview(self.data).cast("B")) != self.nbytes:
            raise BadInput(f"payload holds {len(memoryview(self.data).cast('B'))} bytes, {self.shape} {self.dtype} needs {self.nbytes}")

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]
