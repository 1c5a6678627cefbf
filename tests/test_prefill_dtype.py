"""Prefill in float32, decode in the stage's 16-bit dtype (backends/torch/prefill_dtype.py):
within bfloat16's own error of the float32 model for every tiny architecture, and
chosen only where bfloat16 is emulated."""

from __future__ import annotations

import statistics

import pytest
import torch

from shardmesh.backends.torch.prefill_dtype import PREFILL_PHASE_TOKENS, Upcast, cpu_has_native_bf16, pick_prefill_dtype
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.torch.tensors import raw_from_tensor, tensor_from_raw
from shardmesh.backends.weights import resolve_local
from shardmesh.contract import StepRequest
from shardmesh.tools.tiny_model import ARCHS, cached_tiny_model

LAYERS = 4
PROMPT = [(7 * i + 3) % 180 + 3 for i in range(40)]
CPU = torch.device("cpu")


def chain(arch: str, dtype: str, prefill_dtype: str = "auto") -> list[TorchStage]:
    path = resolve_local(str(cached_tiny_model(arch, layers=LAYERS, hidden=64)))
    stages = [TorchStage(path, a, b, dtype=dtype, prefill_dtype=prefill_dtype) for a, b in ((0, 2), (2, LAYERS))]
    for stage in stages:
        stage.open("s", 128)
    return stages


def logits(stages: list[TorchStage], ids: list[int], position: int) -> torch.Tensor:
    x = raw_from_tensor(torch.tensor(ids))
    for stage in stages:
        [x] = stage.step([StepRequest("s", x, position)])
    return tensor_from_raw(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_float32_prefill_stays_within_bfloat16s_error_of_the_float32_model(arch: str) -> None:
    """The prefill's logits are at least as close to the float32 model's as bfloat16's
    own; over the decode steps after it (bfloat16 in both) the typical error stays
    bfloat16's. A MoE router may pick another expert now and then on either path, so
    single steps are not compared, the median is."""
    exact, plain, mixed = chain(arch, "float32"), chain(arch, "bfloat16"), chain(arch, "bfloat16", "float32")
    assert mixed[0].prefill_dtype == torch.float32 and plain[0].prefill_dtype == torch.bfloat16
    ids, position = PROMPT, 0
    errors: list[tuple[float, float]] = []
    for step in range(10):  # the prefill, then decode steps
        want = logits(exact, ids, position)
        got_plain, got_mixed = logits(plain, ids, position), logits(mixed, ids, position)
        errors.append((float((got_plain - want).abs().max()), float((got_mixed - want).abs().max())))
        if step == 0:
            assert not torch.equal(got_mixed, got_plain)  # the prefill really ran in float32
        position += len(ids)
        ids = [int(want.argmax())]
    plain_errors, mixed_errors = zip(*errors)
    assert mixed_errors[0] <= plain_errors[0], errors
    assert statistics.median(mixed_errors) <= 1.5 * statistics.median(plain_errors), errors
    # What the prefill cached is in the stage's dtype: decode reads it as it reads its own.
    assert all(k.dtype == torch.bfloat16 for stage in mixed for k in stage.sessions["s"].keys)


def test_short_steps_keep_the_stage_dtype() -> None:
    short = PROMPT[: PREFILL_PHASE_TOKENS - 1]
    plain, mixed = chain("llama", "bfloat16"), chain("llama", "bfloat16", "float32")
    assert torch.equal(logits(plain, short, 0), logits(mixed, short, 0))


def test_the_dtype_is_float32_only_for_16_bit_stages_on_cpus_without_native_bf16(tmp_path, monkeypatch) -> None:
    import shardmesh.backends.torch.prefill_dtype as module

    avx2, amx, arm = tmp_path / "avx2", tmp_path / "amx", tmp_path / "arm"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert not cpu_has_native_bf16(avx2) and cpu_has_native_bf16(amx) and cpu_has_native_bf16(arm)
    assert cpu_has_native_bf16(tmp_path / "missing")  # unknown: keep the weights' dtype

    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: False)
    assert pick_prefill_dtype("auto", torch.bfloat16, CPU, dtype_forced=False) == torch.float32
    assert pick_prefill_dtype("auto", torch.float16, CPU, dtype_forced=False) == torch.float32
    assert pick_prefill_dtype("auto", torch.bfloat16, CPU, dtype_forced=True) == torch.bfloat16  # --dtype decides
    assert pick_prefill_dtype("auto", torch.float32, CPU, dtype_forced=False) == torch.float32
    assert pick_prefill_dtype("auto", torch.bfloat16, torch.device("cuda"), dtype_forced=False) == torch.bfloat16
    assert pick_prefill_dtype("bfloat16", torch.float32, CPU, dtype_forced=False) == torch.bfloat16
    monkeypatch.setattr(module, "cpu_has_native_bf16", lambda: True)
    assert pick_prefill_dtype("auto", torch.bfloat16, CPU, dtype_forced=False) == torch.bfloat16


def test_every_layer_is_upcast_into_the_same_buffers() -> None:
    [stage] = [TorchStage(resolve_local(str(cached_tiny_model("llama", layers=LAYERS, hidden=64))), 0, LAYERS, dtype="bfloat16")]
    upcast = Upcast(torch.float32)
    first = upcast.params(stage.module.layers[0])
    first_ids = {name: id(t) for name, t in first.items()}
    second = upcast.params(stage.module.layers[1])
    assert {name: id(t) for name, t in second.items()} == first_ids
    for name, param in stage.module.layers[1].named_parameters():
        assert second[name].dtype == torch.float32 and torch.equal(second[name], param.float())
