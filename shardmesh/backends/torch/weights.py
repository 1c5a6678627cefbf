"""Checkpoint tensors → the state dict of one stage's module (our blocks or transformers').

Checkpoints on the hub name tensors the way the model was first released
(``model.layers.7.block_sparse_moe.experts.3.w1.weight``); transformers 5 modules may
name and shape them differently (``layers.7.mlp.experts.gate_up_proj``, all experts
fused). This module renames, renumbers blocks to the stage's local indices and fuses
per-expert weights, touching only the tensors the span was given.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from ..weights import ModelFiles

_EXPERT = re.compile(r"^(?P<base>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
# Per-expert projection names → their role in transformers 5's fused expert tensors.
_GATE, _UP, _DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")
# Old module names → transformers 5 ones.
_RENAMES = ((".block_sparse_moe.", ".mlp."),)


def base_prefix(weight_map: dict[str, str]) -> str:
    """``"model."`` for most checkpoints: what stands before ``embed_tokens``/``layers``."""
    for name in weight_map:
        m = re.match(r"^(.*?)(embed_tokens|layers)\.", name)
        if m:
            return m.group(1)
    return "model."


def stage_name(checkpoint_name: str, prefix: str, start: int) -> str:
    """Checkpoint name → name inside the stage's module (local block index)."""
    if checkpoint_name.startswith("lm_head."):
        return checkpoint_name
    name = checkpoint_name.removeprefix(prefix)
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return _LAYER.sub(lambda m: f"layers.{int(m.group(1)) - start}.", name, count=1)


def _fuse_experts(per_expert: dict[tuple[str, str], dict[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    by_base: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for (base, proj), tensors in per_expert.items():
        by_base[base][proj] = torch.stack([tensors[e] for e in sorted(tensors)])
    fused = {}
    for base, projs in by_base.items():
        gate = next((projs[p] for p in _GATE if p in projs), None)
        up = next((projs[p] for p in _UP if p in projs), None)
        down = next((projs[p] for p in _DOWN if p in projs), None)
        if gate is None or up is None or down is None:
            raise ValueError(f"incomplete expert weights under {base}: found {sorted(projs)}")
        fused[f"{base}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        fused[f"{base}.down_proj"] = down
    return fused


def load_span_state(
    files: ModelFiles, names: list[str], module: nn.Module, config, start: int
) -> dict[str, torch.Tensor]:
    """Read ``names`` and return them keyed like ``module.state_dict()``."""
    prefix = base_prefix(files.weight_map)
    state: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
    for checkpoint_name, tensor in files.read(names).items():
        name = stage_name(checkpoint_name, prefix, start)
        m = _EXPERT.match(name)
        if m:
            per_expert[(m["base"], m["proj"])][int(m["e"])] = tensor
        else:
            state[name] = tensor
    state.update(_fuse_experts(per_expert))

    expected = set(module.state_dict().keys())
    if "lm_head.weight" in expected and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]  # tied embeddings
    if module.embed_tokens is None:
        state.pop("embed_tokens.weight", None)
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"checkpoint tensors with no place in the stage: {unexpected[:8]}")
    return state
