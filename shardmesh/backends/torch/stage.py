"""A range of a model's blocks, served with per-session KV caches.

How it works:

* The stage's blocks are built on the ``meta`` device from the model's config: our own
  block code for the dense Llama family (:mod:`.dense_blocks`), transformers' modules
  for the rest (:mod:`.hf_blocks`). Then exactly the tensors they need are read from
  safetensors.
* We run the decoder layers ourselves. Each layer's attention goes through
  :mod:`.kv_attention`, which writes the new keys and values into the session's
  preallocated cache and attends over it. No transformers ``Cache`` object is
  involved, so sessions with different past lengths share one batched forward pass:
  projections and MLPs run as one batch, attention per session against its own cache.
* Positions are explicit: a request says where its tokens start, and the stage refuses
  a position beyond the session's cache. One before its end drops the cached tokens
  from there on (a speculative step's rejected drafts): the next step writes over them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from . import dense_blocks, hf_blocks, kv_attention
from .dense_config import dense_config, is_dense, read_raw
from ...contract import BadInput, check_step, NonFiniteInput, RawTensor, StageInfo, StepRequest, UnknownSession
from ..kv_sessions import DEFAULT_CACHE_BUDGET, KVSessions
from ..weights import ModelFiles, ensure_span_files, span_tensor_names
from .prefill_dtype import PREFILL_PHASE_TOKENS, Upcast, pick_prefill_dtype
from .tensors import raw_from_tensor, tensor_from_raw, torch_dtype
from .weights import load_span_state


def pick_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, config, device: torch.device) -> torch.dtype:
    """``auto`` keeps the checkpoint's dtype, except float16 on CPU (slow there) → bfloat16."""
    if dtype != "auto":
        return torch_dtype(dtype)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(stored, str):
        stored = torch_dtype(stored)
    if device.type == "cpu" and stored == torch.float16:
        return torch.bfloat16
    return stored


