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

import errno
import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .tiny_build import build_model, build_tiny_model, default_shard_size, save_tokenizer
from .tiny_config import (
    ARCHS,
    EXPERTS_PER_TOKEN,
    INITIALIZER_RANGE,
    MOE_ARCHS,
    NUM_EXPERTS,
    TIED_ARCHS,
    TinyDims,
    default_heads,
    default_intermediate,
    default_kv_heads,
    legacy_config_keys,
    make_config,
    resolve_dims,
)
from .tiny_tokenizer import train_tokenizer

# The builders are re-exported: tests, benches and the CLI import them from here.
__all__ = [
    "ARCHS",
    "EXPERTS_PER_TOKEN",
    "INITIALIZER_RANGE",
    "MOE_ARCHS",
    "NUM_EXPERTS",
    "TIED_ARCHS",
    "TinyDims",
    "build_model",
    "build_tiny_model",
    "cache_key",
    "cache_root",
    "cached_tiny_model",
    "code_version",
    "default_heads",
    "default_intermediate",
    "default_kv_heads",
    "default_shard_size",
    "legacy_config_keys",
    "make_config",
    "resolve_dims",
    "save_tokenizer",
    "train_tokenizer",
]

#: The modules whose source decides the bytes of a build (see :func:`code_version`).
BUILD_SOURCES = ("tiny_model.py", "tiny_config.py", "tiny_build.py", "tiny_tokenizer.py")


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

    Editing one of :data:`BUILD_SOURCES` or upgrading torch (its RNG streams),
    transformers (its init and file layout) or tokenizers (its trainer) starts a fresh
    cache entry.
    """
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    for name in BUILD_SOURCES:
        h.update(Path(__file__).with_name(name).read_bytes())
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
