"""Attention over per-session, preallocated KV caches.

transformers lets a model call a registered attention function instead of its built-in
one. Ours receives the new keys and values of a whole batch (after rotary embedding),
writes each row into that session's preallocated cache, and attends each row over its
own cache with transformers' SDPA function. So sessions with different past lengths
batch together without padding, and a cache never grows by concatenation.

For one session it makes exactly the SDPA call the unsplit model would make (the same
``None`` mask where transformers skips it), which is why a chain of stages reproduces
the full model's logits bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NAME = "shardmesh"


@dataclass
class StepCaches:
    """The caches of the sessions in one batched forward, row by row."""

    keys: list[list[torch.Tensor]]  # [row][local layer] -> [1, kv_heads, max_len, head_dim]
    values: list[list[torch.Tensor]]
    positions: list[int]  # tokens already cached, per row
    first_layer: int  # global index of the first layer this step runs (the session may use a sub-range of the span)


def causal_mask(past: int, n: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask ``[1, 1, n, past + n]`` (True = attend), or None where SDPA needs none.

    Like transformers, skip the mask when a single query sees every key or when a prompt
    starts from an empty cache (SDPA's own ``is_causal`` covers that), as long as no
    sliding window cuts into the keys.
    """
    total = past + n
    if window is None or total < window:
        if n == 1 or past == 0:
            return None
    q = torch.arange(past, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed[None, None]


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, shardmesh_step=None, **kwargs):
    """The registered attention function: cache, then SDPA per session."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    step: StepCaches | None = shardmesh_step
    if step is None:
        raise RuntimeError("shardmesh attention called without the stage's caches")
    local = module.layer_idx - step.first_layer
    # Some models pass their window as a keyword (Mixtral, Mistral: one window for every
    # layer), others set it on the module per layer (Qwen2): the keyword wins if given.
    if "sliding_window" in kwargs:
        window = kwargs.pop("sliding_window")
    else:
        window = getattr(module, "sliding_window", None)
    n = query.shape[2]
    outputs = []
    for row, past in enumerate(step.positions):
        k_cache = step.keys[row][local]
        v_cache = step.values[row][local]
        k_cache[:, :, past : past + n] = key[row : row + 1]
        v_cache[:, :, past : past + n] = value[row : row + 1]
        mask = causal_mask(past, n, window, query.device)
        out, _ = sdpa_attention_forward(
            module,
            query[row : row + 1],
            k_cache[:, :, : past + n],
            v_cache[:, :, : past + n],
            mask,
            dropout=0.0,
            scaling=scaling,
            **kwargs,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0], None


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, attention)
        _registered = True
