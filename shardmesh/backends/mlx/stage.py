"""A range of an mlx-lm model's blocks, served with per-session KV caches.

The MLX twin of :mod:`shardmesh.backends.torch.stage`, for Apple machines (and
CPU-only MLX on Linux). Both speak the :class:`~shardmesh.contract.Stage` protocol, so
torch and MLX stages can sit in one chain: only raw bytes (:class:`RawTensor`) cross
between them.

How it works:

* mlx-lm's own model class is built from ``config.json`` (so attention, RoPE, MoE
  routing are exactly mlx-lm's). MLX is lazy: building the model allocates nothing, and
  ``mx.load`` of a safetensors file only maps it; a tensor is read when it is evaluated.
  We open only the shards that hold the span's tensors (per the index's ``weight_map``),
  keep ``model.layers[start:end]`` (plus ``embed_tokens`` on the first stage, ``norm`` and
  the head on the last), and ``mx.eval`` just those parameters. The rest of the model is
  dropped before anything else is ever computed.
* Each session owns one mlx-lm ``KVCache`` per local layer. We preallocate its arrays
  ourselves (the cache never grows on its own), so the memory a session costs is the
  capacity we chose and can be counted against a byte budget, as the torch stage does.
* Requests run one at a time (MLX's KVCache is one sequence): the results cannot depend
  on what a request was batched with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import _get_classes, load_config  # private helper: pin mlx-lm

from ...contract import BadInput, NonFiniteInput, RawTensor, StageInfo, StepRequest, UnknownSession, check_step
from ..kv_sessions import DEFAULT_CACHE_BUDGET, KVSessions
from ..weights import ModelFiles, block_of, ensure_span_files, span_tensor_names

_MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16, "int64": mx.int64, "int32": mx.int32}
_NAMES = {v: k for k, v in _MX.items()}


def mx_from_raw(raw: RawTensor) -> mx.array:
    """The raw bytes as an mx.array (one copy; nothing pickled). bfloat16 has no numpy
    dtype, so its 2-byte pattern is read as uint16 and reinterpreted by ``view``."""
    if raw.dtype == "bfloat16":
        return mx.array(np.frombuffer(raw.data, np.uint16).reshape(raw.shape)).view(mx.bfloat16)
    return mx.array(np.frombuffer(raw.data, np.dtype(raw.dtype)).reshape(raw.shape))


def raw_from_mx(array: mx.array) -> RawTensor:
    """An mx.array's bytes (bfloat16 as its uint16 pattern)."""
    name = _NAMES.get(array.dtype)
    if name is None:
        raise BadInput(f"dtype {array.dtype} cannot cross the stage boundary")
    host = np.array(array.view(mx.uint16) if name == "bfloat16" else array)
    return RawTensor(name, tuple(array.shape), memoryview(np.ascontiguousarray(host)).cast("B"))


@dataclass
class MlxSession:
    """One session's caches (one ``KVCache`` per layer of its sub-range) and bookkeeping.
    Capacity, not length, is what counts against the budget (see :mod:`.kv_sessions`)."""

    caches: list[KVCache]
    max_length: int
    start: int
    end: int
    bytes_per_token: int
    capacity: int = 0
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)


