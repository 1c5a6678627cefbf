"""Model sources: a local folder, and a hub id read from a folder laid out like the hub cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.backends.weights import ModelSourceError, resolve, span_tensor_names

LAYERS = 6
REPO = "tinyorg/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(tmp_path: Path, model: Path, keep_shards: set[str]) -> Path:
    """Lay ``model`` out as huggingface_hub's cache does, keeping only some shards."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in model.iterdir():
        if f.suffix == ".safetensors" and f.name not in keep_shards:
            continue
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return cache


def run_py(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_local_folder_lists_its_shards():
    files = resolve(str(cached_tiny_model("llama", layers=LAYERS, hidden=64)))
    assert len(set(files.weight_map.values())) >= 3


def test_hub_layout_serves_a_span_with_only_its_shards(tmp_path):
    model = cached_tiny_model("llama", layers=LAYERS, hidden=64)
    weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {weight_map[n] for n in span_tensor_names(weight_map, 0, 2, LAYERS, tied_embeddings=False)}
    assert needed != set(weight_map.values()), "the test needs a span that skips some shards"
    cache = hub_cache_with(tmp_path, model, keep_shards=needed)

    code = f"""
from shardmesh.backends.weights import resolve
from shardmesh.backends.torch.stage import TorchStage
files = resolve({REPO!r})
assert files.hub == ({REPO!r}, {COMMIT!r}), files.hub
stage = TorchStage(files, 0, 2)
print("OK", stage.info.start, stage.info.end, len(set(files.weight_map[n] for n in files.reads)))
"""
    result = run_py(code, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"OK 0 2 {len(needed)}" in result.stdout

    # The other end of the model needs shards that are not cached: offline, that is a
    # clear error naming what to do, not a traceback from deep inside the hub client.
    code = f"""
from shardmesh.backends.weights import resolve, ModelSourceError
from shardmesh.backends.torch.stage import TorchStage
try:
    TorchStage(resolve({REPO!r}), 2, {LAYERS})
except ModelSourceError as exc:
    print("REFUSED", exc)
"""
    result = run_py(code, cache)
    assert "REFUSED" in result.stdout, result.stderr[-3000:]
    assert "--model" in result.stdout and "tiny-model" in result.stdout


def test_unknown_hub_model_offline_says_what_to_do(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "shardmesh", "run", "--model", "nobody/no-such-model", "--api", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--model" in result.stderr and "shardmesh tiny-model" in result.stderr
    assert "Traceback" not in result.stderr


def test_not_a_model():
    with pytest.raises(ModelSourceError):
        resolve("/definitely/not/here")


def test_hub_layout_single_file_checkpoint(tmp_path):
    """Many hub models (Qwen3-0.6B among them) ship one model.safetensors and no index."""
    model = cached_tiny_model("qwen3", layers=LAYERS, hidden=64, max_shard_size="1GB")
    assert (model / "model.safetensors").exists() and not (model / "model.safetensors.index.json").exists()
    cache = hub_cache_with(tmp_path, model, keep_shards={"model.safetensors"})
    code = f"""
from shardmesh.backends.weights import resolve
from shardmesh.backends.torch.stage import TorchStage
stage = TorchStage(resolve({REPO!r}), 2, {LAYERS})
print("OK", stage.info.start, stage.info.end, stage.info.is_last)
"""
    result = run_py(code, cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"OK 2 {LAYERS} True" in result.stdout
