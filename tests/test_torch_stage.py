"""Chained torch stages must reproduce the unsplit transformers model exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from shardmesh.contract import BadInput, CacheBudgetExceeded, StepRequest, UnknownSession
from shardmesh.tools.tiny_model import ARCHS, cached_tiny_model
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.torch.tensors import raw_from_tensor, tensor_from_raw
from shardmesh.backends.weights import block_of, resolve_local

LAYERS = 6
PROMPT = [5, 17, 99, 3, 42, 7, 8, 60, 61]
DECODE_STEPS = 21
SPLITS = {2: [0, 3, 6], 3: [0, 2, 5, 6]}


def model_path(arch: str):
    return cached_tiny_model(arch, layers=LAYERS, hidden=64)


def build_chain(path, cuts, dtype="float32", **kwargs) -> list[TorchStage]:
    return [TorchStage(resolve_local(str(path)), a, b, dtype=dtype, **kwargs) for a, b in zip(cuts, cuts[1:])]


def run_chain(stages, session, ids, position):
    x = raw_from_tensor(torch.tensor(ids))
    for stage in stages:
        [x] = stage.step([StepRequest(session, x, position)])
    return tensor_from_raw(x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n_stages", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_chain_logits_equal_full_model(arch, n_stages, dtype):
    path = model_path(arch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    stages = build_chain(path, SPLITS[n_stages], dtype)
    for stage in stages:
        stage.open("s", 64)

    cache = DynamicCache(config=ref.config)
    ids, position, generated = PROMPT, 0, []
    for _ in range(1 + DECODE_STEPS):  # one prefill, then cached decode steps
        with torch.no_grad():
            expected = ref(torch.tensor([ids]), cache=cache, logits_to_keep=1).logits[0, -1].float()
        got = run_chain(stages, "s", ids, position)
        assert torch.equal(got, expected), f"max diff {(got - expected).abs().max().item()}"
        position += len(ids)
        ids = [int(expected.argmax())]
        generated.append(ids[0])

    with torch.no_grad():
        n = len(generated)
        reference = ref.generate(
            torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert reference[0, len(PROMPT) :].tolist() == generated


@pytest.mark.parametrize("arch", ARCHS)
def test_each_stage_reads_only_its_own_tensors(arch):
    path = model_path(arch)
    cuts = SPLITS[3]
    for a, b in zip(cuts, cuts[1:]):
        files = resolve_local(str(path))
        tied = "lm_head.weight" not in files.weight_map
        TorchStage(files, a, b)
        assert files.reads, "the stage read nothing"
        for name in files.reads:
            block = block_of(name)
            if block is not None:
                assert a <= block < b, f"stage [{a},{b}) read {name}"
            elif "embed_tokens" in name:
                assert a == 0 or (b == LAYERS and tied), f"stage [{a},{b}) read {name}"
            else:
                assert b == LAYERS, f"stage [{a},{b}) read head tensor {name}"
        # Every tensor of the span was read, each once; nothing else.
        assert len(files.reads) == len(set(files.reads))
        expected = {n for n in files.weight_map if (block_of(n) is not None and a <= block_of(n) < b)}
        assert expected <= set(files.reads)


def test_batched_step_equals_one_by_one():
    path = model_path("llama")
    prompts = {"a": PROMPT, "b": PROMPT[:4] + [11, 12], "c": [90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 7]}
    single = build_chain(path, SPLITS[2])
    batched = build_chain(path, SPLITS[2])

    def decode(stages, batch_mode: bool) -> dict[str, list[int]]:
        tokens = {}
        for sid, ids in prompts.items():  # prefills of different lengths
            for stage in stages:
                stage.open(sid, 64)
            tokens[sid] = [int(run_chain(stages, sid, ids, 0).argmax())]
        for _ in range(12):
            if batch_mode:
                xs = [
                    StepRequest(sid, raw_from_tensor(torch.tensor(toks[-1:])), len(prompts[sid]) + len(toks) - 1)
                    for sid, toks in tokens.items()
                ]
                for stage in stages:
                    outs = stage.step(xs)
                    xs = [StepRequest(r.session_id, o, r.position) for r, o in zip(xs, outs)]
                for r in xs:
                    tokens[r.session_id].append(int(tensor_from_raw(r.inputs).argmax()))
            else:
                for sid, toks in tokens.items():
                    out = run_chain(stages, sid, toks[-1:], len(prompts[sid]) + len(toks) - 1)
                    toks.append(int(out.argmax()))
        return tokens

    assert decode(batched, True) == decode(single, False)


def test_cache_budget_grows_sessions_on_demand():
    [stage] = build_chain(model_path("llama"), [0, LAYERS], cache_budget_bytes=0)
    stage.cache_budget_bytes = 400 * stage.bytes_per_token

    def feed(sid: str, n: int) -> None:
        position = stage.sessions[sid].length
        stage.step([StepRequest(sid, raw_from_tensor(torch.arange(5, 5 + n)), position)])

    stage.open("a", 1000)
    feed("a", 10)
    assert stage.sessions["a"].capacity == 256  # memory follows use, not max_length
    assert stage.cache_tokens_free == 144
    with pytest.raises(CacheBudgetExceeded):  # a new session's first 256 tokens do not fit
        stage.open("b", 1000)
    stage.open("b", 100)  # a short one does
    feed("b", 100)
    with pytest.raises(CacheBudgetExceeded):  # "a" cannot grow past 256 while "b" holds 100
        feed("a", 250)
    assert stage.sessions["a"].length == 10, "a refused step must change nothing"
    stage.close("b")
    feed("a", 250)  # doubling (512) does not fit 400; growing to 320 does
    assert (stage.sessions["a"].length, stage.sessions["a"].capacity) == (260, 320)


def test_bad_requests_change_nothing():
    [stage] = build_chain(model_path("llama"), [0, LAYERS])
    stage.open("b", 40)
    ids = raw_from_tensor(torch.tensor(PROMPT))
    with pytest.raises(UnknownSession):
        stage.step([StepRequest("nope", ids, 0)])
    with pytest.raises(BadInput):  # wrong position
        stage.step([StepRequest("b", ids, 3)])
    with pytest.raises(BadInput):  # token id out of the vocabulary
        stage.step([StepRequest("b", raw_from_tensor(torch.tensor([10**6])), 0)])
    with pytest.raises(BadInput):  # hidden states where token ids belong
        stage.step([StepRequest("b", raw_from_tensor(torch.zeros(2, 64)), 0)])
    with pytest.raises(BadInput):  # longer than max_length
        stage.step([StepRequest("b", raw_from_tensor(torch.arange(41)), 0)])
    with pytest.raises(BadInput):  # the same session twice in one batch
        stage.step([StepRequest("b", ids, 0), StepRequest("b", ids, 0)])
    # None of that changed the session: a good step still works from position 0.
    out = tensor_from_raw(stage.step([StepRequest("b", ids, 0)])[0])
    assert out.shape == (stage.info.vocab_size,)


def test_tied_embeddings_stay_one_matrix():
    [stage] = build_chain(model_path("qwen3"), [0, LAYERS], dtype="bfloat16")
    assert stage.module.lm_head.weight is stage.module.embed_tokens.weight


def test_idle_sessions_expire():
    [stage] = build_chain(model_path("llama"), [0, LAYERS])
    stage.open("old", 8)
    assert stage.expire_idle(0.0) == ["old"]
    assert stage.sessions == {}


def test_middle_stage_rejects_wrong_hidden_size():
    stages = build_chain(model_path("llama"), SPLITS[2])
    stages[1].open("s", 16)
    with pytest.raises(BadInput):
        stages[1].step([StepRequest("s", raw_from_tensor(torch.zeros(3, 65)), 0)])


def sliding_window_model(arch: str, path):
    """A tiny model whose window (8) is shorter than the test's sequences."""
    from transformers import MixtralConfig, Qwen2Config

    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.1, max_position_embeddings=512, sliding_window=8,
    )
    if arch == "qwen2":  # window per layer: the last two layers slide
        config = Qwen2Config(**common, use_sliding_window=True, max_window_layers=2)
        assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    else:  # mixtral: one window for every layer, passed as a keyword
        config = MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.mark.parametrize("arch", ["qwen2", "mixtral"])
