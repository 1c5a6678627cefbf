"""MLX stages must agree with the torch path, alone and mixed with torch stages.

MLX and torch sum in different orders, so float32 logits agree to a tolerance rather
than bit for bit; greedy tokens must be identical. Run with ``-s`` to see the max logit
difference per arch.
"""

from __future__ import annotations

import pytest

pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'mlx[cpu]' mlx-lm): MLX stage tests cannot run")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install mlx-lm): MLX stage tests cannot run")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shardmesh.contract import BadInput, CacheBudgetExceeded, RawTensor, StepRequest, UnknownSession
from shardmesh.backends.mlx.stage import MlxStage, mx_from_raw, raw_from_mx
from shardmesh.tools.tiny_model import ARCHS, cached_tiny_model
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.torch.tensors import raw_from_tensor, tensor_from_raw
from shardmesh.backends.weights import block_of, resolve_local

LAYERS = 6
PROMPT = [5, 17, 99, 3, 42, 7, 8, 60, 61]
DECODE_STEPS = 10
SPLITS = {2: [0, 3, 6], 3: [0, 2, 5, 6]}
ATOL = 1e-3  # float32 logits, MLX vs torch


def model_path(arch: str):
    return cached_tiny_model(arch, layers=LAYERS, hidden=64)


def mlx_chain(path, cuts, dtype="float32", **kwargs) -> list[MlxStage]:
    return [MlxStage(resolve_local(str(path)), a, b, dtype=dtype, **kwargs) for a, b in zip(cuts, cuts[1:])]


def torch_chain(path, cuts, dtype="float32") -> list[TorchStage]:
    return [TorchStage(resolve_local(str(path)), a, b, dtype=dtype, device="cpu") for a, b in zip(cuts, cuts[1:])]


def run_chain(stages, session, ids, position) -> torch.Tensor:
    x = raw_from_tensor(torch.tensor(ids))
    for stage in stages:
        [x] = stage.step([StepRequest(session, x, position)])
    return tensor_from_raw(x)


def greedy(stages, steps: int = DECODE_STEPS, session: str = "s") -> tuple[list[int], list[torch.Tensor]]:
    """Prefill PROMPT, then ``steps`` cached decode steps; the tokens and every logits row."""
    for stage in stages:
        stage.open(session, 64)
    ids, position, tokens, logits = PROMPT, 0, [], []
    for _ in range(1 + steps):
        out = run_chain(stages, session, ids, position)
        logits.append(out)
        position += len(ids)
        ids = [int(out.argmax())]
        tokens.append(ids[0])
    return tokens, logits


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens and logits of the unsplit torch stage, per arch (computed once)."""
    cache: dict[str, tuple[list[int], list[torch.Tensor]]] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = greedy(torch_chain(model_path(arch), [0, LAYERS]))
        return cache[arch]

    return get


@pytest.mark.parametrize("n_stages", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_chain_matches_torch(arch, n_stages, reference):
    want_tokens, want_logits = reference(arch)
    tokens, logits = greedy(mlx_chain(model_path(arch), SPLITS[n_stages]))
    diff = max((a - b).abs().max().item() for a, b in zip(logits, want_logits))
    print(f"\n{arch} {n_stages} MLX stages: max |logit diff| vs torch = {diff:.3g}")
    assert all(row.dtype == torch.float32 and row.shape == (768,) for row in logits)
    assert diff < ATOL
    assert tokens == want_tokens


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_torch_and_mlx_stages_mix(arch, reference):
    """Only raw bytes cross: torch [0,3) -> MLX [3,6) and MLX [0,3) -> torch [3,6)."""
    path = model_path(arch)
    want_tokens, _ = reference(arch)
    assert greedy(torch_chain(path, [0, 3]) + mlx_chain(path, [3, 6]))[0] == want_tokens
    assert greedy(mlx_chain(path, [0, 3]) + torch_chain(path, [3, 6]))[0] == want_tokens


def test_bfloat16_crosses_as_its_bit_pattern():
    """A bf16 hidden state from torch reaches MLX bit for bit, and back."""
    t = torch.randn(3, 64).to(torch.bfloat16)
    a = mx_from_raw(raw_from_tensor(t))
    assert str(a.dtype) == "mlx.core.bfloat16" and tuple(a.shape) == (3, 64)
    back = tensor_from_raw(raw_from_mx(a))
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_bfloat16_mixed_chain_runs_and_mostly_agrees():
    """bf16 sums differ between backends, so only the first token is required to match;
    the stage's dtype and the bytes crossing are bf16."""
    path = model_path("llama")
    ref_tokens, _ = greedy(torch_chain(path, [0, LAYERS], "bfloat16"), steps=3)
    stages = torch_chain(path, [0, 3], "bfloat16") + mlx_chain(path, [3, 6], "bfloat16")
    assert stages[1].info.dtype == "bfloat16"
    tokens, _ = greedy(stages, steps=3)
    assert tokens[0] == ref_tokens[0]


