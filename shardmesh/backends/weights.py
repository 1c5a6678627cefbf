"""Where a model's files come from, and reading only the tensors a span needs.

``--model`` is either a local folder in Hugging Face layout or a hub id such as
``Qwen/Qwen3-0.6B``. For a hub id we fetch the config and tokenizer, then only the
safetensors shards that hold the span's tensors (a node serving blocks 10..20 of a 70 GB
model downloads a few GB, not all of it). Everything is read back from the standard hub
cache, so a second start is offline.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from safetensors import safe_open

# Files a node needs whatever span it serves: configuration and the tokenizer (the
# gateway holds the tokenizer even when it holds no weights).
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_SAFETENSORS_HEADER = 100 << 20  # a real header (a table of tensor names and offsets) is far smaller

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ModelSourceError(Exception):
    """The model cannot be found or fetched; the message says what to do instead."""


@dataclass
class ModelFiles:
    """A model folder on disk, possibly only partly downloaded."""

    root: Path
    weight_map: dict[str, str]  # tensor name -> file name inside root
    hub: tuple[str, str | None] | None = None  # (repo id, revision) when fetched from the hub
    reads: list[str] = field(default_factory=list)  # tensor names read so far, in order

    def files_for(self, names: Iterable[str]) -> set[str]:
        return {self.weight_map[n] for n in names}

    def read(self, names: Iterable[str]) -> dict:
        """Read exactly these tensors (as torch tensors), opening each shard once."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file_name, file_names in by_file.items():
            with safe_open(self.root / file_name, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name)
                    self.reads.append(name)
        return out


def block_of(tensor_name: str) -> int | None:
    """The transformer block a checkpoint tensor belongs to, or None for non-block ones."""
    m = _LAYER_KEY.search(tensor_name)
    return int(m.group(1)) if m else None


def is_embedding(tensor_name: str) -> bool:
    return tensor_name.endswith("embed_tokens.weight")


def is_head(tensor_name: str) -> bool:
    """Final norm and LM head: what the last stage holds besides its blocks."""
    return tensor_name.startswith("lm_head.") or (
        block_of(tensor_name) is None and re.search(r"(^|\.)norm\.", tensor_name) is not None
    )


def span_tensor_names(
    weight_map: dict[str, str], start: int, end: int, total_blocks: int, tied_embeddings: bool
) -> list[str]:
    """Checkpoint tensors that serving blocks ``[start, end)`` needs."""
    first, last = start == 0, end == total_blocks
    wanted = []
    for name in weight_map:
        block = block_of(name)
        if block is not None:
            if start <= block < end:
                wanted.append(name)
        elif is_embedding(name):
            if first or (last and tied_embeddings and "lm_head.weight" not in weight_map):
                wanted.append(name)
        elif is_head(name):
            if last:
                wanted.append(name)
    return sorted(wanted)


def _weight_map_of(root: Path) -> dict[str, str]:
    index = root / INDEX_FILE
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = root / SINGLE_FILE
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}
    raise ModelSourceError(f"{root} has no {INDEX_FILE} or {SINGLE_FILE}: only safetensors checkpoints are supported")


def looks_like_hub_id(model: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", model)) and not Path(model).exists()


def resolve_local(model: str) -> ModelFiles:
    root = Path(model).expanduser()
    if not (root / "config.json").exists():
        raise ModelSourceError(f"{root} is not a model folder (no config.json)")
    return ModelFiles(root=root, weight_map=_weight_map_of(root))


def _offline_hint(model: str) -> str:
    return (
        f"cannot fetch {model!r} from the Hugging Face hub (offline, or the hub is unreachable) "
        "and it is not in the local cache. Point --model at a local folder in Hugging Face layout, "
        "or for an offline smoke run: `shardmesh tiny-model /tmp/tiny && shardmesh run --model /tmp/tiny`."
    )


def _hub_download(repo_id: str, filename: str, revision: str | None, required: bool) -> Path | None:
    """One file through the hub cache (progress bar included); None if optional and absent."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except GatedRepoError:
        raise ModelSourceError(
            f"{repo_id} is gated: accept its licence on the Hugging Face hub, then set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(f"{repo_id!r} is not a model on the Hugging Face hub (or it is private)") from None
    except RevisionNotFoundError:
        raise ModelSourceError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError as exc:  # offline (or hub unreachable) and not cached
        if not required:
            return None
        raise ModelSourceError(_offline_hint(repo_id)) from exc
    except EntryNotFoundError:
        if required:
            raise ModelSourceError(f"{repo_id} has no {filename}") from None
        return None
    except OSError as exc:  # an HTTP error other than "not found", a full disk, ...
        raise ModelSourceError(f"fetching {filename} of {repo_id} failed: {exc}") from exc


def resolve_hub(repo_id: str, revision: str | None = None) -> ModelFiles:
    """Fetch config, tokenizer and the weight index of a hub model (no weights yet).

    Every later file comes from the commit the config came from, so a branch that moves
    while a node starts cannot mix files of two commits.
    """
    config = _hub_download(repo_id, "config.json", revision, required=True)
    assert config is not None
    root = config.parent  # <cache>/models--org--name/snapshots/<commit>
    commit = root.name
    for name in SMALL_FILES[1:]:
        _hub_download(repo_id, name, commit, required=False)
    if _hub_download(repo_id, INDEX_FILE, commit, required=False) is None:
        # A single-file checkpoint: whatever the span, that one file holds its tensors.
        _hub_download(repo_id, SINGLE_FILE, commit, required=True)
    return ModelFiles(root=root, weight_map=_weight_map_of(root), hub=(repo_id, commit))


def ensure_span_files(files: ModelFiles, names: Iterable[str]) -> None:
    """Download the shards that hold ``names`` (hub models); a local folder must have them."""
    for file_name in sorted(files.files_for(names)):
        if (files.root / file_name).exists():
            continue
        if files.hub is None:
            raise ModelSourceError(f"{files.root / file_name} is missing")
        _hub_download(files.hub[0], file_name, files.hub[1], required=True)


def resolve(model: str, revision: str | None = None) -> ModelFiles:
    """A local folder, or a hub id fetched (config + tokenizer + index) into the hub cache."""
    if Path(model).expanduser().exists():
        return resolve_local(model)
    if looks_like_hub_id(model):
        return resolve_hub(model, revision)
    raise ModelSourceError(f"{model!r} is neither a local folder nor a hub id like 'Qwen/Qwen3-0.6B'")


def identity_bytes(files: ModelFiles) -> tuple[bytes, bytes]:
    """What names these exact weights: ``config.json`` and the weight index (for a
    single-file checkpoint, its safetensors header, which lists every tensor's dtype,
    shape and offsets). Nodes chain together only when these match byte for byte."""
    config = (files.root / "config.json").read_bytes()
    index = files.root / INDEX_FILE
    if index.exists():
        return config, index.read_bytes()
    return config, safetensors_header(files.root / SINGLE_FILE)


def safetensors_header(path: Path) -> bytes:
    """A safetensors file's JSON header as stored (its first 8 bytes give the length,
    little-endian); at most ``MAX_SAFETENSORS_HEADER`` bytes of it are read."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(min(length, MAX_SAFETENSORS_HEADER))
