"""The compute: a model's blocks as stages with per-session KV caches, and sampling.

The modules here are shared by both backends: the one compute thread, the step batcher,
the KV-cache budget, model files and their footprint, and the adapters that present a
stage to the mesh (``hop_compute``) and to the gateway (``local_chain``). torch code
lives in ``backends/torch/``, MLX code in ``backends/mlx/``. This room sees only the
contract. See ``docs/ARCHITECTURE.md``, "Compute on one node".

The names below are this room's public modules and subpackages; importing the package
loads none of them, and so no tensor library (``from shardmesh.backends import
batcher`` does).
"""

__all__ = [
    "batch_stats",
    "batcher",
    "compute_thread",
    "draft_model",
    "footprint",
    "grammar",
    "hop_compute",
    "kv_sessions",
    "local_chain",
    "memory_release",
    "mlx",
    "prefix_cache",
    "sampler_state",
    "torch",
    "weights",
]
