"""The torch backend: a model's blocks ``[start, end)``, batched, with per-session KV
caches (our own block code for the dense Llama family, transformers' modules for the
rest), plus sampling and the per-block throughput measurement.

Importing this package does not import torch; its modules do. The names below are its
public modules (``from shardmesh.backends.torch import stage`` loads one).
"""

__all__ = ["dense_blocks", "dense_config", "hf_blocks", "kv_attention", "prefill_dtype", "sampling", "sampling_rows", "stage", "tensors", "throughput", "weights"]