def test_sliding_window_layers_match(arch, tmp_path):
    """Our masks cut where transformers' do. The unsplit model keeps fewer keys in its
    sliding layers, so the summation order differs and logits agree to float tolerance
    rather than bit for bit."""
    path = sliding_window_model(arch, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    stages = build_chain(path, [0, 3, 4])
    for stage in stages:
        stage.open("s", 64)
    cache = DynamicCache(config=ref.config)
    ids, position = PROMPT + [1, 2, 3], 0  # the prompt alone is longer than the window
    for _ in range(25):
        with torch.no_grad():
            expected = ref(torch.tensor([ids]), cache=cache, logits_to_keep=1).logits[0, -1]
        got = run_chain(stages, "s", ids, position)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        assert int(got.argmax()) == int(expected.argmax())
        position += len(ids)
        ids = [int(expected.argmax())]


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_sessions_may_use_part_of_a_span(arch):
    """A route may enter and leave a server anywhere inside its span: stages [0,4) and
    [2,6) used as [0,2) + [2,6), and [0,4) + [4,6) from a stage holding [3,6) entered
    at 4, equal the full model; batches mixing sub-ranges stay exact."""
    path = model_path(arch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = DynamicCache(config=ref.config)
        expected = ref(torch.tensor([PROMPT]), cache=cache, logits_to_keep=1).logits[0, -1].float()
    a, b, c = build_chain(path, [0, 4]) + build_chain(path, [2, 6]) + build_chain(path, [3, 6])
    a.open("x", 64, 0, 2)
    b.open("x", 64, 2, 6)
    a.open("y", 64, 0, 4)
    c.open("y", 64, 4, 6)
    assert torch.equal(run_chain([a, b], "x", PROMPT, 0), expected)
    assert torch.equal(run_chain([a, c], "y", PROMPT, 0), expected)

    a.open("z", 64)  # the whole span, batched with the two sub-range sessions
    ids = raw_from_tensor(torch.tensor([int(expected.argmax())]))
    hx, hy, hz = a.step([StepRequest("x", ids, len(PROMPT)), StepRequest("y", ids, len(PROMPT)), StepRequest("z", raw_from_tensor(torch.tensor(PROMPT)), 0)])
    assert hx.shape[-1] == hy.shape[-1] == hz.shape[-1] == 64
    [lx] = b.step([StepRequest("x", hx, len(PROMPT))])
    [ly] = c.step([StepRequest("y", hy, len(PROMPT))])
    assert torch.equal(tensor_from_raw(lx), tensor_from_raw(ly))

    with pytest.raises(BadInput):
        c.open("w", 64, 2, 6)  # outside the stage's span
    with pytest.raises(BadInput):
        b.step([StepRequest("x", raw_from_tensor(torch.tensor([1])), len(PROMPT) + 1)])  # ids into a middle range
