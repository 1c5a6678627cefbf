"""How many bytes each block of a checkpoint weighs, and how much memory is free.

A node picks how many blocks to serve from these two numbers (see
:mod:`shardmesh.placement.capacity`), before it loads anything. Tensor sizes come from
the safetensors headers (8 bytes of length, then a JSON table of dtype and shape per
tensor), so nothing but the headers is read: for a hub model whose shards are not here
yet, the hub serves just the headers.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from dataclasses import dataclass

from ..contract import DTYPE_SIZES
from .weights import ModelFiles, block_of, is_embedding, is_head, safetensors_header

log = logging.getLogger(__name__)

DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class WeightBytes:
    """Bytes a stage holds: per block, plus the first stage's embeddings and the last
    stage's final norm and head (which may be a copy of the tied embeddings)."""

    blocks: tuple[int, ...]
    embeddings: int
    head: int


def _header(path) -> dict:
    try:
        return json.loads(safetensors_header(path))
    except ValueError as exc:  # not JSON, or cut short at the size limit
        raise ValueError(f"{path}: not a safetensors file") from exc


def _hub_headers(files: ModelFiles) -> dict[str, dict]:
    """Tensor tables of a hub model's shards, read remotely (only their headers)."""
    from huggingface_hub import get_safetensors_metadata

    repo_id, revision = files.hub  # type: ignore[misc]
    meta = get_safetensors_metadata(repo_id, revision=revision)
    return {
        name: {"dtype": info.dtype, "shape": info.shape}
        for file_meta in meta.files_metadata.values()
        for name, info in file_meta.tensors.items()
    }


def tensor_table(files: ModelFiles) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape"}}`` for every tensor of the checkpoint."""
    table: dict[str, dict] = {}
    missing = False
    for file_name in sorted(set(files.weight_map.values())):
        path = files.root / file_name
        if not path.exists():
            missing = True
            break
        table.update({k: v for k, v in _header(path).items() if k != "__metadata__"})
    if missing:
        if files.hub is None:
            raise FileNotFoundError(f"{files.root}: a weight shard is missing")
        table = _hub_headers(files)
    return table


def weight_bytes(files: ModelFiles, total_blocks: int, tied_embeddings: bool, dtype: str = "auto") -> WeightBytes:
    """Bytes per block once loaded in ``dtype`` ("auto": as stored)."""
    blocks = [0] * total_blocks
    embeddings = head = 0
    for name, info in tensor_table(files).items():
        stored = DTYPE_BYTES.get(info["dtype"], 4)
        per_element = DTYPE_SIZES.get(dtype, stored) if stored >= 2 else stored  # "auto": as stored
        size = math.prod(info["shape"]) * per_element
        block = block_of(name)
        if block is not None and block < total_blocks:
            blocks[block] += size
        elif is_embedding(name):
            embeddings += size
        elif is_head(name):
            head += size
    if tied_embeddings and not any(n.startswith("lm_head.") for n in files.weight_map):
        head += embeddings  # the last stage loads its own copy as the head
    return WeightBytes(tuple(blocks), embeddings, head)


def free_memory_bytes(device: str = "auto") -> int:
    """Memory a node could use now: free VRAM on a GPU ("auto": if there is one),
    available RAM otherwise (Apple silicon shares it with the GPU)."""
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info(torch.device("cuda" if device == "auto" else device))
            return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def release_unused_memory() -> None:
    """Hand the memory of dropped stages back now, not at some later collection (and,
    on a GPU, out of torch's cache, so free VRAM reads true for the next capacity)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
