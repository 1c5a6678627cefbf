"""Our own blocks for the dense Llama family (backends/torch/dense_blocks.py) against
transformers' models: the same logits, bit for bit, for each switch a family turns
(biases, rotary scaling types, sliding windows), and a serving process that never
imports transformers' modeling code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig, Qwen3Config

from shardmesh.backends.torch import dense_blocks, hf_blocks
from shardmesh.backends.torch.dense_blocks import family_of, inverse_frequencies
from shardmesh.backends.torch.dense_config import dense_config, is_dense
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.torch.tensors import raw_from_tensor, tensor_from_raw
from shardmesh.backends.weights import resolve_local
from shardmesh.contract import StepRequest
from shardmesh.tools.tiny_model import cached_tiny_model

PROMPT = [5, 17, 99, 3, 42, 7, 8, 60, 61, 9, 11, 200]
COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, initializer_range=0.1, max_position_embeddings=512,
)


@pytest.mark.parametrize("arch, dense", [("llama", True), ("qwen2", True), ("qwen3", True), ("qwen3_moe", False), ("mixtral", False)])
def test_each_family_takes_its_path(arch, dense):
    path = cached_tiny_model(arch, layers=2, hidden=64)
    stage = TorchStage(resolve_local(str(path)), 0, 2, dtype="float32")
    assert isinstance(stage.module, dense_blocks.DenseStageModule) is dense
    assert isinstance(stage.module, hf_blocks.StageModule) is not dense


def save(config, path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


CONFIGS = {
    "llama with every bias": lambda: LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True),
    "llama, linear rope": lambda: LlamaConfig(**COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3 rope": lambda: LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3 with biases and a head size of its own": lambda: Qwen3Config(**COMMON, head_dim=32, attention_bias=True),
    "mistral, one window for all layers": lambda: MistralConfig(**COMMON, sliding_window=8),
}
@pytest.mark.parametrize("name", list(CONFIGS))
def test_our_blocks_equal_transformers(name, tmp_path):
    config = CONFIGS[name]()
    path = save(config, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stages = [TorchStage(resolve_local(str(path)), a, b, dtype="float32") for a, b in ((0, 1), (1, 4))]
    assert all(isinstance(s.module, dense_blocks.DenseStageModule) for s in stages)
    for stage in stages:
        stage.open("s", 64)
    cache = DynamicCache(config=ref.config)
    ids, position = PROMPT, 0
    for _ in range(12):
        with torch.no_grad():
            expected = ref(torch.tensor([ids]), cache=cache, logits_to_keep=1).logits[0, -1].float()
        x = raw_from_tensor(torch.tensor(ids))
        for stage in stages:
            [x] = stage.step([StepRequest("s", x, position)])
        got = tensor_from_raw(x)
        if "window" in name:  # transformers keeps fewer keys in a sliding layer: float tolerance
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        else:
            assert torch.equal(got, expected), f"max diff {(got - expected).abs().max().item()}"
        position += len(ids)
        ids = [int(expected.argmax())]


def test_what_our_blocks_do_not_cover_goes_to_transformers_modules(tmp_path):
    """Rotary types that rescale at run time or need attention scaling, other
    activations, MoE: built from transformers' modules, and still exact."""
    for config in (
        LlamaConfig(**COMMON, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
        Qwen3Config(**COMMON, head_dim=16, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}),
        LlamaConfig(**COMMON, hidden_act="gelu"),
    ):
        assert not is_dense(config.to_dict()), config
    assert is_dense(LlamaConfig(**COMMON).to_dict())
    path = save(LlamaConfig(**COMMON, hidden_act="gelu"), tmp_path)
    stage = TorchStage(resolve_local(str(path)), 0, 4, dtype="float32")
    assert isinstance(stage.module, hf_blocks.StageModule)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stage.open("s", 32)
    with torch.no_grad():
        expected = ref(torch.tensor([PROMPT]), logits_to_keep=1).logits[0, -1]
    [got] = stage.step([StepRequest("s", raw_from_tensor(torch.tensor(PROMPT)), 0)])
    assert torch.equal(tensor_from_raw(got), expected)


OLD_STYLE = {  # config.json fields as older transformers versions wrote them
    "llama, rope_scaling with 'type'": {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "rope_theta": 50000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0}},
    "llama3 without original_max_position_embeddings": {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
    "qwen2 sliding, no layer_types": {
        "model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
        "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 4},
    "qwen2 window written but not used": {
        "model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 6, "num_attention_heads": 4, "sliding_window": 16, "max_window_layers": 4},
    "qwen3, defaults only": {
        "model_type": "qwen3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4},
    "mistral, defaults only": {
        "model_type": "mistral", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4},
}


@pytest.mark.parametrize("name", list(OLD_STYLE))
def test_our_config_reading_agrees_with_transformers(name, tmp_path):
    """dense_config reads config.json without transformers; each field it fills in
    must be the one transformers' config class settles on."""
    raw = OLD_STYLE[name]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = AutoConfig.from_pretrained(tmp_path)
    ours = dense_config(raw)
    for field in ("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
                  "attention_bias", "mlp_bias"):
        if hasattr(theirs, field):
            assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.rope_parameters["rope_type"] == theirs.rope_parameters["rope_type"]
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]
    model = AutoModelForCausalLM.from_config(theirs)
    with torch.device("cpu"):
        torch.testing.assert_close(inverse_frequencies(ours), model.model.rotary_emb.inv_freq, rtol=0, atol=0)
    for layer in range(ours.num_hidden_layers):
        attention = model.model.layers[layer].self_attn
        transformers_window = getattr(attention, "sliding_window", None) or (
            theirs.sliding_window if ours.model_type == "mistral" else None)
        assert family_of(ours).window(ours, layer) == transformers_window, layer


def test_a_dense_stage_never_imports_transformers_modeling_code():
    """The point of our own blocks: transformers' modeling modules pull in
    torch.distributed.tensor, torch._dynamo and sympy (tens of MB per node)."""
    path = cached_tiny_model("llama", layers=2, hidden=64)
    code = (
        "import sys, torch\n"
        "from shardmesh.backends.torch.stage import TorchStage\n"
        "from shardmesh.backends.torch.tensors import raw_from_tensor\n"
        "from shardmesh.backends.weights import resolve_local\n"
        "from shardmesh.contract import StepRequest\n"
        f"stage = TorchStage(resolve_local({str(path)!r}), 0, 2, dtype='float32')\n"
        "stage.open('s', 16)\n"
        "stage.step([StepRequest('s', raw_from_tensor(torch.tensor([1, 2, 3])), 0)])\n"
        "heavy = ['transformers.modeling_utils', 'sympy', 'torch._dynamo', 'torch.distributed.tensor']\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
