"""What a node knows about its model before it loads any weights.

The config, the tokenizer and the weight index come from the model's folder (or only
those small files from the hub). A gateway that serves no blocks needs nothing more,
so nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backends.weights import ModelFiles, resolve
from .config import NodeConfig


@dataclass
class LoadedModel:
    """The model's files, tokenizer and configs, once the small files are local."""

    name: str
    files: ModelFiles
    tokenizer: object
    config: object
    generation_config: object | None

    @property
    def total_blocks(self) -> int:
        return self.config.num_hidden_layers

    @property
    def text_config(self):
        """The language model's own config (multimodal configs nest it)."""
        return self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config

    @property
    def context_length(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 2048))

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)


def model_name(files: ModelFiles) -> str:
    """The id clients use: the hub id, or the folder's name for a local model."""
    return files.hub[0] if files.hub else files.root.resolve().name


def load_model_meta(config: NodeConfig) -> LoadedModel:
    """Config, tokenizer and weight index; no weights yet (may download small files)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    files = resolve(config.model, config.revision)
    try:
        generation_config = GenerationConfig.from_pretrained(files.root)
    except OSError:
        generation_config = None
    return LoadedModel(
        name=model_name(files),
        files=files,
        tokenizer=AutoTokenizer.from_pretrained(files.root),
        config=AutoConfig.from_pretrained(files.root),
        generation_config=generation_config,
    )
