"""Tiny random-weight models: reproducible, hub-shaped, loadable offline, usable for greedy tests."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shardmesh.tools import tiny_model as tiny
from shardmesh.tools.tiny_model import ARCHS, build_tiny_model, cached_tiny_model

PROMPTS = ("Hello, how are you?", "The node sends a packet", "def add(a, b):")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails the test: everything here is local."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tiny models must not touch the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch) for arch in ARCHS}


def file_hashes(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_same_seed_same_bytes(tmp_path: Path, models: dict[str, Path]) -> None:
    for arch in ("llama", "qwen3_moe"):
        again = file_hashes(build_tiny_model(tmp_path / f"{arch}-again", arch))
        assert again == file_hashes(models[arch])

    other = file_hashes(build_tiny_model(tmp_path / "seed1", "llama", seed=1))
    first = file_hashes(models["llama"])
    shards = [name for name in first if name.endswith(".safetensors")]
    assert all(other[name] != first[name] for name in shards)  # new weights...
    assert other["tokenizer.json"] == first["tokenizer.json"]  # ...same vocabulary


def test_build_leaves_caller_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path / "m", "llama", layers=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_auto_classes(arch: str, models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models[arch]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == arch
    assert model.dtype == torch.float32
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    # Whatever class transformers picks (it forces Qwen2Tokenizer on qwen2), the ids are
    # those of the tokenizer the builder trained.
    reference = tiny.train_tokenizer()
    for text in (*PROMPTS, "Numbers: 1 22 333, ünïcödé 🤖\n\tend"):
        assert tokenizer(text).input_ids == reference(text).input_ids
        assert tokenizer.decode(tokenizer(text).input_ids) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_index_lists_several_shards(arch: str, models: dict[str, Path]) -> None:
    path = models[arch]
    weight_map = read_json(path / "model.safetensors.index.json")["weight_map"]
    shards = set(weight_map.values())
    assert len(shards) >= 3
    on_disk: dict[str, str] = {}
    for shard in shards:
        with safe_open(path / shard, "pt") as f:
            on_disk.update((key, shard) for key in f.keys())
    assert on_disk == weight_map
    assert ("lm_head.weight" in weight_map) == (arch not in tiny.TIED_ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_has_legacy_keys(arch: str, models: dict[str, Path]) -> None:
    config = read_json(models[arch] / "config.json")
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert "rope_scaling" in config and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is (arch in tiny.TIED_ARCHS)
    assert config["head_dim"] == config["hidden_size"] // config["num_attention_heads"] == 16
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["initializer_range"] >= 0.1
    if arch in tiny.MOE_ARCHS:
        assert config["num_experts"] == config["num_local_experts"] == 4
        assert config["num_experts_per_tok"] == 2
    generation = read_json(models[arch] / "generation_config.json")
    assert config["eos_token_id"] in generation["eos_token_id"]
    assert generation["pad_token_id"] == config["pad_token_id"]
    assert generation["bos_token_id"] == config["bos_token_id"]


def test_checkpoint_key_layout(models: dict[str, Path]) -> None:
    """What the layer-range loader must expect on disk (transformers 5.24)."""
    keys = {arch: set(read_json(models[arch] / "model.safetensors.index.json")["weight_map"]) for arch in ARCHS}
    # MoE experts are saved one tensor per expert, in the hub's names, although the
    # model in memory holds fused (experts, 2 * inter, hidden) gate_up_proj tensors.
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.experts.3.{name}.weight" in keys["qwen3_moe"]
    assert "model.layers.0.mlp.gate.weight" in keys["qwen3_moe"]
    for name in ("w1", "w2", "w3"):
        assert f"model.layers.0.block_sparse_moe.experts.3.{name}.weight" in keys["mixtral"]
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys["mixtral"]
    assert not any("gate_up_proj" in k for k in keys["qwen3_moe"] | keys["mixtral"])
    assert "model.layers.0.self_attn.q_proj.bias" in keys["qwen2"]
    assert "model.layers.0.self_attn.q_norm.weight" in keys["qwen3"]


def test_biases_and_norms_are_not_defaults(models: dict[str, Path]) -> None:
    """A loader that skips a bias or a norm must change the outputs."""
    path = models["qwen2"]
    weight_map = read_json(path / "model.safetensors.index.json")["weight_map"]
    for key in ("model.layers.0.self_attn.q_proj.bias", "model.norm.weight"):
        with safe_open(path / weight_map[key], "pt") as f:
            tensor = f.get_tensor(key)
        assert not torch.equal(tensor, torch.zeros_like(tensor))
        assert not torch.equal(tensor, torch.ones_like(tensor))


def test_chat_template(models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["qwen3"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "Again?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    closed = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert closed.endswith("Hi!<|im_end|>\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert ids.count(tokenizer.eos_token_id) == 4  # each <|im_end|> is one token
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_stable(arch: str, models: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(models[arch])
    tokenizer = AutoTokenizer.from_pretrained(models[arch])
    distinct = set()
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        first = model.generate(ids, max_new_tokens=24, do_sample=False)
        second = model.generate(ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(first, second)
        new = first[0, ids.shape[1] :]
        assert int(new.max()) < len(tokenizer)
        distinct.update(new.tolist())
        # Peaked: the best token usually wins clearly, so bf16 and fp32 mostly agree.
        with torch.no_grad():
            logits = model(first).logits[0, ids.shape[1] - 1 : -1]
        top2 = logits.topk(2, dim=-1).values
        assert float((top2[:, 0] - top2[:, 1]).median()) > 0.05
    assert len(distinct) > 3  # not one token repeated forever


def test_padded_vocab_rows_never_win(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "wide", "qwen3", layers=2, vocab_size=1000)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == 1000
    size = len(tiny.train_tokenizer())
    assert torch.count_nonzero(model.get_output_embeddings().weight[size:]) == 0
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=16, do_sample=False)
    assert int(out.max()) < size


def test_default_sizes_and_bad_shapes() -> None:
    dims = tiny.resolve_dims(
        "llama", layers=4, hidden=64, tokenizer_size=700, vocab_size=None,
        intermediate=None, heads=None, kv_heads=None, context_length=2048,
    )
    assert (dims.vocab_size, dims.heads, dims.kv_heads, dims.head_dim, dims.intermediate) == (704, 4, 2, 16, 192)
    assert tiny.default_intermediate("llama", 768) == 2048
    assert tiny.default_intermediate("mixtral", 64) == 96
    assert tiny.default_kv_heads(6) == 3 and tiny.default_kv_heads(5) == 1
    with pytest.raises(ValueError):
        build_tiny_model("/nonexistent/never-written", "gpt2")
    with pytest.raises(ValueError):
        build_tiny_model("/nonexistent/never-written", "llama", hidden=64, heads=5)


def test_cached_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDMESH_TINY_CACHE", str(tmp_path))
    path = cached_tiny_model("mixtral", layers=2)
    assert path.parent == tmp_path
    stamp = (path / "config.json").stat().st_mtime_ns
    assert cached_tiny_model("mixtral", hidden=64, layers=2) == path  # defaults spelt out
    assert (path / "config.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert cached_tiny_model("mixtral", layers=3) != path
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    with pytest.raises(TypeError):
        cached_tiny_model("llama", path=tmp_path)
    with pytest.raises(TypeError):
        cached_tiny_model("llama", layer=3)
