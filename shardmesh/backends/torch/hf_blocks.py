"""Blocks built from transformers' own modeling modules, for the models that
:mod:`.dense_blocks` does not cover (MoE models such as Qwen3-MoE and Mixtral, rotary
types that rescale at run time, other activations).

The whole model is built on the ``meta`` device from its config, so every block keeps
its global index (sliding-window, MoE-dense and per-layer choices depend on it), and we
keep ``layers[start:end]`` (plus the embeddings on the first stage, the final norm and
LM head on the last). Each attention module calls the function registered as
``shardmesh`` (:mod:`.kv_attention`). Importing transformers' modeling code costs about
80 MB of resident memory (docs/PERFORMANCE.md, "Memory"), which is why the dense
families do without it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kv_attention


class StageModule(nn.Module):
    """Just the parts of a causal LM that one stage runs."""

    def __init__(self, full_model: nn.Module, start: int, end: int) -> None:
        super().__init__()
        base = full_model.get_decoder() if hasattr(full_model, "get_decoder") else full_model.model
        total = len(base.layers)
        self.embed_tokens = base.embed_tokens if start == 0 else None
        self.layers = nn.ModuleList(list(base.layers)[start:end])
        self.norm = base.norm if end == total else None
        self.lm_head = full_model.lm_head if end == total else None
        self.rotary_type = type(base.rotary_emb)
        self.rotary_emb: nn.Module | None = None  # built on the real device, see make_rotary

    def make_rotary(self, config) -> nn.Module:
        return self.rotary_type(config=config)


def build(config, start: int, end: int, dtype: torch.dtype) -> StageModule:
    """Blocks ``[start, end)`` on the meta device, attention routed to our caches."""
    from transformers import AutoModelForCausalLM

    kv_attention.register()
    config._attn_implementation = kv_attention.NAME
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=kv_attention.NAME)
    return StageModule(full, start, end)
