"""The audit's tolerance on real arithmetic: honest float32 and bfloat16 torch, and
MLX, never disagree with float32 torch; other weights of the same shapes always do.

2,000 positions per architecture (4 random sequences of 500 tokens), each compared as
an audit compares two chains' answers: the top :data:`AUDIT_TOP` logprobs of the raw
logits and the greedy token. Run with ``-s`` for the figures (docs/SECURITY.md).
"""

from __future__ import annotations

import pytest

from shardmesh.contract import SampledToken
from shardmesh.mesh.answer_check import AUDIT_TOP, agree
from shardmesh.tools.tiny_model import cached_tiny_model

torch = pytest.importorskip("torch")


def _answer(logprobs) -> SampledToken:
    values, ids = logprobs.topk(AUDIT_TOP)
    best = int(ids[0])
    return SampledToken(best, float(logprobs[best]), tuple((int(i), float(v)) for i, v in zip(ids, values)))


def _logprobs(path, dtype, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
    return torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])


def _mlx_logprobs(path, dtype: str, ids):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    import numpy as np

    model, _ = mlx_lm.load(str(path))
    model.set_dtype(getattr(mx, dtype))
    logits = model(mx.array(ids.numpy())).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return torch.from_numpy(np.array(logprobs)).reshape(-1, logits.shape[-1])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mlx_agrees_with_torch(arch: str) -> None:
    honest = cached_tiny_model(arch, layers=4, hidden=64)
    ids = torch.randint(0, 700, (4, 500), generator=torch.Generator().manual_seed(1))
    f32 = _logprobs(honest, torch.float32, ids)
    for dtype in ("float32", "bfloat16"):
        theirs = _mlx_logprobs(honest, dtype, ids)
        n = f32.shape[0]
        flagged = sum(not agree(_answer(f32[i]), _answer(theirs[i]), top=AUDIT_TOP, greedy=True) for i in range(n))
        print(f"\n{arch}: torch float32 vs MLX {dtype} flagged {flagged}/{n} "
              f"(largest logprob gap {float((f32 - theirs).abs().max()):.3f} nats)")
        assert flagged == 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_honest_dtypes_agree_and_other_weights_are_caught(arch: str) -> None:
    honest = cached_tiny_model(arch, layers=4, hidden=64)
    other = cached_tiny_model(arch, layers=4, hidden=64, seed=7)
    ids = torch.randint(0, 700, (4, 500), generator=torch.Generator().manual_seed(0))
    f32 = _logprobs(honest, torch.float32, ids)
    bf16 = _logprobs(honest, torch.bfloat16, ids)
    liar = _logprobs(other, torch.float32, ids)
    n = f32.shape[0]
    flagged = sum(not agree(_answer(f32[i]), _answer(bf16[i]), top=AUDIT_TOP, greedy=True) for i in range(n))
    caught = sum(not agree(_answer(f32[i]), _answer(liar[i]), top=AUDIT_TOP, greedy=False) for i in range(n))
    worst = float((f32 - bf16).abs().max())
    print(f"\n{arch}: float32 vs bfloat16 flagged {flagged}/{n} (largest logprob gap {worst:.3f} nats); "
          f"other weights caught {caught}/{n}")
    assert flagged == 0
    assert caught >= 0.99 * n
