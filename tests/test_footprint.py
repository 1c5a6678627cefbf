"""Per-block weight bytes from safetensors headers, without reading any tensor."""

from __future__ import annotations

import json

from shardmesh.backends.footprint import weight_bytes
from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.backends.weights import block_of, is_embedding, is_head, resolve_local


def test_weight_bytes_match_the_tensors_of_a_real_checkpoint() -> None:
    from safetensors import safe_open

    path = cached_tiny_model("qwen3", layers=4, hidden=64)
    files = resolve_local(str(path))
    config = json.loads((path / "config.json").read_text())
    sizes = weight_bytes(files, 4, config.get("tie_word_embeddings", False))
    want_blocks, want_embed, want_head = [0] * 4, 0, 0
    for name, file_name in files.weight_map.items():
        with safe_open(path / file_name, framework="pt") as f:
            t = f.get_tensor(name)
        n = t.numel() * t.element_size()
        if (b := block_of(name)) is not None:
            want_blocks[b] += n
        elif is_embedding(name):
            want_embed += n
        elif is_head(name):
            want_head += n
    if config.get("tie_word_embeddings") and "lm_head.weight" not in files.weight_map:
        want_head += want_embed
    assert sizes.blocks == tuple(want_blocks) and all(want_blocks)
    assert (sizes.embeddings, sizes.head) == (want_embed, want_head)
    assert files.reads == [], "only headers are read"
    # Loaded in bfloat16, a float32 checkpoint takes half the room.
    assert weight_bytes(files, 4, config.get("tie_word_embeddings", False), "bfloat16").blocks == tuple(b // 2 for b in want_blocks)
