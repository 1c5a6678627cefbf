"""Turn the last position's logits into one token, reproducibly.

Sampling runs on the last stage of a pipeline. After a failure the gateway may replay a
generation on another machine, and the replay must pick the same tokens as the
original. So :func:`sample` is a *pure function* of

    (params, logits, prompt ids, generated ids)

There is no RNG object living between calls: the random number used at step ``k``
(``k = len(generated_ids)``, the number of tokens generated so far) comes from a fresh
``torch.Generator`` seeded from ``(params.seed, k)``. Same seed, same history, same
logits => same token, on any machine.

The pipeline, in order (each stage is skipped when its parameter is neutral)::

    raw logits (float32, CPU)
      -> logit bias     add each listed token's bias
      -> grammar        tokens a grammar refuses get -inf (backends/grammar.py)
      -> penalties      repetition (prompt + generated), then frequency/presence (generated)
      -> greedy?        temperature == 0: argmax, ties to the lowest id; done
      -> temperature    divide by T (a T too small to divide by in float32: its limit)
      -> min-p          keep the tokens at least min_p times as likely as the best
      -> top-k          keep the k best (ties to the lowest ids)
      -> top-p          keep the smallest best-first prefix whose mass reaches p
      -> draw           inverse CDF with one uniform number from the (seed, step) stream

Log-probabilities reported to the client (:attr:`SampledToken.logprob` and
:attr:`SampledToken.top_logprobs`) are those of the *raw* logits: they describe what the
model thought, not what the sampler's knobs made of it (the OpenAI convention).

Every valid :class:`SamplingParams` can be sampled, whatever the logits' magnitudes:
penalised logits that overflow float32 are recomputed in float64 (where the ranges
:meth:`SamplingParams.validate` allows cannot overflow), and a temperature below
float32's smallest normal number (``2**-126``; ``1e-300`` is 0 in float32) is divided
in float64, where every positive temperature is exact: a tiny one leaves only the best
logit (or the tied best) with any probability, which is the greedy limit it should be.
A refusal that is the request's
fault raises :class:`SamplingRefused`, so that a hop can answer ``bad_request`` instead
of taking the blame (docs/PROTOCOL.md 6.3).

Everything here works on whole-vocabulary tensors (bincount, masks, one sort at most),
never on Python loops over the vocabulary, so a 150k vocabulary costs well under a
millisecond or two per token.
"""

from __future__ import annotations

import math
import secrets
from typing import Sequence

import torch

from ...contract.sampling import SampledToken, SamplingParams

__all__ = [
    "SamplingRefused",
    "apply_penalties",
    "best_ids",
    "sample",
    "step_seed",
]

_MASK64 = (1 << 64) - 1

# Below this temperature float32 cannot hold T exactly (it is subnormal there, or 0: and
# 0 / 0, the best logit shifted to 0 over T, is NaN). Float32's smallest normal number.
_TINY_TEMPERATURE = 2.0**-126


class SamplingRefused(ValueError):
    """The request's parameters, not the logits, make sampling impossible.

    A ValueError like every other refusal here; the separate type lets a hop answer
    ``bad_request`` (the client's fault) rather than ``internal`` (its own)."""


