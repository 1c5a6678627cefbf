"""The MLX backend: the same stage as ``backends/torch/`` on mlx-lm, for Apple silicon
(and CPU-only MLX on Linux). It chains with torch stages: only raw bytes cross.

Importing this package does not import mlx; its module does
(``from shardmesh.backends.mlx import stage``).
"""

__all__ = ["stage"]
