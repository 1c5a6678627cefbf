"""Writing one tiny model: random weights from a seed, then the checkpoint folder.

:func:`build_tiny_model` trains the tokenizer (``tiny_tokenizer.py``), sizes the model
(``tiny_config.py``), draws its weights and writes config, shards, index, generation
config and tokenizer the way hub checkpoints lay them out. Why the weights are drawn
the way they are is told in ``tiny_model.py``'s docstring.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .tiny_config import INITIALIZER_RANGE, TinyDims, legacy_config_keys, make_config, resolve_dims
from .tiny_tokenizer import train_tokenizer

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds
    from transformers import PreTrainedModel, PreTrainedTokenizerFast


# --------------------------------------------------------------------------- weights


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (which ``from_config`` draws from) without leaking it.

    ``fork_rng`` restores the caller's RNG state afterwards, so building a model in a
    test does not change what later random draws in that test produce.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


@torch.no_grad()
def _move_off_defaults(model: torch.nn.Module, std: float) -> None:
    """Make biases and norm weights random: a loader that skips them must fail a test.

    transformers initialises biases to zero and norm weights to one; a loader that
    forgot to load them would then still produce the right outputs.
    """
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, std)
        elif _is_norm(name):
            param.uniform_(0.8, 1.2)


@torch.no_grad()
def _silence_padded_rows(model: PreTrainedModel, tokenizer_size: int) -> None:
    """Zero the output rows of ids the tokenizer cannot produce.

    The embedding table is padded past the tokenizer (to a multiple of 64, or to a
    requested ``vocab_size``). A padded id decodes to nothing; with a zero row its logit
    is 0 while the best real token's is clearly positive, so greedy decoding never
    picks one. (Tied archs share the row with the embedding; no prompt uses it.)
    """
    model.get_output_embeddings().weight[tokenizer_size:].zero_()


def build_model(
    arch: str, dims: TinyDims, *, seed: int, tokenizer_size: int, token_ids: dict[str, int]
) -> PreTrainedModel:
    """The random-weight ``...ForCausalLM`` in float32 and eval mode."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = make_config(arch, dims, **token_ids)
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _move_off_defaults(model, INITIALIZER_RANGE)
    _silence_padded_rows(model, tokenizer_size)
    # Qwen's chat models stop at either <|im_end|> or <|endoftext|>; the config keeps
    # one id and the generation config both, so callers meet the list form real models use.
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos_id"],
        eos_token_id=[token_ids["eos_id"], token_ids["pad_id"]],
        pad_token_id=token_ids["pad_id"],
    )
    return model.eval()


def default_shard_size(model: torch.nn.Module) -> int:
    """A quarter of the checkpoint, so even a 1 MB model is split into several shards."""
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return max(1, total // 4)


# --------------------------------------------------------------------------- files


def _update_json(path: Path, updates: dict[str, Any]) -> None:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """Save, naming the class by its transformers 4 name so older loaders can read it.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, a name that
    transformers 4 (which mlx-lm may run under on a Mac) does not know; 5 reads the old
    name as well.
    """
    tokenizer.save_pretrained(path)
    _update_json(path / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})


def _patch_config_json(path: Path) -> None:
    config_path = path / "config.json"
    _update_json(config_path, legacy_config_keys(json.loads(config_path.read_text())))


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bar, then restore the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
    vocab_size: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    max_shard_size: str | None = None,
    context_length: int = 2048,
) -> Path:
    """Write a random-weight causal LM of ``arch`` to ``path`` and return ``path``.

    Defaults give a ~1 MB float32 model (vocab 768, 4 layers, hidden 64, 4 heads of 16,
    2 KV heads). Sizes left as None are derived: ``intermediate`` from Llama's 8/3
    ratio (half that per expert for MoE archs), ``heads`` as ``hidden // 16`` (heads of
    width 16; pass ``heads`` for hub-like widths, e.g. 12 for hidden 768), ``kv_heads``
    as half of ``heads``. ``vocab_size`` only ever enlarges the embedding
    past the tokenizer. ``max_shard_size`` (e.g. ``"200KB"``) defaults to a quarter of
    the checkpoint, giving four or more shards.

    Same arguments, same bytes: the weights come from ``seed``; the tokenizer is the same
    for every tiny model (ids mean the same thing across seeds and archs).
    """
    path = Path(path)
    tokenizer = train_tokenizer(model_max_length=context_length)
    tokenizer_size = len(tokenizer)
    dims = resolve_dims(
        arch,
        layers=layers,
        hidden=hidden,
        tokenizer_size=tokenizer_size,
        vocab_size=vocab_size,
        intermediate=intermediate,
        heads=heads,
        kv_heads=kv_heads,
        context_length=context_length,
    )
    token_ids = {
        "bos_id": tokenizer.bos_token_id,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": tokenizer.pad_token_id,
    }
    model = build_model(arch, dims, seed=seed, tokenizer_size=tokenizer_size, token_ids=token_ids)
    path.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():
        model.save_pretrained(path, max_shard_size=max_shard_size or default_shard_size(model))
    _patch_config_json(path)
    save_tokenizer(tokenizer, path)
    return path
