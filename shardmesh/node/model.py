"""What a node knows about its model before it loads any weights.

The config, the tokenizer and the weight index come from the model's folder (or only
those small files from the hub). A gateway that serves no blocks needs nothing more, so
nothing here imports torch: the configs are read as JSON, and the tokenizer is
``api/tokenizer.py``'s, over the ``tokenizers`` library (importing transformers would
load torch). Only a folder that tokenizer cannot read (no ``tokenizer.json``, remote
tokenizer code) falls back to transformers' ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.tokenizer import load_tokenizer
from ..backends.weights import ModelFiles, ModelSourceError, identity_bytes, resolve
from ..mesh.record_keys import model_identity
from .config import NodeConfig

DEFAULT_CONTEXT = 2048  # when config.json names no max_position_embeddings


@dataclass(frozen=True)
class ModelConfig:
    """The fields of ``config.json`` a node reads, from the language model's part of it
    (multimodal configs nest that under ``text_config``)."""

    num_hidden_layers: int
    hidden_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    vocab_size: int | None


@dataclass(frozen=True)
class GenerationDefaults:
    """What a node reads of ``generation_config.json``: the ids that end an answer."""

    eos_token_id: int | list[int] | None


@dataclass
class LoadedModel:
    """The model's files, tokenizer and configs, once the small files are local."""

    name: str
    files: ModelFiles
    tokenizer: Any  # api.tokenizer.Tokenizer, or a transformers tokenizer (the fallback)
    config: ModelConfig
    generation_config: GenerationDefaults | None

    @property
    def total_blocks(self) -> int:
        return self.config.num_hidden_layers

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size


def model_name(files: ModelFiles) -> str:
    """The id clients use: the hub id, or the folder's name for a local model."""
    return files.hub[0] if files.hub else files.root.resolve().name


def text_part(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a ``config.json`` (multimodal configs nest it)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def read_model_config(folder: Path) -> ModelConfig:
    """``config.json``'s language-model fields.

    A missing ``tie_word_embeddings`` means tied: transformers leaves out of config.json
    the values equal to its base default, which is True.
    """
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = text_part(config)
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    return ModelConfig(
        num_hidden_layers=int(text["num_hidden_layers"]),
        hidden_size=int(text["hidden_size"]),
        max_position_embeddings=int(text.get("max_position_embeddings") or DEFAULT_CONTEXT),
        tie_word_embeddings=bool(tied),
        vocab_size=int(text["vocab_size"]) if text.get("vocab_size") is not None else None,
    )


def read_generation_defaults(folder: Path) -> GenerationDefaults | None:
    """``generation_config.json``'s end-of-answer ids; None when the model has no such file."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    return GenerationDefaults(eos_token_id=json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))


def read_tokenizer(folder: Path) -> Any:
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        from transformers import AutoTokenizer  # loads torch: only for folders ours cannot read

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer


def load_model_meta(config: NodeConfig) -> LoadedModel:
    """Config, tokenizer and weight index; no weights yet (may download small files)."""
    assert config.model is not None, "a node without --model serves no model of its own (open_gateway.py)"
    return loaded_model(resolve(config.model, config.revision))


def loaded_model(files: ModelFiles) -> LoadedModel:
    """What a node knows of the model whose small files are ``files``."""
    return LoadedModel(
        name=model_name(files),
        files=files,
        tokenizer=read_tokenizer(files.root),
        config=read_model_config(files.root),
        generation_config=read_generation_defaults(files.root),
    )


def files_of(model_id: str, local: tuple[str, ...] = (), revision: str | None = None) -> ModelFiles:
    """The small files of the model the swarm calls ``model_id`` (``name@hash``): the
    first of ``local`` (folders or hub ids the user named) whose identity is exactly
    that, else the hub id before the ``@``. A source with that name but other weights is
    passed over, never served under the swarm's name; none left is a
    :class:`ModelSourceError` that says what was tried. For a gateway of a model it has
    not seen (open_gateway.py)."""
    tried = []
    for source in (*local, model_id.rsplit("@", 1)[0]):
        try:
            files = resolve(source, revision)
        except ModelSourceError as exc:
            tried.append(f"{source}: {exc}")
            continue
        found = model_identity(model_name(files), *identity_bytes(files))
        if found == model_id:
            return files
        tried.append(f"{source}: is {found}")
    raise ModelSourceError(f"no source of {model_id} ({'; '.join(tried)})")
