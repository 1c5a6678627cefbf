"""What every bench shares: the bench model, its prompt, and how decode speed is timed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from ..api.generate import Finished, GenerationRequest, Generator
from ..contract import SamplingParams

BENCH_MODEL = dict(arch="llama", layers=12, hidden=768, heads=12, kv_heads=4, intermediate=2048, vocab_size=16384, context_length=4096)


@dataclass
class Figure:
    name: str
    tokens_per_s: float
    note: str = ""


def bench_model_path(model: str | None) -> Path:
    if model:
        return Path(model)
    from .tiny_model import cached_tiny_model

    print("building (once) the 100M-parameter tiny Llama: hidden 768, 12 layers ...", flush=True)
    return cached_tiny_model(**BENCH_MODEL)


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """The same pseudo-random prompt in every run and process (one per ``seed``)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n,), generator=g).tolist()


async def decode_rate(generator: Generator, prompt: list[int], tokens: int) -> float:
    """Greedy decode tokens/s of ``generator`` after ``prompt``, from the first
    generated token to the last (the prompt's prefill is left out)."""
    req = GenerationRequest(prompt, tokens, SamplingParams(temperature=0.0))
    first = last = None
    count = 0
    async for event in generator.stream(req):
        if isinstance(event, Finished):
            break
        count += 1
        last = time.perf_counter()
        if first is None:
            first = last
    assert count == tokens, f"generated {count} of {tokens} tokens (eos?)"
    return (count - 1) / (last - first)


async def http_decode_rate(url: str, model: str, prompt: str, tokens: int, **fields) -> float:
    """Greedy decode tokens/s of a gateway's streamed ``/v1/completions``, as a client
    reads it; ``fields`` go into the request body (e.g. ``speculative=False``)."""
    import httpx

    # logprobs make every token its own chunk (a token whose text is held back, such as
    # half a UTF-8 character, sends none otherwise), so chunks count tokens exactly.
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "logprobs": 1, **fields}
    first = last = None
    count = 0
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("finish_reason") is None:
                    count += len(chunk["choices"][0]["logprobs"]["tokens"])
                    last = time.perf_counter()
                    if first is None:
                        first = last
    assert count == tokens, f"received {count} of {tokens} tokens"
    return (count - 1) / (last - first)


async def gateway_model(url: str, wait: float = 120.0) -> str:
    """The gateway's model id, once it has a complete chain (within ``wait`` s)."""
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        deadline = time.monotonic() + wait
        while (await client.get(url + "/health")).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no complete chain within {wait:.0f} s")
            await trio.sleep(1)
        return (await client.get(url + "/v1/models")).json()["data"][0]["id"]


async def http_ttft(url: str, model: str, prompt: list[int]) -> float:
    """Seconds from sending a completion request (token ids) to its first streamed
    token. The answer (two tokens) is read to its end, as a chat client would."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    first = None
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"a {len(prompt)}-token prompt: {resp.status_code} {(await resp.aread()).decode()[:300]}")
            async for line in resp.aiter_lines():
                if first is None and line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                    first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no token came back")
    return first
