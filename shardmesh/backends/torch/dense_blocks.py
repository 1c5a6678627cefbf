"""Our own decoder blocks for the dense Llama family: Llama, Mistral, Qwen2 and Qwen3.

Why not transformers' modeling modules: importing any of them loads
``torch.distributed.tensor`` and ``torch._dynamo``, which bring in sympy, about 80 MB
of a serving node's memory before a weight is read (docs/PERFORMANCE.md, "Memory").
These four families share one block: RMSNorm, grouped-query attention with rotary
embeddings, a SiLU-gated MLP. What differs is a handful of switches (biases, a norm on
each head's queries and keys, which layers slide), read from the config
(:mod:`.dense_config`, without transformers) in :func:`family_of`.

Every operation is the one transformers runs, in the same order and dtype, so a stage
built here gives the same logits, bit for bit, as transformers' model on the same
weights (``tests/test_torch_stage.py`` checks it for each family in float32 and
bfloat16). Anything else, MoE models included, is built from transformers' modules
(:mod:`.hf_blocks`): :func:`.dense_config.is_dense` says which path a model takes.

Parameter names are transformers' own (``layers.3.self_attn.q_proj.weight``), so the
checkpoint loader (:mod:`.weights`) serves both paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import kv_attention
from .dense_config import DenseConfig


@dataclass(frozen=True)
class Family:
    """What one family's blocks switch on or off."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over each head's queries and keys before the rotation (Qwen3)

    def window(self, config: DenseConfig, layer: int) -> int | None:
        """The sliding window of global layer ``layer``, or None."""
        if config.layer_types is None:  # Mistral: one window for every layer (or none)
            return config.sliding_window
        return config.sliding_window if config.layer_types[layer] == "sliding_attention" else None


def family_of(config: DenseConfig) -> Family:
    kind, bias = config.model_type, config.attention_bias
    if kind == "qwen2":
        return Family(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)
    if kind == "mistral":
        return Family(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False)
    if kind == "qwen3":
        return Family(qkv_bias=bias, o_bias=bias, mlp_bias=False, qk_norm=True)
    return Family(qkv_bias=bias, o_bias=bias, mlp_bias=config.mlp_bias, qk_norm=False)


class Linear(nn.Module):
    """``nn.Linear`` without its random initialisation: the weights always come from the
    checkpoint, and initialising on the meta device would import torch._dynamo (its
    reference kernels compile)."""

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.empty(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """``nn.Embedding`` without its random initialisation (see :class:`Linear`)."""

    def __init__(self, vocab: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.variance_epsilon = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)  # the mean of squares in float32, whatever we store
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = hidden * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden.to(dtype)


def inverse_frequencies(config: DenseConfig) -> torch.Tensor:
    """Each rotary dimension pair's frequency, in float32, as transformers computes it
    for the ``default``, ``linear`` and ``llama3`` rotary types."""
    params = config.rope_parameters
    dim = config.head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    kind = params["rope_type"]
    if kind == "linear":
        return inv_freq / params["factor"]
    if kind != "llama3":
        return inv_freq
    # Llama 3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos and sin of each position, from frequencies computed (never loaded) in float32."""

    def __init__(self, config: DenseConfig) -> None:
        super().__init__()
        self.rope_type = config.rope_parameters["rope_type"]
        self.inv_freq = nn.Buffer(inverse_frequencies(config), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)  # no attention scaling for these types


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention; the KV caches and SDPA are :mod:`.kv_attention`'s."""

    is_causal = True

    def __init__(self, config: DenseConfig, family: Family, layer: int) -> None:
        super().__init__()
        self.layer_idx = layer
        self.head_dim = config.head_dim
        heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        self.num_key_value_groups = heads // kv_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = family.window(config, layer)
        self.q_proj = Linear(hidden, heads * self.head_dim, family.qkv_bias)
        self.k_proj = Linear(hidden, kv_heads * self.head_dim, family.qkv_bias)
        self.v_proj = Linear(hidden, kv_heads * self.head_dim, family.qkv_bias)
        self.o_proj = Linear(heads * self.head_dim, hidden, family.o_bias)
        if family.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, hidden: torch.Tensor, position_embeddings, step: kv_attention.StepCaches) -> torch.Tensor:
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden).view(shape)
        key = self.k_proj(hidden).view(shape)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        query = (query * cos) + (rotate_half(query) * sin)
        key = (key * cos) + (rotate_half(key) * sin)
        out, _ = kv_attention.attention(self, query, key, value, None, scaling=self.scaling, shardmesh_step=step)
        return self.o_proj(out.reshape(*hidden.shape[:-1], -1).contiguous())


class MLP(nn.Module):
    def __init__(self, config: DenseConfig, family: Family) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(hidden, inner, family.mlp_bias)
        self.up_proj = Linear(hidden, inner, family.mlp_bias)
        self.down_proj = Linear(inner, hidden, family.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: DenseConfig, family: Family, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, family, layer)
        self.mlp = MLP(config, family)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, *, position_embeddings, shardmesh_step, **_ignored) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), position_embeddings, shardmesh_step)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DenseStageModule(nn.Module):
    """Blocks ``[start, end)``, the embeddings on the first stage, the final norm and LM
    head on the last: the same attributes as :class:`.hf_blocks.StageModule`."""

    def __init__(self, config: DenseConfig, start: int, end: int) -> None:
        super().__init__()
        family = family_of(config)
        total = config.num_hidden_layers
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size) if start == 0 else None
        self.layers = nn.ModuleList(Block(config, family, i) for i in range(start, end))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if end == total else None
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False) if end == total else None
        self.rotary_emb: nn.Module | None = None  # built on the real device, see make_rotary

    @staticmethod
    def make_rotary(config: DenseConfig) -> nn.Module:
        return Rotary(config)
