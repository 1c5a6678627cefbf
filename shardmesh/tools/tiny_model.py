"""Tiny random-weight causal LMs in Hugging Face layout, for tests and offline demos.

A tiny model here is a real checkpoint folder, laid out the way hub models are:

* ``config.json``: written by transformers, then patched with the older key spellings
  that other loaders (mlx-lm, transformers 4.x) still read. transformers 5 nests the
  rope base under ``rope_parameters``; hub checkpoints and mlx-lm use ``rope_theta``,
  and a loader that misses it falls back to its own default base and runs *silently
  wrong* (seen with mlx-lm and Qwen2). So both spellings are written.
* several ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json``, so loaders that read one layer range only, through
  the index's ``weight_map``, are exercised even by a 1 MB model;
* ``generation_config.json`` and a byte-level BPE tokenizer with a ChatML chat
  template, trained here on text generated here.

Nothing is ever downloaded: the weights come from a seeded random init and the
tokenizer from a deterministic corpus, so the same arguments give byte-identical files.

Two choices make random weights behave like a usable model in tests:

* ``initializer_range`` is large (0.1 rather than the usual 0.02), so logits are spread
  wide and the top-1 token usually wins by a clear margin: greedy decoding repeats
  exactly, chained pipeline stages can be compared token for token, and bfloat16 picks
  the same next token as float32 at ~95% of steps. (A 24-token bfloat16 continuation can
  still part from the float32 one after a near tie: compare bf16 with bf16.) Smaller
  inits make the output one token repeated; larger ones make bf16 diverge sooner.
* biases are random rather than zero and norm weights near one rather than exactly
  one, so a loader that forgets to load one produces different outputs and a test
  catches it.

Use :func:`cached_tiny_model` in tests: it builds each distinct model once per machine
and is safe under ``pytest -n auto``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .tiny_tokenizer import train_tokenizer

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

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

# See the module docstring: wide logits make greedy decoding reproducible and mostly
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


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """Save, naming the class by its transformers 4 name so older loaders can read it.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, a name that
    transformers 4 (which mlx-lm may run under on a Mac) does not know; 5 reads the old
    name as well.
    """
    tokenizer.save_pretrained(path)
    _update_json(path / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast"})



# --------------------------------------------------------------------------- model


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


def _update_json(path: Path, updates: dict[str, Any]) -> None:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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


# --------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """Where :func:`cached_tiny_model` keeps its builds.

    ``$SHARDMESH_TINY_CACHE`` if set; else ``<repo>/.cache/tiny-models`` when running
    from a checkout (git-ignored, and wiped with the checkout); else
    ``~/.cache/shardmesh/tiny-models``.
    """
    if env := os.environ.get("SHARDMESH_TINY_CACHE"):
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "shardmesh" / "__init__.py").is_file():
        return repo / ".cache" / "tiny-models"
    return Path.home() / ".cache" / "shardmesh" / "tiny-models"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of what decides the bytes of a build: our code and the library versions.

    Editing this module or tiny_tokenizer.py or upgrading torch (its RNG streams), transformers (its init and
    file layout) or tokenizers (its trainer) starts a fresh cache entry.
    """
    import tokenizers
    import transformers

    h = hashlib.sha256()
    for source in (Path(__file__), Path(__file__).with_name("tiny_tokenizer.py")):
        h.update(source.read_bytes())
    for version in (torch.__version__, transformers.__version__, tokenizers.__version__):
        h.update(b"\0" + version.encode())
    return h.hexdigest()


def cache_key(arch: str, kwargs: dict[str, Any]) -> str:
    """The directory name of one build: arch plus a hash of everything that shapes it."""
    blob = json.dumps({"arch": arch, "kwargs": kwargs, "code": code_version()}, sort_keys=True, default=repr)
    return f"{arch}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _canonical_kwargs(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of :func:`build_tiny_model`, defaults filled in.

    So ``cached_tiny_model("llama")`` and ``cached_tiny_model("llama", layers=4)`` share
    one folder, and a misspelt argument fails here, before any work.
    """
    bound = inspect.signature(build_tiny_model).bind(None, arch, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in ("path", "arch")}


def cached_tiny_model(arch: str = "llama", **kwargs: Any) -> Path:
    """:func:`build_tiny_model` once per distinct arguments; later calls return the folder.

    Each caller builds into its own temporary folder and renames it into place. A rename
    is atomic, so a folder under its final name is always complete; when two pytest-xdist
    workers race, one rename wins and the other discards its identical copy.
    """
    if "path" in kwargs:
        raise TypeError("cached_tiny_model chooses the path itself; use build_tiny_model(path, ...)")
    root = cache_root()
    final = root / cache_key(arch, _canonical_kwargs(arch, kwargs))
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build_tiny_model(staging, arch, **kwargs)
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            os.rename(staging, final)
        except OSError as exc:
            # Renaming onto a non-empty folder fails: another process finished first.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
