"""The tools on top of the node: benches, ``shardmesh status``, the simulator's command
line, and tiny random models for tests and offline demos.

Nothing below ``tools`` imports it. The names below are its public modules; importing
the package loads none of them (``from shardmesh.tools import bench`` does).
"""

__all__ = [
    "bench",
    "bench_audit",
    "bench_churn",
    "bench_common",
    "bench_concurrent",
    "bench_grammar",
    "bench_internet",
    "bench_memory",
    "bench_mesh",
    "bench_no_mesh",
    "bench_prefill",
    "bench_stage",
    "bench_wan",
    "bench_wire",
    "delay_line",
    "emulated_internet",
    "internet_demo",
    "node_processes",
    "record_flood",
    "reference",
    "sim",
    "soak",
    "status",
    "tiny_build",
    "tiny_config",
    "tiny_model",
    "tiny_tokenizer",
]
