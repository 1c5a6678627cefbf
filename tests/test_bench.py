"""The bench commands run end to end (on a tiny model; their figures are not checked).

Benchmarks print figures and are never timed in tests, but their code must not rot:
`shardmesh bench --mesh` starts real node processes and drives a chain through the same
chain-opener protocol as the gateway, so a change there must keep it working.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_mesh_bench_runs_and_prints_its_figures(tmp_path) -> None:
    from shardmesh.tools.tiny_model import cached_tiny_model

    model = cached_tiny_model("llama", layers=12, hidden=64, context_length=4096)  # room for the 2,048-token prefill
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}  # its own throughput cache and keys
    run = subprocess.run(
        [sys.executable, "-m", "shardmesh", "bench", "--mesh", "--model", str(model), "--tokens", "8", "--repeats", "1", "--dtype", "float32",
         "--threads", "1"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert re.search(r"3-node chain\s+[\d.]+\s+[\d.]+", out), out
    assert re.search(r"added latency per hop .*: -?[\d.]+ ms", out), out
    assert re.search(r"-?[\d.]+ ms from the median decode step", out), out
    assert re.search(r"prefill hop on the wire alone .*: \d+ MB/s", out), out
    assert re.search(r"3-process route\s+[\d.]+ tok/s\s+[\d.]+ of one process", out), out
    assert re.search(r"the 3-node chain reaches [\d.]+ of what the plain 3-process route reaches", out), out
    # One measurement per --threads setting, and only those asked for.
    assert "1 torch thread per process" in out and "default threads" not in out, out


def test_concurrent_bench_runs_every_setup_and_reads_the_stages_batches(tmp_path) -> None:
    from shardmesh.tools.tiny_model import cached_tiny_model

    model = cached_tiny_model("llama", layers=4, hidden=64)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "shardmesh", "bench", "--concurrent", "3,1", "--model", str(model), "--tokens", "4", "--dtype", "float32",
         "--threads", "1"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    setups = ("one node", "2-node chain", "3-node chain", "3-node no trunks")
    rows = re.findall(rf"^\S+ +({'|'.join(setups)}) +(\d+) +([\d.]+) +([\d.]+)x +(.*)$", run.stdout, re.M)
    assert [(setup, int(n)) for setup, n, *_ in rows] == [(s, n) for s in setups for n in (1, 3)], run.stdout
    for setup, sessions, rate, ratio, rest in rows:
        figures = rest.split()
        hops = {"one node": 1, "2-node chain": 2, "3-node chain": 3, "3-node no trunks": 3}[setup]
        processes = hops + (hops > 1)  # the gateway apart from the hops
        # CPU per process, batch per hop, then steps per trunk frame into each hop and tokens per frame back
        assert float(rate) > 0 and len(figures) == processes + hops + hops + 1, run.stdout
        assert all(float(batch) >= 1 for batch in figures[processes : processes + hops]), run.stdout  # each hop's stage ran steps
        per_frame = figures[processes + hops :]
        if setup in ("one node", "3-node no trunks"):  # a gateway sends to itself without trunks
            assert per_frame == ["-"] * len(per_frame), run.stdout
        else:  # every hop's steps and every token came on trunks
            assert all(x != "-" and float(x) >= 1 for x in per_frame), run.stdout
    assert "1 torch thread per process" in run.stdout and "default threads" not in run.stdout


def test_prefill_bench_prints_the_floor_the_chains_and_a_chat_s_turns(tmp_path) -> None:
    from shardmesh.tools.tiny_model import cached_tiny_model

    model = cached_tiny_model("llama", layers=4, hidden=64, context_length=4096)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "shardmesh", "bench", "--prefill", "--model", str(model), "--dtype", "float32"],
                         capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    for dtype in ("bfloat16", "float32"):
        assert re.search(rf"transformers forward, {dtype} +[\d.]+ s", out), out
    for hops in (1, 3):
        assert re.search(rf"{hops}-node chain, time to first token +[\d.]+ s +[\d.]+x transformers' faster dtype", out), out
    for cache in ("on ", "off"):
        line = re.search(rf"^prefix cache {cache} (.*)$", out, re.M)
        assert line is not None, out
        turns = re.findall(r"(\d+): ([\d.]+) s", line.group(1))
        assert [int(t) for t, _ in turns] == list(range(1, 11)) and all(float(s) > 0 for _, s in turns), out
    assert re.search(r"turn 10 [\d.]+ s with, [\d.]+ s without \([\d.]+x\)", out), out


def test_session_counts_are_checked() -> None:
    from shardmesh.cli import _session_counts
    from shardmesh.tools.bench_concurrent import spans

    assert _session_counts("12,1,4") == [1, 4, 12]
    for bad in ("0", "1,1", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _session_counts(bad)
    assert spans(8, 2) == ["0:4", "4:8"] and spans(12, 3) == ["0:4", "4:8", "8:12"] and spans(7, 3) == ["0:2", "2:5", "5:7"]


def test_mesh_report_reads_no_rate_from_a_prefill_lost_in_noise(capsys) -> None:
    """Two prefills differ by their noise as well as by the hops: when the 3-node one
    comes out faster, the report says so instead of printing an infinite rate."""
    from shardmesh.tools.bench_mesh import PLAIN, report

    def chain(prefill: float) -> dict:
        return {"one process": 40.0, "chain": 36.0, "step ms": 27.0, "compute ms": 25.0, "prefill": prefill}

    plain = {"one process": (40.0, 25.0), "1-process route": (39.0, 25.5), "3-process route": (36.0, 27.5)}
    report("t", {"3-node chain": chain(0.500), "1-node chain": chain(0.520), PLAIN: plain}, 3.1)
    out = capsys.readouterr().out
    assert "lost in the noise" in out and "inf" not in out, out
    report("t", {"3-node chain": chain(0.540), "1-node chain": chain(0.520), PLAIN: plain}, 3.1)
    assert "one hop moves 3.1 MB in 10 ms added = 310 MB/s" in capsys.readouterr().out


def test_bench_thread_settings_are_checked() -> None:
    from shardmesh.cli import _thread_settings

    assert _thread_settings("default,1") == [None, 1]
    assert _thread_settings("4") == [4]
    with pytest.raises(argparse.ArgumentTypeError, match="given twice"):
        _thread_settings("2,2")
    run = subprocess.run([sys.executable, "-m", "shardmesh", "bench", "--mesh", "--threads", "0"], capture_output=True, text=True)
    assert run.returncode == 2 and "'0' is not a thread count" in run.stderr, run.stderr


def test_plain_processes_draw_the_tokens_one_process_draws() -> None:
    """The floor ``bench --mesh`` prints is only worth something if the plain processes
    really run the model: the split route draws the one process's greedy tokens."""
    from shardmesh.tools.tiny_model import cached_tiny_model
    from shardmesh.tools.bench_no_mesh import PlainRoute

    model = str(cached_tiny_model("llama", layers=12, hidden=64))
    prompt = [5, 17, 42, 8, 99]
    whole = PlainRoute(model, "float32", ["0:12"], threads=1)
    try:
        split = PlainRoute(model, "float32", ["0:5", "5:9", "9:12"], threads=1)
        try:
            alone = whole.alone(prompt, 12)
            assert len(alone.seconds) == 12
            assert whole.decode(prompt, 12).tokens == alone.tokens
            assert split.decode(prompt, 12).tokens == alone.tokens
        finally:
            split.close()
    finally:
        whole.close()


def test_memory_bench_runs_and_prints_its_figures(tmp_path) -> None:
    """``bench --memory`` starts a serving node and a gateway, and prints every figure
    with its target (the figures themselves depend on the machine)."""
    from shardmesh.tools.tiny_model import cached_tiny_model

    model = cached_tiny_model("llama", layers=4, hidden=64)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}  # its own throughput cache and keys
    run = subprocess.run(
        [sys.executable, "-m", "shardmesh", "bench", "--memory", "--model", str(model), "--dtype", "float32"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert re.search(r"gateway \(--layers none\) RSS\s+[\d.]+ MB\s+target <= 150 MB; torch loaded: (yes|no)", out), out
    assert re.search(r"serving node \(--layers all\) RSS\s+[\d.]+ MB", out), out
    assert re.search(r"  weights\s+[\d.]+ MB", out), out
    assert re.search(r"  KV cache allocated\s+[\d.]+ MB .*budget \d+ MB", out), out
    assert re.search(r"  overhead \(RSS - weights - KV\)\s+-?[\d.]+ MB\s+target <= 350 MB", out), out