def test_reads_only_its_own_tensors(monkeypatch):
    """Only the span's shards are opened (mx.load is lazy, so even they are read only
    for the tensors the stage evaluates), and only the span's tensors are used."""
    import mlx.core as mx

    opened: list[str] = []
    real_load = mx.load
    monkeypatch.setattr(mx, "load", lambda f, *a, **k: opened.append(f) or real_load(f, *a, **k))
    path = model_path("mixtral")  # MoE, separate head: the sanitizer must work mid-model
    cuts = SPLITS[3]
    for a, b in zip(cuts, cuts[1:]):
        files = resolve_local(str(path))
        opened.clear()
        MlxStage(files, a, b)
        assert opened and {f.rsplit("/", 1)[1] for f in opened} == files.files_for(files.reads)
        assert len(opened) < len(set(files.weight_map.values()))
        for name in files.reads:
            block = block_of(name)
            if block is not None:
                assert a <= block < b, f"stage [{a},{b}) read {name}"
            elif "embed_tokens" in name:
                assert a == 0, f"stage [{a},{b}) read {name}"
            else:
                assert b == LAYERS, f"stage [{a},{b}) read head tensor {name}"


def test_materializes_only_the_kept_weights():
    """Building a middle stage allocates about its own blocks' bytes, not the model's."""
    import gc

    import mlx.core as mx
    from mlx.utils import tree_flatten

    path = model_path("qwen3_moe")
    gc.collect()
    before = mx.get_active_memory()
    stage = MlxStage(resolve_local(str(path)), 2, 4)
    grown = mx.get_active_memory() - before
    kept = sum(v.nbytes for layer in stage.layers for _, v in tree_flatten(layer.parameters()))
    whole = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert stage.embed is None and stage.head is None
    assert grown <= 1.2 * kept < whole / 2, (grown, kept, whole)


def test_bad_requests_raise_like_torch_and_change_nothing():
    path = model_path("llama")
    mlx_first, mlx_mid = mlx_chain(path, [0, 3, 6])
    torch_first, torch_mid = torch_chain(path, [0, 3, 6])
    ids = raw_from_tensor(torch.tensor(PROMPT))
    cases = [
        ("first", StepRequest("nope", ids, 0), UnknownSession),
        ("first", StepRequest("b", ids, 3), BadInput),  # wrong position
        ("first", StepRequest("b", raw_from_tensor(torch.tensor([10**6])), 0), BadInput),  # id out of vocab
        ("first", StepRequest("b", raw_from_tensor(torch.zeros(2, 64)), 0), BadInput),  # hidden where ids belong
        ("first", StepRequest("b", raw_from_tensor(torch.arange(41)), 0), BadInput),  # past max_length
        ("mid", StepRequest("b", raw_from_tensor(torch.zeros(3, 65)), 0), BadInput),  # wrong hidden size
        ("mid", StepRequest("b", ids, 0), BadInput),  # ids into a middle stage
    ]
    for first, mid in [(mlx_first, mlx_mid), (torch_first, torch_mid)]:
        first.open("b", 40)
        mid.open("b", 40)
        for which, req, error in cases:
            with pytest.raises(error):
                (first if which == "first" else mid).step([req])
        with pytest.raises(BadInput):
            first.step([StepRequest("b", ids, 0), StepRequest("b", ids, 0)])  # same session twice
        with pytest.raises(BadInput):
            first.open("b", 40)  # already open
        with pytest.raises(BadInput):
            first.open("c", 40, 2, 6)  # outside the span
    # None of that moved the session: a good step still starts at position 0.
    out = mlx_first.step([StepRequest("b", ids, 0)])[0]
    assert out.shape == (len(PROMPT), 64) and out.dtype == "float32"