# --------------------------------------------------------------------------- seeding


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser: a cheap bijective mixer on 64-bit integers.

    Nearby inputs (seed 1 vs 2, step 7 vs 8) give unrelated outputs, which is what we
    need to turn ``(seed, step)`` into independent-looking generator seeds.
    """
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """The generator seed for draw number ``step`` of a request seeded with ``seed``.

    Mixes both into 64 bits, then xor-folds to 32 bits. The fold is deliberate: torch's
    CPU generator (mt19937) only uses the low 32 bits of ``manual_seed`` (seeds ``1``
    and ``1 + 2**32`` give identical streams), so we fold rather than let torch silently
    discard the high half of the mix.
    """
    h = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def _uniform(seed: int | None, step: int) -> float:
    """One uniform number in [0, 1) for this step, from a fresh generator.

    Float64 so the inverse-CDF draw has resolution far below the smallest probability
    that matters. Without a seed, a fresh random one per call: non-reproducible, which
    is what an unseeded request asked for.
    """
    if seed is None:
        seed = secrets.randbits(64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(step_seed(seed, step))
    return float(torch.rand((), generator=gen, dtype=torch.float64))


# --------------------------------------------------------------------------- helpers


def _as_logits(logits: torch.Tensor) -> torch.Tensor:
    """A 1-D float32 CPU tensor of the logits, checked for values we cannot sample from."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 2 and logits.shape[0] == 1:
        logits = logits[0]
    if logits.dim() != 1 or logits.numel() == 0:
        raise ValueError(f"logits must have shape [vocab] with vocab > 0, got {tuple(logits.shape)}")
    # float32 regardless of input: bf16/fp16 logits have too little mantissa for
    # softmax tails, and one dtype means one set of rounding on every machine.
    x = logits.detach().to(device="cpu", dtype=torch.float32)
    # Fast path: a finite sum means no NaN/inf anywhere (a sum is much cheaper than
    # isnan). Otherwise look closer: -inf is legitimate (masked tokens), NaN/+inf not.
    if not math.isfinite(float(x.sum())):
        if torch.isnan(x).any() or torch.isposinf(x).any():
            raise ValueError("logits contain NaN or +inf")
        if torch.isneginf(x).all():
            raise ValueError("every logit is -inf: nothing can be sampled")
    return x


def _ids(ids: Sequence[int], vocab: int, what: str) -> torch.Tensor:
    """Token ids as an int64 tensor, range-checked so bincount cannot grow past vocab."""
    t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"{what} hold a token id outside [0, {vocab})")
    return t


def _log_softmax_info(raw: torch.Tensor, token_id: int, params: SamplingParams) -> tuple[float | None, tuple[tuple[int, float], ...]]:
    """The requested logprob and top-N alternatives from the raw logits."""
    if not params.logprobs and params.top_logprobs == 0:
        return None, ()
    lp = torch.log_softmax(raw, dim=-1)
    logprob = float(lp[token_id]) if params.logprobs else None
    top: tuple[tuple[int, float], ...] = ()
    n = min(params.top_logprobs, lp.numel())
    if n > 0:
        ids = best_ids(lp, n)
        top = tuple((int(i), float(lp[i])) for i in ids.tolist())
    return logprob, top


