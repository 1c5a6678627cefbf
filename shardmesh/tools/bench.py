"""``shardmesh bench``: decode speed of our paths next to transformers ``generate``.

All figures come from one run on one machine, same weights, same dtype, same threads:

* ``generate``: ``AutoModelForCausalLM.generate``, greedy, the reference.
* ``stage``: our one-node path as the gateway runs it (generation loop → step batcher →
  torch stage on the compute thread → sampling), without HTTP.
* ``http``: the same through the OpenAI gateway (hypercorn, SSE), read by a client in
  the same process, so client parsing is counted against us.
* ``batch``: several concurrent sessions through the step batcher; aggregate tokens/s.

Decode speed excludes the prompt: it is measured from the first generated token to the
last. The paths take turns, ``--repeats`` rounds, and each path's best run is reported.
Every torch call (ours and ``generate``) runs on the one compute thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import trio

from .bench_common import Figure, bench_model_path, decode_rate, http_decode_rate, prompt_ids


class GenerateReference:
    """transformers ``generate`` on the same weights: the figure to compare against."""

    def __init__(self, path: Path, dtype: torch.dtype, prompt: list[int], device: str) -> None:
        from transformers import AutoModelForCausalLM

        # On the stage's device: a GPU stage against a CPU reference would be no comparison.
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.ids = torch.tensor([prompt], device=device)
        self.params_m = sum(p.numel() for p in self.model.parameters()) / 1e6

    def _timed(self, n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out.shape[1] == self.ids.shape[1] + n
        return time.perf_counter() - t0

    def decode_rate(self, tokens: int) -> float:
        """Decode tokens/s: a full run minus a prefill-plus-first-token run."""
        first = self._timed(1)
        return (tokens - 1) / (self._timed(tokens) - first)


async def bench_ours(path: Path, dtype: str, prompt: list[int], tokens: int, repeats: int, sessions: int) -> list[Figure]:
    from ..api.app import create_app, serve
    from ..api.generate import Generator
    from ..backends.compute_thread import compute_thread
    from ..backends.local_chain import LocalChains
    from ..backends.batcher import StepBatcher
    from ..backends.torch.stage import TorchStage
    from ..backends.weights import resolve_local
    from transformers import AutoTokenizer

    compute = compute_thread()  # torch runs on this one thread, for both paths
    stage = await compute.run(lambda: TorchStage(resolve_local(str(path)), 0, dtype=dtype, model_name="bench"))
    reference = await compute.run(GenerateReference, path, getattr(torch, dtype), prompt, stage.info.device)
    batcher = StepBatcher(stage)
    tokenizer = AutoTokenizer.from_pretrained(path)
    generator = Generator("bench", tokenizer, 1 << 20, LocalChains([batcher]), frozenset())
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        port = await nursery.start(serve, create_app(generator), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        text = tokenizer.decode(prompt)
        await compute.run(reference.decode_rate, 4)  # warm-up
        await decode_rate(generator, prompt, 4)

        # Interleaved, so that a slow moment of the machine hits every path alike.
        best = {"generate": 0.0, "stage": 0.0, "http": 0.0}
        for _ in range(repeats):
            best["generate"] = max(best["generate"], await compute.run(reference.decode_rate, tokens))
            best["stage"] = max(best["stage"], await decode_rate(generator, prompt, tokens))
            best["http"] = max(best["http"], await http_decode_rate(url, "bench", text, tokens))
        figures = [
            Figure("transformers generate", best["generate"], f"{reference.params_m:.0f}M parameters"),
            Figure("shardmesh one-node stage path", best["stage"]),
            Figure("shardmesh one-node via HTTP (SSE)", best["http"], "client in the same process"),
        ]

        rates: list[float] = []

        async def one() -> None:
            rates.append(await decode_rate(generator, prompt, tokens))

        before = batcher.batched_requests, batcher.batches
        t0 = time.perf_counter()
        async with trio.open_nursery() as group:
            for _ in range(sessions):
                group.start_soon(one)
        elapsed = time.perf_counter() - t0
        reqs, batches = batcher.batched_requests - before[0], batcher.batches - before[1]
        figures.append(
            Figure(
                f"shardmesh {sessions} concurrent sessions (aggregate)",
                sessions * tokens / elapsed,
                f"mean batch {reqs / max(1, batches):.1f}; includes prefills",
            )
        )
        nursery.cancel_scope.cancel()
    return figures


def run_bench(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.concurrent:  # node processes only, for one or two models
        from .bench_concurrent import default_models, run_concurrent_bench

        return run_concurrent_bench(default_models(args.model), args.dtype, args.concurrent, args.tokens, args.threads)
    if args.grammar:  # no model: the grammar engines over a trained vocabulary
        from .bench_grammar import run_grammar_bench

        return run_grammar_bench()
    path = bench_model_path(args.model)
    if args.memory:  # node processes only: nothing below (transformers, a stage) is needed
        from .bench_memory import run_memory_bench

        return run_memory_bench(path, args.dtype)
    if args.prefill:  # transformers in this process, then node processes
        from .bench_prefill import run_prefill_bench

        return run_prefill_bench(path, args.dtype)
    if args.stage:  # the stage alone
        from .bench_stage import run_stage_bench

        return run_stage_bench(path, args.dtype, args.device)
    if args.wan:  # node processes behind delay lines
        from .bench_wan import run_wan_bench

        return run_wan_bench(path, args.dtype, args.tokens, args.repeats, args.hops, args.delay_ms, args.draft_k)
    if args.internet:  # node processes in network namespaces
        from .bench_internet import run_internet_bench

        return run_internet_bench(path, args.dtype, args.tokens, args.repeats)
    if args.audit:
        from .bench_audit import run_audit_bench

        return run_audit_bench(path, args.dtype, args.tokens)
    if args.churn:
        from .bench_churn import run_churn_bench

        return run_churn_bench(path, args.dtype, args.churn)
    from transformers import AutoConfig

    from ..backends.torch.stage import pick_device

    vocab = AutoConfig.from_pretrained(path).vocab_size
    prompt = prompt_ids(vocab, args.prompt_tokens)
    print(
        f"model {path}\ndtype {args.dtype}, device {pick_device('auto')}, torch threads {torch.get_num_threads()}, "
        f"prompt {args.prompt_tokens} tokens, decode {args.tokens} tokens, best of {args.repeats}",
        flush=True,
    )
    if args.mesh:
        from .bench_mesh import run_mesh_bench

        return run_mesh_bench(path, args.dtype, prompt, args.tokens, args.repeats, args.threads)
    figures = trio.run(bench_ours, path, args.dtype, prompt, args.tokens, args.repeats, args.sessions)
    reference = figures[0]
    print(f"\n{'path':44s} {'decode tok/s':>12s} {'vs generate':>12s}")
    for fig in figures:
        ratio = fig.tokens_per_s / reference.tokens_per_s
        print(f"{fig.name:44s} {fig.tokens_per_s:12.1f} {ratio:12.2f}  {fig.note}")
    return 0