class MlxStage(KVSessions):
    """Blocks ``[start, end)`` of a Hugging Face-layout model, run by mlx-lm."""

    backend = "mlx"

    def __init__(
        self,
        files: ModelFiles,
        start: int,
        end: int | None = None,
        *,
        model_name: str = "model",
        dtype: str = "auto",
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET,
    ) -> None:
        config = load_config(files.root)
        total = config["num_hidden_layers"]
        end = total if end is None else end
        if not 0 <= start < end <= total:
            raise ValueError(f"span [{start}, {end}) is not inside the model's {total} blocks")
        if "quantization" in config or "quantization_config" in config:
            raise ValueError("quantized checkpoints are not supported by MlxStage yet")
        # transformers 5 nests the rope base under rope_parameters; mlx-lm's Qwen2 and
        # others read only rope_theta and silently fall back to their own default.
        rope = config.get("rope_parameters") or {}
        if "rope_theta" not in config and "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        self.config, self.start, self.end = config, start, end
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))  # lazy: no weights exist yet

        # Only the span's tensors, from only the shards that hold them (mx.load is lazy).
        tied = "lm_head.weight" not in files.weight_map
        names = span_tensor_names(files.weight_map, start, end, total, tied)
        ensure_span_files(files, names)
        loaded: dict[str, mx.array] = {}
        for file_name in sorted(files.files_for(names)):
            loaded.update(mx.load(str(files.root / file_name)))
        weights = {n: loaded[n] for n in names}
        files.reads.extend(names)
        weights = _sanitize_span(model, weights, start)

        inner = model.model
        self.layers: list[Any] = list(inner.layers[start:end])
        self.embed = inner.embed_tokens if start == 0 else None
        self.norm = inner.norm if end == total else None
        self.head: Callable[[mx.array], mx.array] | None = None
        if end == total:
            self.head = model.lm_head if hasattr(model, "lm_head") else inner.embed_tokens.as_linear
        kept = {f"model.layers.{start + i}": layer for i, layer in enumerate(self.layers)}
        if self.embed is not None or (self.head is not None and tied):
            kept["model.embed_tokens"] = inner.embed_tokens
        if self.norm is not None:
            kept["model.norm"] = self.norm
        if self.head is not None and not tied:
            kept["lm_head"] = model.lm_head
        needed = {f"{p}.{n}" for p, m in kept.items() for n, _ in tree_flatten(m.parameters())}
        missing = needed - weights.keys()
        if missing:
            raise RuntimeError(f"tensors not found in the checkpoint: {sorted(missing)[:8]}")
        model.load_weights([(k, v) for k, v in weights.items() if k in needed], strict=False)
        del model, inner, loaded, weights  # the other blocks' (lazy) arrays go with them

        stored = next(iter(kept.values())).parameters()
        stored_dtype = tree_flatten(stored)[0][1].dtype
        self.dtype = stored_dtype if dtype == "auto" else _MX[dtype]
        for module in kept.values():
            module.set_dtype(self.dtype)  # casts floating-point parameters only
            mx.eval(module.parameters())  # materialize exactly the kept weights

        self.hidden_size = config["hidden_size"]
        self.num_kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        self.head_dim = config.get("head_dim") or self.hidden_size // config["num_attention_heads"]
        self.windows = _layer_windows(config)
        self.info = StageInfo(
            model=model_name, start=start, end=end, total_blocks=total, hidden_size=self.hidden_size,
            vocab_size=config["vocab_size"], dtype=_NAMES[self.dtype],
            device="gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu", backend=self.backend,
        )
        self._init_sessions(
            cache_budget_bytes,
            bytes_per_token_per_layer=2 * self.num_kv_heads * self.head_dim * self.dtype.size,
            context_limit=config.get("max_position_embeddings"),
        )

    # -- sessions -------------------------------------------------------------------

    def open(self, session_id: str, max_length: int, start: int | None = None, end: int | None = None) -> None:
        """Start a session over blocks ``[start, end)`` (default: the whole span), if
        its first chunk of cache fits the budget (see :meth:`KVSessions._admit`)."""
        with self._lock:
            start, end, bytes_per_token = self._admit(session_id, max_length, start, end)
            self.sessions[session_id] = MlxSession([KVCache() for _ in range(end - start)], max_length, start, end, bytes_per_token)

    def _make_room(self, session: MlxSession, needed: int) -> None:
        """Grow the session's caches to hold ``needed`` tokens, or refuse and change nothing.
        We grow the KVCache arrays ourselves so mlx-lm never reallocates behind our back."""
        capacity = self._capacity_for(session, needed)
        if capacity is None:
            return
        shape = (1, self.num_kv_heads, capacity, self.head_dim)
        for cache in session.caches:
            keys, values = mx.zeros(shape, self.dtype), mx.zeros(shape, self.dtype)
            if cache.keys is not None and session.length:
                keys[..., : session.length, :] = cache.keys[..., : session.length, :]
                values[..., : session.length, :] = cache.values[..., : session.length, :]
            cache.keys, cache.values = keys, values
        session.capacity = capacity

    # -- compute --------------------------------------------------------------------

    def _checked_inputs(self, req: StepRequest) -> tuple[MlxSession, mx.array]:
        """Validate like the torch stage (same error classes), then make room in the cache."""
        session = self.sessions.get(req.session_id)
        if session is None:
            raise UnknownSession(f"unknown session {req.session_id!r}")
        raw = req.inputs
        check_step(req, embeds=session.start == 0, hidden_size=self.hidden_size, length=session.length, max_length=session.max_length)
        array = mx_from_raw(raw)
        if session.start == 0:
            ids = np.frombuffer(raw.data, np.dtype(raw.dtype))
            if int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size:
                raise BadInput(f"token ids must lie in [0, {self.info.vocab_size})")
            array = array.astype(mx.int32)  # mlx embedding lookups take int32 indices
        elif not mx.all(mx.isfinite(array)).item():
            # As in the torch stage: NaN or inf from upstream is the sender's fault, and
            # must not reach this session's cache.
            raise NonFiniteInput("the hidden states received hold NaN or infinity")
        return session, array

    def step(self, batch: Sequence[StepRequest]) -> list[RawTensor]:
        """Run each request on its own, in order. All are validated (and cache room made)
        before any runs, so a refused batch changes no session's length."""
        if len({r.session_id for r in batch}) != len(batch):
            raise BadInput("a session may appear only once per batch")
        with self._lock:
            checked = [self._checked_inputs(r) for r in batch]
            for req, (session, array) in zip(batch, checked):
                self._make_room(session, req.position + array.shape[0])
            results = [self._forward(session, array, req.position, req.draft) for req, (session, array) in zip(batch, checked)]
        return results

    def _mask(self, layer_index: int, n: int, offset: int) -> mx.array | str | None:
        """What mlx-lm would pass: ``"causal"`` for a prefill, nothing for one token; an
        explicit mask when a sliding window cuts into the keys. Our caches keep every key
        (no rotation), so the window is enforced by the mask alone, like transformers."""
        window = self.windows[layer_index]
        if window is not None and offset + n > window:
            return create_causal_mask(n, offset, window_size=window)
        return "causal" if n > 1 else None

    def _forward(self, session: MlxSession, inputs: mx.array, offset: int, draft: int) -> RawTensor:
        """Blocks over ``inputs`` from ``offset`` on; a cache that holds more (rejected
        draft tokens) is cut back to ``offset`` first, as mlx-lm's ``trim`` does."""
        n = inputs.shape[0]
        for cache in session.caches:
            cache.offset = offset
        hidden = self.embed(inputs[None]) if session.start == 0 else inputs[None].astype(self.dtype)
        for i, cache in zip(range(session.start, session.end), session.caches):
            hidden = self.layers[i - self.start](hidden, self._mask(i, n, offset), cache=cache)
        if session.end < self.info.total_blocks:
            out = hidden[0]
        else:
            out = self.head(self.norm(hidden[:, -(draft + 1) :, :]))[0].astype(mx.float32)
            out = out[0] if draft == 0 else out
        # Evaluate now: keeps the lazy graph one step deep and the caches concrete.
        mx.eval(out, *[c.keys for c in session.caches], *[c.values for c in session.caches])
        session.length = offset + n
        session.last_used = time.monotonic()
        return raw_from_mx(out)


