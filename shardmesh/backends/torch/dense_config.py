"""The config of a dense Llama-family model, read from its ``config.json`` alone.

transformers' config classes would do this, but for Llama importing one loads the
modeling machinery (its config module validates types through ``activations``, which
imports ``torch.distributed.tensor`` and sympy): the cost :mod:`.dense_blocks` exists to
avoid. So the few fields the blocks use are read here, with the defaults transformers 5
gives each family when a field is missing (older checkpoints omit ``head_dim``,
``attention_bias``, ``layer_types`` or write ``rope_scaling`` instead of
``rope_parameters``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE = ("default", "linear", "llama3")  # rotary types computed once, here
# The defaults of transformers 5's config classes, for the fields below.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None, "sliding_window": None},
    "mistral": {"max_position_embeddings": 4096 * 32, "num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096, "head_dim": 128},
}


@dataclass(frozen=True)
class DenseConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # None where the model does not slide
    layer_types: tuple[str, ...] | None  # Qwen2/Qwen3: which layers slide
    rope_parameters: dict[str, Any]  # rope_type, rope_theta and the type's own fields
    dtype: str | None  # the checkpoint's, as written


def rope_parameters_of(raw: dict[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` as transformers 5 standardises it (``rope_scaling`` and
    ``rope_theta`` of older configs folded in, ``type`` read as ``rope_type``)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return params


def read_raw(root: Path) -> dict[str, Any]:
    return json.loads((Path(root) / "config.json").read_text())


def is_dense(raw: dict[str, Any]) -> bool:
    """Can :mod:`.dense_blocks` serve this model (else transformers' modules do)?"""
    params = rope_parameters_of(raw)
    return (
        raw.get("model_type") in FAMILIES
        and raw.get("hidden_act", "silu") in ("silu", "swish")
        and params["rope_type"] in STATIC_ROPE
        and params.get("partial_rotary_factor", 1.0) == 1.0
        and not raw.get("text_config")
    )


def dense_config(raw: dict[str, Any]) -> DenseConfig:
    kind = raw["model_type"]
    defaults = _DEFAULTS[kind]
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads", defaults["num_key_value_heads"]) or heads
    window = raw.get("sliding_window", defaults["sliding_window"])
    layer_types = None
    if kind in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False):
            window = None
        types = raw.get("layer_types")
        if types is None:
            first_sliding = raw.get("max_window_layers", 28)
            types = ["sliding_attention" if window is not None and i >= first_sliding else "full_attention"
                     for i in range(raw["num_hidden_layers"])]
        layer_types = tuple(types)
    elif kind == "llama":
        window = None
    return DenseConfig(
        model_type=kind,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=raw.get("head_dim") or defaults.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", defaults["max_position_embeddings"]),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        sliding_window=window,
        layer_types=layer_types,
        rope_parameters=rope_parameters_of(raw),
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
    )