def test_cache_budget_grows_sessions_on_demand():
    [stage] = mlx_chain(model_path("llama"), [0, LAYERS], cache_budget_bytes=0)
    stage.cache_budget_bytes = 400 * stage.bytes_per_token

    def feed(sid: str, n: int) -> None:
        position = stage.sessions[sid].length
        stage.step([StepRequest(sid, raw_from_tensor(torch.arange(5, 5 + n)), position)])

    stage.open("a", 1000)
    feed("a", 10)
    assert stage.sessions["a"].capacity == 256  # memory follows use, not max_length
    assert stage.sessions["a"].caches[0].keys.shape[2] == 256  # and is really allocated
    assert stage.cache_tokens_free == 144
    with pytest.raises(CacheBudgetExceeded):
        stage.open("b", 1000)
    stage.open("b", 100)
    feed("b", 100)
    with pytest.raises(CacheBudgetExceeded):
        feed("a", 250)
    assert stage.sessions["a"].length == 10, "a refused step must change nothing"
    stage.close("b")
    feed("a", 250)  # doubling (512) does not fit 400; growing to 320 does
    assert (stage.sessions["a"].length, stage.sessions["a"].capacity) == (260, 320)


def test_sessions_may_use_part_of_a_span(reference):
    """Stages [0,4) and [2,6) used as [0,2) + [2,6) give the reference logits."""
    path = model_path("qwen3_moe")
    _, want_logits = reference("qwen3_moe")
    a, b = mlx_chain(path, [0, 4]) + mlx_chain(path, [2, 6])
    a.open("x", 64, 0, 2)
    b.open("x", 64, 2, 6)
    got = run_chain([a, b], "x", PROMPT, 0)
    assert (got - want_logits[0]).abs().max().item() < ATOL


def test_idle_sessions_expire_and_close_frees():
    [stage] = mlx_chain(model_path("qwen2"), [0, LAYERS])
    stage.open("old", 8)
    free = stage.cache_tokens_free
    stage.step([StepRequest("old", raw_from_tensor(torch.tensor([1, 2])), 0)])
    assert stage.cache_tokens_free == free - 8  # capacity min(max_length, 256) = 8
    assert stage.expire_idle(0.0) == ["old"]
    assert stage.sessions == {} and stage.cache_tokens_free == free
    assert stage.info.backend == "mlx" and stage.info.device in ("cpu", "gpu")


def test_sliding_window_matches_torch(tmp_path):
    """Qwen2 with window 8 on its last two layers: mlx-lm ignores windows, our masks
    apply them as transformers does."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.1, max_position_embeddings=512, sliding_window=8,
        use_sliding_window=True, max_window_layers=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, max_shard_size="100KB")
    want, _ = greedy(torch_chain(tmp_path, [0, 4]), steps=12)
    got, _ = greedy(mlx_chain(tmp_path, [0, 3, 4]), steps=12)
    assert got == want


def test_raw_round_trip_dtypes():
    for dtype in ("float32", "float16", "int64", "int32"):
        arr = np.arange(6, dtype=dtype).reshape(2, 3)
        raw = RawTensor(dtype, (2, 3), arr.tobytes())
        back = raw_from_mx(mx_from_raw(raw))
        assert back.dtype == dtype and back.shape == (2, 3) and bytes(back.data) == arr.tobytes()


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_draft_rows_and_a_rewind_match_the_torch_stage(arch: str) -> None:
    """A step with draft tokens returns a row of logits per draft and one more, as the
    torch stage does; a step that starts before the cache's end drops what was after."""
    path = model_path(arch)
    proposal = [21, 22, 23, 24]
    rows = {}
    for name, stages in (("mlx", mlx_chain(path, [0, 3, 6])), ("torch", torch_chain(path, [0, 3, 6]))):
        for stage in stages:
            stage.open("s", 64)
        run_chain(stages, "s", PROMPT, 0)
        x = raw_from_tensor(torch.tensor(proposal))
        for stage in stages:
            [x] = stage.step([StepRequest("s", x, len(PROMPT), draft=3 if stage is stages[-1] else 0)])
        rewound = run_chain(stages, "s", [30], len(PROMPT) + 2)  # two drafts rejected
        assert all(stage.sessions["s"].length == len(PROMPT) + 3 for stage in stages)
        rows[name] = (tensor_from_raw(x), rewound)
    assert rows["mlx"][0].shape == (4, rows["torch"][0].shape[1])
    torch.testing.assert_close(rows["mlx"][0], rows["torch"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(rows["mlx"][1], rows["torch"][1], atol=ATOL, rtol=0)