def best_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the ``k`` largest values, best first, ties broken by the lowest id.

    ``torch.topk`` is O(vocab) but picks arbitrarily among ties, which would make
    results depend on the build. So: find the k-th largest value with topk, keep every
    id at or above it (ties included, in id order), and stable-sort that small set.
    """
    if k >= x.numel():
        return torch.sort(x, descending=True, stable=True).indices
    threshold = torch.topk(x, k, sorted=False).values.min()
    candidates = torch.nonzero(x >= threshold).reshape(-1)  # ascending ids
    order = torch.sort(x[candidates], descending=True, stable=True).indices
    return candidates[order[:k]]


# --------------------------------------------------------------------------- public


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    generated_ids: Sequence[int],
) -> torch.Tensor:
    """Return a new float32 tensor: ``logits`` with the repetition penalties applied.

    1. ``repetition_penalty`` (HF/CTRL) over every token id present in prompt or
       completion: ``l / r`` if ``l > 0`` else ``l * r``. Applied once per distinct id,
       however often it occurred.
    2. ``frequency_penalty`` and ``presence_penalty`` (OpenAI) over the completion only:
       ``l - frequency * count - presence * (count > 0)``.

    The repetition penalty goes first (as in vLLM), so the OpenAI penalties are plain
    offsets on top of it. Counting uses ``bincount``: O(history + vocab), no loops.
    The result is float32, or float64 when float32 would overflow (see :func:`_penalize`).
    """
    return _penalize(_as_logits(logits).clone(), params, prompt_ids, generated_ids)


def _penalize(x: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], generated_ids: Sequence[int]) -> torch.Tensor:
    """:func:`apply_penalties` on already-checked float32 logits; never modifies ``x``.

    A repetition penalty far from 1 can push a logit past float32's range (``l / r``
    with a tiny ``r``, ``l * r`` with a huge one): the best logit becomes +inf (NaN once
    shifted) or every logit -inf. Then the same sums run again in float64, where any
    float32 logit times or over a penalty within :meth:`SamplingParams.validate`'s range
    stays finite. Results that fit float32 keep float32, bit for bit as before.
    """
    out = _penalized(x, params, prompt_ids, generated_ids)
    if out is not x and not math.isfinite(float(out.max())):
        out = _penalized(x.to(torch.float64), params, prompt_ids, generated_ids)
    return out


def _penalized(x: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], generated_ids: Sequence[int]) -> torch.Tensor:
    """The penalty arithmetic itself, in ``x``'s dtype."""
    vocab = x.numel()

    if params.repetition_penalty != 1.0:
        seen = torch.cat([_ids(prompt_ids, vocab, "prompt_ids"), _ids(generated_ids, vocab, "generated_ids")])
        if seen.numel():
            mask = torch.bincount(seen, minlength=vocab) > 0
            r = float(params.repetition_penalty)
            x = torch.where(mask, torch.where(x > 0, x / r, x * r), x)

    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        gen = _ids(generated_ids, vocab, "generated_ids")
        if gen.numel():
            counts = torch.bincount(gen, minlength=vocab).to(x.dtype)
            x = x - float(params.frequency_penalty) * counts - float(params.presence_penalty) * (counts > 0).to(x.dtype)
    return x


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    generated_ids: Sequence[int],
    allowed: torch.Tensor | None = None,
) -> SampledToken:
    """Pick the next token from the last position's logits ``[vocab]``, among the
    ``allowed`` ones when a bool mask ``[vocab]`` is given (a grammar's next tokens).

    Deterministic given ``params.seed``: the draw for step ``len(generated_ids)`` uses a
    generator seeded only from ``(seed, step)``, so replaying the same history with the
    same seed reproduces the token exactly, and consecutive steps get independent
    draws. Greedy decoding (``temperature == 0``) ignores the seed entirely.

    Raises :class:`SamplingRefused` (a ValueError) for invalid params, and
    :class:`ValueError` for malformed logits (wrong shape, NaN, +inf, all -inf) or
    history ids outside the vocabulary. Valid params and finite logits always sample.
    """
    try:
        params.validate()
    except ValueError as exc:
        raise SamplingRefused(str(exc)) from exc
    raw = _as_logits(logits)
    x = _biased(raw, params)
    if allowed is not None:
        if allowed.shape != x.shape or not bool(allowed.any()):
            raise SamplingRefused("the grammar allows no token here")
        x = x.masked_fill(~allowed, float("-inf"))
    x = _penalize(x, params, prompt_ids, generated_ids)

    if params.greedy:
        # torch.argmax returns the first maximal index: ties go to the lowest id.
        token_id = int(torch.argmax(x))
    else:
        token_id = _draw(x, params, step=len(generated_ids))

    logprob, top = _log_softmax_info(raw, token_id, params)
    return SampledToken(token_id=token_id, logprob=logprob, top_logprobs=top)


