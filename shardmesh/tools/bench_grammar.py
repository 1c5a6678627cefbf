"""``shardmesh bench --grammar``: what constrained decoding costs per token, per engine.

Structured output masks the logits of every sampled token with the tokens a grammar
allows next. The mask is computed on the last hop's compute thread between two steps,
so its cost adds to every token's latency. This bench measures it for each grammar
engine importable here (llguidance, which shardmesh uses; xgrammar, if installed) on
a realistic vocabulary, walking a JSON document that matches the acceptance tests'
schema (nested objects, arrays, enums, required fields) token by token:

* ``tokenizer``: preparing the engine's view of the vocabulary (once per model);
* ``compile``: turning the schema into a matcher (once per request, on the last hop);
* ``mask``: one next-token mask (per token), mean, median, 99th percentile and worst;
* ``apply``: setting the refused tokens' logits to ``-inf`` in torch (per token).

The vocabulary is a byte-level BPE trained here on the Python standard library's
source (present on every machine), 131,072 tokens by default: the size of Llama 3's.
"""

from __future__ import annotations

import json
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["BENCH_SCHEMA", "run_grammar_bench"]

#: Nested objects, arrays, enums, bounded numbers and strings, required fields.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "role": {"enum": ["gateway", "relay", "server"]},
        "blocks": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 127}, "maxItems": 16},
        "peer": {
            "type": "object",
            "properties": {"address": {"type": "string", "maxLength": 64}, "reachable": {"type": "boolean"},
                           "rtt_ms": {"type": "number"}},
            "required": ["address", "reachable"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}},
    },
    "required": ["name", "role", "blocks", "peer"],
    "additionalProperties": False,
}
BENCH_DOCUMENT = json.dumps({
    "name": "the old desktop under the stairs", "role": "server", "blocks": list(range(12, 24)),
    "peer": {"address": "/ip4/198.18.0.7/tcp/4001", "reachable": True, "rtt_ms": 23.5},
    "tags": ["bf16", "avx2", "lan", "always-on"],
})


def _stdlib_tokenizer_json(vocab_size: int, cache: Path) -> str:
    """A byte-level BPE of ``vocab_size`` tokens trained on the stdlib's ``*.py``, cached."""
    path = cache / f"stdlib-bpe-{vocab_size}.json"
    if path.exists():
        return path.read_text()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for file in sorted(root.rglob("*.py")):
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    print(f"training (once) a {vocab_size:,}-token byte-level BPE on {len(texts):,} stdlib files ...", flush=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str())
    return path.read_text()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _summary(name: str, setup: dict[str, float], masks: list[float], apply: list[float]) -> None:
    ms = sorted(1e3 * m for m in masks)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    setup_text = ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in setup.items())
    print(f"{name:12s} {setup_text}; mask per token: mean {statistics.fmean(ms):.3f} ms, median {statistics.median(ms):.3f}, "
          f"p99 {p99:.3f}, worst {ms[-1]:.3f} ({len(ms)} tokens); apply {1e3 * statistics.fmean(apply):.3f} ms", flush=True)


def _walk_llguidance(tokenizer_json: str, schema: dict, doc_ids: list[int], eos: int) -> None:
    import llguidance
    import llguidance.torch as lltorch

    tok, t_tok = _timed(lambda: llguidance.LLTokenizer(tokenizer_json, eos_token=eos))
    grammar = "start: %json " + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}})
    matcher, t_compile = _timed(lambda: llguidance.LLMatcher(tok, grammar, log_level=0))
    assert not matcher.is_error(), matcher.get_error()
    bitmask = lltorch.allocate_token_bitmask(1, tok.vocab_size)
    logits = torch.zeros(1, tok.vocab_size)
    masks, apply = [], []
    for token in doc_ids + [eos]:
        _, t = _timed(lambda: lltorch.fill_next_token_bitmask(matcher, bitmask, 0))
        masks.append(t)
        _, t = _timed(lambda: _apply(logits, bitmask))
        apply.append(t)
        assert matcher.consume_token(token), matcher.get_error()
    _summary("llguidance", {"tokenizer": t_tok, "compile": t_compile}, masks, apply)


def _walk_xgrammar(tokenizer_json: str, schema: dict, doc_ids: list[int], eos: int) -> None:
    import xgrammar
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token="<|endoftext|>")
    info, t_tok = _timed(lambda: xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf)))
    compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    compiled, t_compile = _timed(lambda: compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    logits = torch.zeros(1, info.vocab_size)
    masks, apply = [], []
    for token in doc_ids + [eos]:
        _, t = _timed(lambda: matcher.fill_next_token_bitmask(bitmask))
        masks.append(t)
        _, t = _timed(lambda: _apply(logits, bitmask))
        apply.append(t)
        assert matcher.accept_token(token), f"xgrammar refused token {token}"
    _summary("xgrammar", {"tokenizer": t_tok, "compile": t_compile}, masks, apply)


def _apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    from ..backends.grammar import apply_bitmask

    apply_bitmask(logits[0], bitmask[0])


def run_grammar_bench(vocab_size: int = 131072) -> int:
    from tokenizers import Tokenizer

    cache = Path.home() / ".cache" / "shardmesh" / "bench"
    tokenizer_json = _stdlib_tokenizer_json(vocab_size, cache)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    doc_ids = tokenizer.encode(BENCH_DOCUMENT).ids
    eos = tokenizer.token_to_id("<|endoftext|>")
    print(f"vocabulary {tokenizer.get_vocab_size():,} tokens; document {len(BENCH_DOCUMENT)} characters, "
          f"{len(doc_ids)} tokens; torch threads {torch.get_num_threads()}", flush=True)
    for name, walk in (("llguidance", _walk_llguidance), ("xgrammar", _walk_xgrammar)):
        try:
            __import__(name)
        except ImportError:
            print(f"{name:12s} not installed here", flush=True)
            continue
        walk(tokenizer_json, BENCH_SCHEMA, doc_ids, eos)
    return 0
