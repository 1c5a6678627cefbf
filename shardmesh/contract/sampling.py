"""How to pick a token, and the token picked: plain values every room shares.

:class:`SamplingParams` travels from the HTTP request through the gateway to the last
hop of a chain (as a plain dict on the wire), where the backend's sampler turns logits
into a :class:`SampledToken`. Both are plain data, importable without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = [
    "LOGIT_BIAS_MAX", "MAX_GRAMMAR_BYTES", "MAX_LOGIT_BIASES", "MAX_TOP_LOGPROBS", "REPETITION_PENALTY_MAX", "REPETITION_PENALTY_MIN",
    "SEED_MAX", "SEED_MIN", "SampledToken", "SamplingParams",
]

#: The most alternatives a client may ask for per token (OpenAI's limit too).
MAX_TOP_LOGPROBS = 20
#: ``logit_bias``: at most this many tokens, each biased by at most this much (OpenAI's ranges).
MAX_LOGIT_BIASES = 300
LOGIT_BIAS_MAX = 100.0
#: ``grammar``: the longest grammar a request may carry, in UTF-8 bytes (a JSON schema of
#: many tools fits). Half of a frame header (64 KiB): the route and ticket fit beside it.
MAX_GRAMMAR_BYTES = 32768

# Seeds are reduced modulo 2**64. Bound what we accept so untrusted input cannot hand
# us a million-digit integer; this range covers both signed and unsigned 64-bit seeds.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1

# The repetition penalty multiplies or divides float32 logits. Within float32's normal
# range it is held exactly, and a float32 logit times or over it always fits a float64
# (the sampler falls back to float64 when float32 overflows). 1e-300 is 0 in float32.
REPETITION_PENALTY_MIN = 2.0**-126  # about 1.18e-38, float32's smallest normal number
REPETITION_PENALTY_MAX = 3.4028234663852886e38  # float32's largest finite number


@dataclass(frozen=True)
class SamplingParams:
    """How to pick a token from logits. All fields are plain, JSON/CBOR-able values.

    ``temperature == 0`` means greedy decoding; any temperature in ``(0, 2]`` is sampled
    exactly, however tiny (``1e-300`` behaves as the greedy limit it is, see
    :mod:`shardmesh.backends.torch.sampling`). ``top_k == 0`` and ``top_p == 1`` mean
    "no truncation". Penalty semantics follow the APIs clients already know:

    * ``presence_penalty`` / ``frequency_penalty`` (OpenAI): for every token already
      *generated* in this completion, ``logit -= frequency * count + presence``.
      The prompt does not count.
    * ``repetition_penalty`` (HF ``transformers`` / CTRL): for every token seen in the
      prompt *or* the completion, a positive logit is divided by the penalty and a
      negative one multiplied by it, so a penalty > 1 always makes it less likely.

    ``logit_bias`` (OpenAI) adds a bias in [-100, 100] to the logits of up to 300 token
    ids before anything else (greedy picks see it too), as ``(id, bias)`` pairs sorted
    by id. ``min_p`` (vLLM, llama.cpp) keeps, after the temperature, only the tokens at
    least ``min_p`` times as likely as the best one; 0 turns it off.

    ``grammar`` (structured output, forced tool calls) is a grammar in llguidance's
    Lark dialect, JSON schemas embedded as ``%json {...}``: only tokens that keep the
    answer inside it are drawn, and once it is complete only an end-of-answer token
    (:mod:`shardmesh.backends.grammar`; docs/PROTOCOL.md 6.3).

    Instances are not validated on construction (so that :meth:`validate` can report
    a readable error); :func:`sample` and :meth:`from_dict` always validate. Every
    instance that passes :meth:`validate` can be sampled from any finite logits: the
    gateway validates before sending, so a last hop never refuses a request it was sent.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None

    def validate(self) -> None:
        """Raise :class:`ValueError` naming the first out-of-range or mistyped field.

        Comparisons are written as ``lo <= x <= hi`` so NaN (which compares false with
        everything) is rejected along with out-of-range values.
        """
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {type(v).__name__}")
        for name in ("top_k", "top_logprobs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {type(v).__name__}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"logprobs must be a boolean, got {type(self.logprobs).__name__}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or null, got {type(self.seed).__name__}")

        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX:
            raise ValueError(
                f"repetition_penalty must be in [{REPETITION_PENALTY_MIN:.3g}, {REPETITION_PENALTY_MAX:.3g}] "
                f"(> 0 and representable in float32; 1 disables it), got {self.repetition_penalty}"
            )
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must fit in 64 bits ([{SEED_MIN}, {SEED_MAX}]), got {self.seed}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_logit_bias(self.logit_bias)
        if self.grammar is not None and (
            not isinstance(self.grammar, str) or not self.grammar or len(self.grammar) > MAX_GRAMMAR_BYTES
            or len(self.grammar.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES
        ):
            raise ValueError(f"grammar must be a non-empty string of at most {MAX_GRAMMAR_BYTES} bytes (UTF-8)")

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax (``temperature == 0``)."""
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (ints, floats, bools, None, lists): safe for JSON and
        CBOR. ``logit_bias`` becomes a list of ``[id, bias]`` pairs. ``min_p`` and
        ``logit_bias`` and ``grammar`` appear only when set, so that hops from before
        they existed still take the requests that do not use them."""
        d = asdict(self)
        d["logit_bias"] = [[i, b] for i, b in self.logit_bias]
        for name, off in (("min_p", 0.0), ("logit_bias", []), ("grammar", None)):
            if d[name] == off:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Build validated params from a dict that may come from the network.

        Missing keys take their defaults. Unknown keys, wrong types (a string for a
        number, a bool for an int, a float for ``top_k``) and out-of-range values raise
        :class:`ValueError`. Integers are accepted for float fields (JSON has ``1`` for
        ``1.0``) and are converted, so ``from_dict(p.to_dict()) == p`` always holds.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"sampling params must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(map(str, unknown)))}")

        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            if name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
                # bool is an int subclass: reject it explicitly, "temperature": true is a bug.
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{name} must be a number, got {type(value).__name__}")
                value = float(value)
            elif name in ("top_k", "top_logprobs"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
            elif name == "seed":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError(f"seed must be an integer or null, got {type(value).__name__}")
            elif name == "logprobs":
                if not isinstance(value, bool):
                    raise ValueError(f"logprobs must be a boolean, got {type(value).__name__}")
            elif name == "logit_bias":
                value = _logit_bias_pairs(value)
            elif name == "grammar":
                if not isinstance(value, str):
                    raise ValueError(f"grammar must be a string, got {type(value).__name__}")
            kwargs[name] = value
        params = cls(**kwargs)
        params.validate()
        return params


def _logit_bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """``[[id, bias], ...]`` from the wire as pairs; the count is checked before the
    pairs are looked at, so a huge list costs nothing."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"logit_bias must be a list of [token id, bias] pairs, got {type(value).__name__}")
    if len(value) > MAX_LOGIT_BIASES:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIASES} tokens, got {len(value)}")
    pairs = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError("logit_bias must be a list of [token id, bias] pairs")
        token, bias = pair
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ValueError(f"a logit_bias bias must be a number, got {type(bias).__name__}")
        pairs.append((token, float(bias)))
    return tuple(pairs)


def _check_logit_bias(pairs: Any) -> None:
    if not isinstance(pairs, tuple) or len(pairs) > MAX_LOGIT_BIASES:
        raise ValueError(f"logit_bias must be at most {MAX_LOGIT_BIASES} (token id, bias) pairs")
    last = -1
    for token, bias in pairs:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias token ids must be integers >= 0, got {token!r}")
        if token <= last:
            raise ValueError("logit_bias pairs must be sorted by token id, each id once")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX:
            raise ValueError(f"logit_bias biases must lie in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}], got {bias!r}")
        last = token


@dataclass(frozen=True)
class SampledToken:
    """The chosen token and, if asked for, how likely the model found it.

    ``logprob`` and ``top_logprobs`` come from ``log_softmax`` of the *raw* logits,
    before penalties and temperature. ``top_logprobs`` is sorted by logprob, highest
    first, ties broken by the lower token id; it is empty unless requested.
    """

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    spent: float | None = None  # compute seconds the hops report for this step (the rest was network)
