"""``shardmesh bench --stage``: the torch stage alone, on its device, no chain around it.

A whole model in one stage (the bench model unless ``--model``), stepped directly:

* a decode step (one token per session) at batch 1, 8 and 32, with the tokens/s each
  batch gives, then batch 1 again: a first pass meets every key length for the first
  time, the second has seen them (a backend that prepares work per shape shows here);
* one session's step of one token plus 0, 4 and 8 draft tokens (speculative
  decoding): what checking drafts costs a hop;
* a prefill of 512 and 2,048 tokens.

On a GPU the device is kept busy for three seconds first, so that its clocks are up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

STEPS = 100  # decode steps timed per figure


def run_stage_bench(path: Path, dtype: str, device: str = "auto") -> int:
    import torch

    from ..backends.torch.stage import TorchStage
    from ..backends.torch.tensors import raw_from_tensor
    from ..backends.weights import resolve_local
    from ..contract import StepRequest

    stage = TorchStage(resolve_local(str(path)), 0, None, dtype=dtype, device=device)
    on_gpu = stage.device.type == "cuda"
    sync: Callable[[], None] = torch.cuda.synchronize if on_gpu else (lambda: None)
    print(f"one stage of all {stage.info.total_blocks} blocks on {stage.info.device} in {stage.info.dtype}, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    if on_gpu:
        a = torch.randn(4096, 4096, device=stage.device, dtype=torch.bfloat16)
        until = time.monotonic() + 3
        while time.monotonic() < until:
            a @ a
        sync()
    generator = torch.Generator().manual_seed(0)

    def ids(n: int):
        return raw_from_tensor(torch.randint(10, 700, (n,), generator=generator))

    def ms_per_call(fn: Callable[[], None], calls: int) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - t0) / calls * 1000

    for n, batch in enumerate((1, 8, 32, 1)):
        sessions = [f"decode{n}-{i}" for i in range(batch)]
        for s in sessions:
            stage.open(s, 4096)
            stage.step([StepRequest(s, ids(32), 0)])
        position = [32]

        def decode() -> None:
            stage.step([StepRequest(s, ids(1), position[0]) for s in sessions])
            position[0] += 1

        ms = ms_per_call(decode, STEPS)
        again = " (again: its key lengths seen before)" if n == 3 else ""
        print(f"decode, batch {batch:2d}: {ms:6.2f} ms per step, {batch * 1000 / ms:6.0f} tokens/s{again}", flush=True)
        for s in sessions:
            stage.close(s)
    for draft in (0, 4, 8):
        stage.open("spec", 4096)
        stage.step([StepRequest("spec", ids(32), 0)])
        # Always from position 32: each step drops the one before (a rejected run).
        ms = ms_per_call(lambda: stage.step([StepRequest("spec", ids(draft + 1), 32, draft=draft)]), STEPS)
        print(f"one session, 1 token + {draft} drafts: {ms:6.2f} ms per step", flush=True)
        stage.close("spec")
    for n in (512, 2048):
        def prefill() -> None:
            stage.open("prefill", 4096)
            stage.step([StepRequest("prefill", ids(n), 0)])
            stage.close("prefill")

        ms = ms_per_call(prefill, 3)
        print(f"prefill of {n:5d} tokens: {ms:8.1f} ms, {n * 1000 / ms:8.0f} tokens/s", flush=True)
    return 0