def _biased(raw: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``raw`` with ``params.logit_bias`` added (a new tensor; ``raw`` itself if none)."""
    if not params.logit_bias:
        return raw
    ids = torch.tensor([i for i, _ in params.logit_bias], dtype=torch.int64)
    if int(ids.max()) >= raw.numel():
        raise SamplingRefused(f"logit_bias names token {int(ids.max())}; the vocabulary has {raw.numel()}")
    out = raw.clone()
    out[ids] += torch.tensor([b for _, b in params.logit_bias], dtype=raw.dtype)
    return out


# How many best tokens the nucleus search looks at before paying for more. For real LLM
# distributions the top-p nucleus almost always fits the first size: topk over 150k ids
# costs an order of magnitude less than a stable sort of all of them (docs/PERFORMANCE.md,
# "Sampling"). The last resort is the full sort.
_NUCLEUS_PREFIXES = (1024, 16384)


def _nucleus_len(probs: torch.Tensor, top_p: float) -> int:
    """Length of the smallest best-first prefix of ``probs`` whose mass reaches ``top_p``.

    Token i stays if the mass strictly *before* it is still short of ``top_p``; the
    best token always stays. If every entry stays, the nucleus may extend past ``probs``.
    """
    before = torch.cumsum(probs, dim=-1)
    before = torch.cat([before.new_zeros(1), before[:-1]])  # exact, monotone
    return max(1, int((before < top_p).sum()))


def _draw(x: torch.Tensor, params: SamplingParams, step: int) -> int:
    """Temperature, top-k, top-p, then one inverse-CDF draw. Returns a token id."""
    # Shift so the best logit is 0 *before* dividing: then a tiny temperature pushes
    # the rest towards -inf instead of overflowing the best to +inf (which would make
    # softmax NaN). Softmax is shift-invariant, so nothing else changes.
    t = float(params.temperature)
    if t >= _TINY_TEMPERATURE:
        x = (x - x.max()) / t
    else:
        # T is not a full-precision float32 (or is 0 there, and 0 / 0 is NaN): divide
        # in float64, where any T > 0 is exact. The best logits stay at exactly 0 (the
        # where() guards against a division done as a multiply by an overflowing 1 / T);
        # the others come out at their exact float64 value or -inf, which is what
        # their probability rounds to. So this is T itself, not an approximation.
        shifted = (x - x.max()).to(torch.float64)
        x = torch.where(shifted == 0, shifted, shifted / t)
    if params.min_p > 0:
        # The best logit is 0 here, so a token's probability over the best's is exp(x).
        x = torch.where(x >= math.log(params.min_p), x, float("-inf"))
    vocab = x.numel()

    # `ids` lists the surviving candidates, best first, in the order the CDF walks
    # them; None means "all of the vocabulary, in id order" (no sort needed).
    # Softmax runs in float32 (fast, vectorised); the cumulative sums run in float64 so
    # that summing 150k small numbers loses no mass.
    ids: torch.Tensor | None
    if 0 < params.top_k < vocab:
        ids = best_ids(x, params.top_k)
        # Top-k renormalises over its survivors; top-p then measures mass within them.
        probs = torch.softmax(x[ids], dim=-1).to(torch.float64)
        if params.top_p < 1.0:
            keep = _nucleus_len(probs, params.top_p)
            ids, probs = ids[:keep], probs[:keep]
    elif params.top_p < 1.0:
        full = torch.softmax(x, dim=-1)
        # best_ids(x, n) is exactly the first n ids of a stable best-first sort, so a
        # prefix gives the same nucleus as the full sort whenever the nucleus ends
        # inside it. Try growing prefixes; sort everything only as a last resort.
        for n in (*_NUCLEUS_PREFIXES, vocab):
            ids = best_ids(x, min(n, vocab))
            probs = full[ids].to(torch.float64)
            keep = _nucleus_len(probs, params.top_p)
            if keep < ids.numel() or ids.numel() == vocab:
                break
        ids, probs = ids[:keep], probs[:keep]
    else:
        ids = None
        probs = torch.softmax(x, dim=-1).to(torch.float64)

    cdf = torch.cumsum(probs, dim=-1)
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0):
        # Cannot happen for params validate() accepts and finite logits (see the module
        # docstring); if it ever does, it is these params, not this hop, that failed.
        raise SamplingRefused(f"these sampling parameters leave nothing to sample (mass {total})")
    target = _uniform(params.seed, step) * total  # scaling == renormalising
    # right=True: first index with cdf > target, which always has positive probability.
    pos = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64), right=True)[0])
    # Rounding can put target at cdf[-1]; fall back to the last positive-mass entry.
    if pos >= cdf.numel():
        pos = int(torch.nonzero(probs > 0).max())
    return int(ids[pos]) if ids is not None else pos
