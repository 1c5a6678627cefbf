"""Issue 17, item 3, in the sampler: every valid parameter set samples, whatever the
logits' magnitudes, and what cannot be held in float32 is refused up front.

The old sampler divided by ``float32(1e-300) == 0`` (NaN everywhere) and let
``l / 1e-300`` overflow to +inf; it raised deep inside the last hop, which the gateway
took for that hop's fault.
"""

from __future__ import annotations

import pytest
import torch

from shardmesh.backends.torch.sampling import SamplingRefused, apply_penalties, sample
from shardmesh.contract import SamplingParams


def logits(seed: int, scale: float = 10.0) -> torch.Tensor:
    return torch.randn(1000, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, 2.0**-127, 2.0**-126, 1e-30])
def test_a_tiny_temperature_is_the_greedy_limit(temperature: float) -> None:
    for seed in range(5):
        x = logits(seed)
        params = SamplingParams(temperature=temperature, seed=seed, top_p=0.9, top_k=50)
        assert sample(x, params, [1, 2], [3]).token_id == int(torch.argmax(x))


def test_a_tiny_temperature_draws_among_tied_best_logits() -> None:
    x = torch.full((10,), -5.0)
    x[[3, 7]] = 2.0
    drawn = {sample(x, SamplingParams(temperature=1e-300, seed=s), [], []).token_id for s in range(40)}
    assert drawn == {3, 7}


@pytest.mark.parametrize("negative", [False, True], ids=["mixed-signs", "all-negative"])
@pytest.mark.parametrize("penalty", [2.0**-126, 1e-30, 1e30, 3.4e38])
def test_a_penalty_that_overflows_float32_is_computed_in_float64(penalty: float, negative: bool) -> None:
    """``l / 1e-30`` and ``l * 1e30`` leave float32's range: the best logit would be
    +inf (NaN once shifted), or every seen logit -inf. A logit pushed to -inf while a
    finite best remains is exact enough: its probability is 0 either way."""
    x = logits(0, scale=1e8)
    x = -x.abs() if negative else x
    seen = list(range(1000)) if negative else list(range(0, 1000, 3))
    penalised = apply_penalties(x, SamplingParams(repetition_penalty=penalty), seen, [])
    assert not bool(torch.isnan(penalised).any()) and bool(torch.isfinite(penalised.max()))
    best = int(torch.argmax(penalised))
    if negative:  # all seen: the order of l * r (or l / r) is the order of l
        assert best == int(torch.argmax(x))
    for temperature in (0.0, 1e-300, 0.7):
        token = sample(x, SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=1), seen, []).token_id
        if temperature < 1e-3:
            assert token == best


@pytest.mark.parametrize("penalty", [1e-300, 1e-39, 3.5e38, 1e300])
def test_a_penalty_float32_cannot_hold_is_refused_with_its_name(penalty: float) -> None:
    params = SamplingParams(temperature=0.7, repetition_penalty=penalty)
    with pytest.raises(ValueError, match="repetition_penalty"):
        params.validate()
    with pytest.raises(SamplingRefused, match="repetition_penalty"):
        sample(logits(0), params, [1], [])
