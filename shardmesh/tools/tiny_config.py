"""The tiny models' architectures and sizes: which archs exist and how a config is made.

Pure data and arithmetic, no torch: the CLI reads :data:`ARCHS` for its ``--arch``
choices without loading a tensor library. ``tiny_build.py`` turns a config made here
into weights and files; ``tiny_model.py`` explains the whole and caches the builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds
    from transformers import PreTrainedConfig

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")

# Archs whose output head shares the input embedding matrix, as the small Qwen2 and
# Qwen3 hub checkpoints do. Llama, Mixtral and Qwen3-MoE (like their hub checkpoints)
# keep a separate ``lm_head.weight``, so loaders meet both cases: the last stage of a
# tied model must copy ``embed_tokens.weight`` into its head.
TIED_ARCHS = frozenset({"qwen2", "qwen3"})
MOE_ARCHS = frozenset({"qwen3_moe", "mixtral"})

# Few experts, but more than ``top_k``, so routing really chooses.
NUM_EXPERTS = 4
EXPERTS_PER_TOKEN = 2

# See tiny_model.py's docstring: wide logits make greedy decoding reproducible and mostly
# independent of the dtype, without collapsing into one repeated token.
INITIALIZER_RANGE = 0.1


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class TinyDims:
    """The resolved sizes of one tiny model (defaults filled in and checked)."""

    vocab_size: int
    hidden: int
    layers: int
    intermediate: int  # the MLP width; for MoE archs the width of one expert
    heads: int
    kv_heads: int
    context_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_intermediate(arch: str, hidden: int) -> int:
    """Llama's 8/3 MLP ratio, rounded up to a multiple of 32 (768 -> 2048, 64 -> 192).

    An MoE expert gets half of that: with 4 experts the layer stays small while routing
    still has real choices to make.
    """
    dense = _round_up(hidden * 8 // 3, 32)
    return max(32, dense // 2) if arch in MOE_ARCHS else dense


def default_heads(hidden: int) -> int:
    """Heads of width 16, at least two."""
    return max(2, hidden // 16)


def default_kv_heads(heads: int) -> int:
    """Half as many KV heads as query heads, so grouped-query attention is exercised.

    The largest divisor of ``heads`` not above ``heads // 2`` (at least 1): KV heads must
    divide query heads evenly.
    """
    return next((k for k in range(heads // 2, 0, -1) if heads % k == 0), 1)


def resolve_dims(
    arch: str,
    *,
    layers: int,
    hidden: int,
    tokenizer_size: int,
    vocab_size: int | None,
    intermediate: int | None,
    heads: int | None,
    kv_heads: int | None,
    context_length: int,
) -> TinyDims:
    """Fill in defaults and refuse shapes the model classes would reject later, less clearly."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    heads = heads if heads is not None else default_heads(hidden)
    kv_heads = kv_heads if kv_heads is not None else default_kv_heads(heads)
    if min(layers, hidden, heads, kv_heads, context_length) < 1:
        raise ValueError("layers, hidden, heads, kv_heads and context_length must be positive")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    if heads % kv_heads:
        raise ValueError(f"heads {heads} is not a multiple of kv_heads {kv_heads}")
    # Room for every token the tokenizer can produce, padded to a multiple of 64 as real
    # checkpoints pad their embedding tables.
    vocab = max(_round_up(tokenizer_size, 64), vocab_size or 0)
    return TinyDims(
        vocab_size=vocab,
        hidden=hidden,
        layers=layers,
        intermediate=intermediate if intermediate is not None else default_intermediate(arch, hidden),
        heads=heads,
        kv_heads=kv_heads,
        context_length=context_length,
    )


# --------------------------------------------------------------------------- config


def make_config(arch: str, dims: TinyDims, *, bos_id: int, eos_id: int, pad_id: int) -> PreTrainedConfig:
    """The transformers config of one arch, with the arch's characteristic features on."""
    from transformers import AutoConfig

    common: dict[str, Any] = dict(
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        max_position_embeddings=dims.context_length,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=arch in TIED_ARCHS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if arch != "qwen2":  # Qwen2Config has no head_dim field (it derives hidden // heads)
        common["head_dim"] = dims.head_dim
    if arch == "llama":
        extra: dict[str, Any] = dict(intermediate_size=dims.intermediate)
    elif arch == "qwen2":
        # Qwen2 has q/k/v biases built in. Sliding window off, as the hub's Qwen2
        # checkpoints ship it.
        extra = dict(intermediate_size=dims.intermediate, use_sliding_window=False)
    elif arch == "qwen3":
        extra = dict(intermediate_size=dims.intermediate, use_sliding_window=False)
    elif arch == "qwen3_moe":
        extra = dict(
            # Dense width, used only by layers in mlp_only_layers (none here).
            intermediate_size=default_intermediate("llama", dims.hidden),
            moe_intermediate_size=dims.intermediate,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=EXPERTS_PER_TOKEN,
            decoder_sparse_step=1,  # every layer is sparse
            mlp_only_layers=[],
            norm_topk_prob=True,
            use_sliding_window=False,
        )
    else:  # mixtral
        extra = dict(
            intermediate_size=dims.intermediate,
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=EXPERTS_PER_TOKEN,
        )
    return AutoConfig.for_model(arch, **common, **extra)


def legacy_config_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The pre-transformers-5 spellings of what ``config`` says, for other loaders.

    Hub checkpoints carry these, and mlx-lm reads only these for most archs.
    """
    rope = config.get("rope_parameters") or {}
    legacy: dict[str, Any] = {
        "rope_theta": rope.get("rope_theta", config.get("rope_theta")),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "torch_dtype": "float32",
        "head_dim": config["hidden_size"] // config["num_attention_heads"],
    }
    # A "default" rope is no scaling; anything else is what rope_scaling used to hold.
    if rope.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    else:
        legacy["rope_scaling"] = config.get("rope_scaling")
    experts = config.get("num_local_experts", config.get("num_experts"))
    if experts is not None:
        # Qwen MoE loaders read num_experts, Mixtral loaders num_local_experts.
        legacy["num_experts"] = legacy["num_local_experts"] = experts
        legacy["num_experts_per_tok"] = config["num_experts_per_tok"]
    return legacy
