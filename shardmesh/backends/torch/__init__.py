"""The torch backend: a transformers model's blocks ``[start, end)``, batched, with
per-session KV caches, plus sampling and the per-block throughput measurement.

Importing this package does not import torch; its modules do. The names below are its
public modules (``from shardmesh.backends.torch import stage`` loads one).
"""

__all__ = ["kv_attention", "sampling", "stage", "tensors", "throughput", "weights"]
