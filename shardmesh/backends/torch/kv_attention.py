"""Attention over per-session, preallocated KV caches.

:func:`attention` receives the new keys and values of a whole batch (after rotary
embedding), writes each row into that session's preallocated cache, and attends each
row over its own cache. So sessions with different past lengths batch together without
padding, and a cache never grows by concatenation. Our own blocks (:mod:`.dense_blocks`)
call it directly; transformers' modules call it as the attention function registered
under :data:`NAME` (:mod:`.hf_blocks`).

For one session it makes exactly the SDPA call the unsplit transformers model would
make (:func:`sdpa`: the same ``None`` mask where transformers skips it, the same way of
sharing key heads between query heads), which is why a chain of stages reproduces the
full model's logits bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

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
    """Write the batch's keys and values into the caches, then SDPA per session."""
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
        keys, values = k_cache[:, :, : past + n], v_cache[:, :, : past + n]
        if keys.dtype != query.dtype:  # a prefill computing in float32 over a 16-bit cache (prefill_dtype.py)
            keys, values = keys.to(query.dtype), values.to(query.dtype)
        outputs.append(sdpa(module, query[row : row + 1], keys, values, mask, scaling))
    return torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0], None


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[b, kv_heads, len, d]`` -> ``[b, kv_heads * n_rep, len, d]``, each key head once per query head of its group."""
    b, kv_heads, length, d = x.shape
    return x[:, :, None].expand(b, kv_heads, n_rep, length, d).reshape(b, kv_heads * n_rep, length, d)


def sdpa(module, query, key, value, mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """``[1, heads, n, d]`` queries over ``[1, kv_heads, len, d]`` keys -> ``[1, n, heads, d]``.

    The call transformers' SDPA attention makes on CPU and CUDA (``sdpa_attention_forward``
    in transformers 5), step for step, so that logits match its models bit for bit: with
    no mask and heads of at most 256, SDPA shares key heads itself (``enable_gqa``); a
    single query with a mask is reshaped to run on the key heads; otherwise the key heads
    are repeated. ``is_causal`` only where no mask was needed for a prompt.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    n = query.shape[2]
    extra = {}
    if groups > 1:
        if (mask is None and key.shape[-1] == value.shape[-1] <= 256) or query.device.type == "mps":
            extra["enable_gqa"] = True
        elif n == 1:  # our masks are [1, 1, n, len]: shared by all heads, left as they are
            query = query.reshape(query.shape[0], query.shape[1] // groups, groups, query.shape[-1])
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    is_causal = n > 1 and mask is None and getattr(module, "is_causal", True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling, is_causal=is_causal, **extra)
    return out.reshape(out.shape[0], -1, n, value.shape[-1]).transpose(1, 2).contiguous()


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, attention)
        _registered = True