def _sanitize_span(model: Any, weights: dict[str, mx.array], start: int) -> dict[str, mx.array]:
    """Run the model's ``sanitize`` (e.g. stacking per-expert MoE tensors) on a span.

    Some sanitizers only look for layer 0's tensors (Mixtral's does) before converting
    every layer, so we renumber the span's blocks from 0 for the call and back after.
    """
    if not hasattr(model, "sanitize"):
        return weights

    def renumber(w: dict[str, mx.array], shift: int) -> dict[str, mx.array]:
        out = {}
        for name, value in w.items():
            block = block_of(name)
            if block is not None:
                name = name.replace(f"layers.{block}.", f"layers.{block + shift}.", 1)
            out[name] = value
        return out

    return renumber(model.sanitize(renumber(weights, -start)), start)


def _layer_windows(config: dict[str, Any]) -> list[int | None]:
    """Sliding-window size per global layer (None = full attention), from the config
    the way transformers reads it: ``layer_types`` when present, else (Mistral/Mixtral)
    one ``sliding_window`` for every layer. mlx-lm's Qwen2/Mixtral ignore windows; we
    follow transformers so torch and MLX stages agree."""
    total, window = config["num_hidden_layers"], config.get("sliding_window")
    types = config.get("layer_types")
    if window is None or config.get("use_sliding_window") is False:
        return [None] * total
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window if config["model_type"] in ("mistral", "mixtral") else None] * total