@dataclass
class SessionCache:
    """Keys and values of one session, one pair per local layer, grown on demand
    (how much, and what counts against the budget: :mod:`.kv_sessions`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    max_length: int
    start: int  # the blocks [start, end) this session runs here: a route may enter or
    end: int  # leave a server anywhere inside its span
    bytes_per_token: int
    length: int = 0  # tokens already in the cache
    last_used: float = 0.0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def grow(self, capacity: int) -> None:
        self.keys = [_grown(t, capacity, self.length) for t in self.keys]
        self.values = [_grown(t, capacity, self.length) for t in self.values]


def _grown(t: torch.Tensor, capacity: int, used: int) -> torch.Tensor:
    out = torch.zeros((*t.shape[:2], capacity, t.shape[3]), dtype=t.dtype, device=t.device)
    out[:, :, :used] = t[:, :, :used]
    return out


class TorchStage(KVSessions):
    """Blocks ``[start, end)`` of a Hugging Face causal LM on one device."""

    backend = "torch"
    caches_prefixes = True

    def __init__(
        self,
        files: ModelFiles,
        start: int,
        end: int | None = None,
        *,
        model_name: str = "model",
        dtype: str = "auto",
        device: str = "auto",
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET,
        prefill_dtype: str = "auto",
    ) -> None:
        raw = read_raw(files.root)
        dense = is_dense(raw)
        if dense:
            config = dense_config(raw)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(files.root)
        total = config.num_hidden_layers
        end = total if end is None else end
        if not 0 <= start < end <= total:
            raise ValueError(f"span [{start}, {end}) is not inside the model's {total} blocks")
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, config, self.device)
        # Long steps may compute in another dtype (prefill_dtype.py): float32 where bf16 is emulated.
        self.prefill_dtype = pick_prefill_dtype(prefill_dtype, self.dtype, self.device, dtype_forced=dtype != "auto")
        self._upcast = Upcast(self.prefill_dtype)
        if self.device.type == "cuda":
            # cuDNN's attention plans each new key length once, tens of ms each: a decode
            # meets a new length every step (docs/PERFORMANCE.md, "On a GPU"). Flash and
            # memory-efficient attention need no plan. The switch is process-wide.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.config = config
        self.start, self.end = start, end

        if dense:
            with torch.device("meta"):
                self.module: nn.Module = dense_blocks.DenseStageModule(config, start, end).eval()
        else:
            self.module = hf_blocks.build(config, start, end, self.dtype).eval()

        tied = bool(getattr(config, "tie_word_embeddings", False))
        names = span_tensor_names(files.weight_map, start, end, total, tied)
        ensure_span_files(files, names)
        state = load_span_state(files, names, self.module, config, start)
        self.module.load_state_dict(state, strict=False, assign=True)
        self.module.rotary_emb = None  # built below, never cast
        self.module.to(device=self.device, dtype=self.dtype)
        if tied and self.module.embed_tokens is not None and self.module.lm_head is not None:
            # One matrix, as in the checkpoint: the cast above made two copies of it.
            self.module.lm_head.weight = self.module.embed_tokens.weight
        # The rotary module's inv_freq is computed, not stored: rebuild it for real, in
        # float32 as transformers keeps it (casting it would change the logits).
        with torch.device(self.device):
            self.module.rotary_emb = self.module.make_rotary(config)
        self._check_no_meta()

        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.num_kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.info = StageInfo(
            model=model_name,
            start=start,
            end=end,
            total_blocks=total,
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            backend=self.backend,
        )
        self._init_sessions(
            cache_budget_bytes,
            bytes_per_token_per_layer=2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize,
            context_limit=getattr(config, "max_position_embeddings", None),
        )

    # -- loading helpers ------------------------------------------------------------

    def _check_no_meta(self) -> None:
        missing = [n for n, t in list(self.module.named_parameters()) + list(self.module.named_buffers()) if t.is_meta]
        if missing:
            raise RuntimeError(f"tensors not found in the checkpoint: {missing[:8]}")

    # -- sessions -------------------------------------------------------------------

    def open(self, session_id: str, max_length: int, start: int | None = None, end: int | None = None) -> None:
        """Start a session over blocks ``[start, end)`` (default: the whole span), if
        its first chunk of cache fits the budget (see :meth:`KVSessions._admit`)."""
        with self._lock:
            start, end, bytes_per_token = self._admit(session_id, max_length, start, end)
            empty = torch.zeros((1, self.num_kv_heads, 0, self.head_dim), dtype=self.dtype, device=self.device)
            self.sessions[session_id] = SessionCache(
                keys=[empty] * (end - start),
                values=[empty] * (end - start),
                max_length=max_length,
                start=start,
                end=end,
                bytes_per_token=bytes_per_token,
                last_used=time.monotonic(),
            )

    def _copy_prefix(self, session: SessionCache, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [k[:, :, :n].clone() for k in session.keys], [v[:, :, :n].clone() for v in session.values]

    def _load_prefix(self, session: SessionCache, kv: tuple[list[torch.Tensor], list[torch.Tensor]], n: int, capacity: int | None) -> None:
        if capacity is not None:
            session.grow(capacity)
        keys, values = kv
        for mine, cached in zip(session.keys + session.values, keys + values):
            mine[:, :, :n] = cached[:, :, :n]

    # -- compute --------------------------------------------------------------------

    def _checked_inputs(self, req: StepRequest) -> tuple[SessionCache, torch.Tensor]:
        cache = self.sessions.get(req.session_id)
        if cache is None:
            raise UnknownSession(f"unknown session {req.session_id!r}")
        raw = req.inputs
        n = check_step(req, embeds=cache.start == 0, hidden_size=self.info.hidden_size, length=cache.length, max_length=cache.max_length)
        tensor = tensor_from_raw(raw)
        if cache.start == 0:
            tensor = tensor.to(torch.int64)
            if int(tensor.min()) < 0 or int(tensor.max()) >= self.info.vocab_size:
                raise BadInput(f"token ids must lie in [0, {self.info.vocab_size})")
        elif not bool(torch.isfinite(tensor).all()):
            # One reduction per step, before the cache grows: NaN or inf from upstream
            # would poison this session's KV cache and every hop after us.
            raise NonFiniteInput("the hidden states received hold NaN or infinity")
        if (capacity := self._capacity_for(cache, req.position + n)) is not None:
            cache.grow(capacity)
        return cache, tensor

    def step(self, batch: Sequence[StepRequest]) -> list[RawTensor]:
        """Run one step for each request; requests with equal token counts share a forward."""
        if len({r.session_id for r in batch}) != len(batch):
            raise BadInput("a session may appear only once per batch")
        with self._lock:
            checked = [self._checked_inputs(r) for r in batch]
            results: list[RawTensor | None] = [None] * len(batch)
            groups: dict[tuple[int, int, int, int], list[int]] = {}
            for i, (cache, tensor) in enumerate(checked):
                groups.setdefault((tensor.shape[0], cache.start, cache.end, batch[i].draft), []).append(i)
            for (_, start, end, draft), rows in groups.items():
                caches = [checked[i][0] for i in rows]
                inputs = torch.stack([checked[i][1] for i in rows])
                positions = [batch[i].position for i in rows]
                outputs = self._forward(inputs, caches, positions, start, end, draft)
                for i, out in zip(rows, outputs):
                    results[i] = out
            now = time.monotonic()
            for req, (cache, tensor) in zip(batch, checked):
                cache.length = req.position + tensor.shape[0]
                cache.last_used = now
        return results  # type: ignore[return-value]

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every row. Dynamic RoPE variants rescale by the longest position
        they are given, so for them each session gets its own call: a session's output
        must not depend on who it was batched with."""
        rotary = self.module.rotary_emb
        if hidden.shape[0] == 1 or getattr(rotary, "rope_type", "default") not in ("dynamic", "longrope"):
            return rotary(hidden, position_ids)
        rows = [rotary(hidden[i : i + 1], position_ids[i : i + 1]) for i in range(hidden.shape[0])]
        return torch.cat([cos for cos, _ in rows]), torch.cat([sin for _, sin in rows])

    def run_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        """One of this stage's layers on ``hidden``, in ``hidden``'s dtype: the weights
        as they are, or upcast for a prefill phase in another dtype (prefill_dtype.py)."""
        if hidden.dtype == self.dtype:
            return layer(hidden, **extra)
        return torch.func.functional_call(layer, self._upcast.params(layer), (hidden,), extra)

    @torch.inference_mode()
    def _forward(
        self, inputs: torch.Tensor, caches: list[SessionCache], positions: list[int], start: int, end: int, draft: int = 0
    ) -> list[RawTensor]:
        m = self.module
        n = inputs.shape[1]
        compute = self.prefill_dtype if n >= PREFILL_PHASE_TOKENS else self.dtype
        if start == 0:
            hidden = m.embed_tokens(inputs.to(self.device)).to(compute)
        else:
            hidden = inputs.to(device=self.device, dtype=compute)
        position_ids = torch.tensor(positions, device=self.device)[:, None] + torch.arange(n, device=self.device)
        position_embeddings = self._rotary(hidden, position_ids)
        step = kv_attention.StepCaches(
            keys=[c.keys for c in caches],
            values=[c.values for c in caches],
            positions=positions,
            first_layer=start,
        )
        extra = {"attention_mask": None, "position_ids": position_ids, "position_embeddings": position_embeddings, "shardmesh_step": step}
        for layer in m.layers[start - self.start : end - self.start]:
            hidden = self.run_layer(layer, hidden, extra)
        hidden = hidden.to(self.dtype)
        if end < self.info.total_blocks:
            return [raw_from_tensor(row) for row in hidden]
        last = m.norm(hidden[:, -(draft + 1) :, :])
        logits = m.lm_head(last).float()
        return [raw_from_tensor(row[0] if draft == 0 else row) for row in logits]
