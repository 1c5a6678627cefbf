"""The one-block throughput benchmark and its on-disk cache."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shardmesh.backends.torch import throughput
from shardmesh.contract import StepRequest
from shardmesh.backends.torch.throughput import (
    cached_block_throughput,
    default_cache_dir,
    measure_block_throughput,
    throughput_cache_key,
)
from shardmesh.tools.tiny_model import cached_tiny_model
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.torch.tensors import raw_from_tensor, tensor_from_raw
from shardmesh.backends.weights import resolve_local

KEY = throughput_cache_key("tiny-llama", "cpu", "float32")


def make_stage(start: int = 0, end: int | None = None, arch: str = "llama") -> TorchStage:
    return TorchStage(resolve_local(str(cached_tiny_model(arch))), start, end, dtype="float32", device="cpu")


@pytest.mark.parametrize(("arch", "start", "end", "warmup"), [("llama", 0, 4, 2), ("llama", 1, 3, 0), ("qwen3_moe", 2, 4, 1)])
def test_measures_a_positive_finite_rate(arch, start, end, warmup):
    rate = measure_block_throughput(make_stage(start, end, arch), steps=3, warmup=warmup)
    assert rate > 0 and math.isfinite(rate)


def test_rejects_no_steps():
    with pytest.raises(ValueError):
        measure_block_throughput(make_stage(), steps=0)


def test_open_session_is_untouched():
    measured, untouched = make_stage(), make_stage()
    prompt = raw_from_tensor(torch.tensor([5, 17, 99, 3]))
    for stage in (measured, untouched):
        stage.open("s", 32)
        stage.step([StepRequest("s", prompt, 0)])
    used_before = measured.cache_bytes_used

    measure_block_throughput(measured)

    assert list(measured.sessions) == ["s"]  # no benchmark session left behind
    assert measured.sessions["s"].length == 4
    assert measured.cache_bytes_used == used_before
    # The session's next step gives exactly what a stage that never benchmarked gives.
    nxt = raw_from_tensor(torch.tensor([42]))
    [got] = measured.step([StepRequest("s", nxt, 4)])
    [want] = untouched.step([StepRequest("s", nxt, 4)])
    assert torch.equal(tensor_from_raw(got), tensor_from_raw(want))


@pytest.fixture
def counted(monkeypatch):
    """Counts real measurements made through the cache."""
    calls: list[int] = []
    real = throughput.measure_block_throughput

    def counting(stage, **kwargs):
        calls.append(1)
        return real(stage, **kwargs)

    monkeypatch.setattr(throughput, "measure_block_throughput", counting)
    return calls


def test_cache_is_written_then_reused(tmp_path, counted):
    stage = make_stage()
    first = cached_block_throughput(stage, tmp_path, KEY)
    assert json.loads((tmp_path / "throughput.json").read_text()) == {KEY: first}
    assert cached_block_throughput(stage, tmp_path, KEY) == first
    assert len(counted) == 1
    assert not [p for p in tmp_path.iterdir() if p.name != "throughput.json"]  # no temp files left


def test_cached_value_is_returned_without_measuring(tmp_path, counted):
    (tmp_path / "throughput.json").write_text(json.dumps({KEY: 1234.5, "other|cpu|bfloat16": 7.0}))
    assert cached_block_throughput(make_stage(), tmp_path, KEY) == 1234.5
    assert counted == []


def test_other_keys_are_kept(tmp_path, counted):
    (tmp_path / "throughput.json").write_text(json.dumps({"other|cuda|bfloat16": 7.0}))
    rate = cached_block_throughput(make_stage(), tmp_path, KEY)
    assert json.loads((tmp_path / "throughput.json").read_text()) == {"other|cuda|bfloat16": 7.0, KEY: rate}
    assert len(counted) == 1


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b"", json.dumps({KEY: -1}).encode(), b'{"%s": NaN}' % KEY.encode(),
     json.dumps({KEY: "fast"}).encode(), json.dumps({KEY: True}).encode()],
)
def test_corrupt_cache_is_remeasured_and_rewritten(tmp_path, counted, content):
    (tmp_path / "throughput.json").write_bytes(content)
    rate = cached_block_throughput(make_stage(), tmp_path, KEY)
    assert rate > 0 and math.isfinite(rate)
    assert len(counted) == 1
    assert json.loads((tmp_path / "throughput.json").read_text())[KEY] == rate


def test_missing_cache_dir_is_created(tmp_path):
    cache_dir = tmp_path / "a" / "b"
    rate = cached_block_throughput(make_stage(), cache_dir, KEY)
    assert json.loads((cache_dir / "throughput.json").read_text()) == {KEY: rate}


def test_unwritable_cache_still_returns_a_rate(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rate = cached_block_throughput(make_stage(), blocker / "cache", KEY)
    assert rate > 0 and math.isfinite(rate)


def test_cache_key_separates_device_and_dtype():
    keys = {throughput_cache_key("m", d, t) for d in ("cpu", "cuda") for t in ("float32", "bfloat16")}
    assert len(keys) == 4


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "shardmesh"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "shardmesh"


def test_the_prefill_step_is_one_of_the_candidates_and_is_cached(tmp_path, monkeypatch):
    stage = make_stage(1, 3)
    assert throughput.measure_prefill_step(stage, sizes=(64, 128, 256), rounds=1) in (64, 128, 256)
    calls = []
    monkeypatch.setattr(throughput, "measure_prefill_step", lambda stage, sizes: calls.append(sizes) or sizes[-1])
    assert throughput.cached_prefill_step(stage, tmp_path, KEY, largest=1024) == 1024
    assert throughput.cached_prefill_step(stage, tmp_path, KEY, largest=1024) == 1024 and calls == [(256, 512, 1024)]
    # A node with a smaller step limit measures only what it may publish; a file that
    # says more than the limit is cut to it.
    assert throughput.cached_prefill_step(stage, tmp_path, KEY, largest=300) == 256
    entries = json.loads((tmp_path / "throughput.json").read_text())
    (tmp_path / "throughput.json").write_text(json.dumps({k: v * 1e6 for k, v in entries.items()}))
    assert throughput.cached_prefill_step(stage, tmp_path, KEY, largest=1024) == 1024


def test_the_prefill_step_is_measured_in_the_dtype_the_stage_prefills_in(monkeypatch):
    stage = TorchStage(resolve_local(str(cached_tiny_model("llama"))), 0, 2, dtype="bfloat16", prefill_dtype="float32")
    seen = []
    real = stage.run_layer
    monkeypatch.setattr(stage, "run_layer", lambda layer, hidden, extra: seen.append(hidden.dtype) or real(layer, hidden, extra))
    assert throughput.measure_prefill_step(stage, sizes=(64, 128), rounds=1) in (64, 128)
    assert set(seen) == {torch.float32}


def test_a_chain_cuts_prefills_at_the_least_step_its_hops_published():
    import trio

    from shardmesh.mesh.chain_client import RemoteChain
    from shardmesh.placement.routing import Hop

    async def main():
        async with trio.open_nursery() as nursery:
            route = [Hop("a", 0, 2), Hop("b", 2, 3), Hop("c", 3, 4)]
            published = {"a": 2048, "b": 512}.get
            chain = RemoteChain(nursery=nursery, open_stream=None, session_id="s", model_id="m", gateway="g", sampling={},
                                prompt_ids=[1], generated=[], route=route, prefill_steps=published)  # fmt: skip
            assert chain.prefill_step == 512  # c published none
            unknown = RemoteChain(nursery=nursery, open_stream=None, session_id="s", model_id="m", gateway="g", sampling={},
                                  prompt_ids=[1], generated=[], route=route)  # fmt: skip
            assert unknown.prefill_step is None

    trio.run(main)
