"""A stage's prefix cache: a session that starts like a finished one reuses exactly the
whole blocks they share, within the KV budget, and answers as if it had computed them."""

from __future__ import annotations

import random

import pytest
import torch

from shardmesh.backends.prefix_cache import CachedPrefix, PrefixCache
from shardmesh.backends.torch.stage import TorchStage
from shardmesh.backends.torch.tensors import raw_from_tensor, tensor_from_raw
from shardmesh.backends.weights import resolve_local
from shardmesh.contract import StepRequest
from shardmesh.contract.prefixes import PREFIX_BLOCK, prefix_names
from shardmesh.tools.tiny_model import ARCHS, cached_tiny_model

LAYERS = 4
B = PREFIX_BLOCK


def stages(arch: str = "llama", cuts=(0, 2, LAYERS), **kwargs) -> list[TorchStage]:
    path = resolve_local(str(cached_tiny_model(arch, layers=LAYERS, hidden=64)))
    return [TorchStage(path, a, b, dtype="float32", **kwargs) for a, b in zip(cuts, cuts[1:])]


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 200) for _ in range(n)]


def run(chain: list[TorchStage], session: str, ids: list[int], position: int) -> torch.Tensor:
    x = raw_from_tensor(torch.tensor(ids))
    for stage in chain:
        [x] = stage.step([StepRequest(session, x, position)])
    return tensor_from_raw(x)


def open_all(chain, session, history, scope="gw", max_length=1024) -> int:
    held = []
    for stage in chain:
        stage.open(session, max_length)
        held.append(stage.reuse_prefix(session, history, scope))
    return min(held)


def close_all(chain, session, fed, scope="gw") -> None:
    for stage in chain:
        stage.keep_prefix(session, fed, scope)
        stage.close(session)


def greedy(chain, session, history, start, steps=8) -> list[int]:
    """Prefill ``history`` from ``start`` (the chain holds the rest), then decode."""
    logits = run(chain, session, history[start:], start)
    out = [int(logits.argmax())]
    for i in range(steps - 1):
        out.append(int(run(chain, session, [out[-1]], len(history) + i).argmax()))
    return out


def finished(chain, session, history, steps=8, scope="gw") -> list[int]:
    """A whole session: open, prefill, decode, close keeping its prefix."""
    held = open_all(chain, session, history, scope)
    out = greedy(chain, session, history, held, steps)
    close_all(chain, session, history + out[:-1], scope)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_a_second_turn_reuses_the_first_and_answers_the_same(arch: str) -> None:
    cached, cold = stages(arch), stages(arch)
    first = prompt(150)
    answer = finished(cached, "turn-1", first)
    second = first + answer[:-1] + prompt(40, seed=1)
    held = open_all(cached, "turn-2", second)
    assert held == (len(first) + len(answer) - 1) // B * B == 128
    with_cache = greedy(cached, "turn-2", second, held, steps=12)
    open_all(cold, "cold", second)
    assert with_cache == greedy(cold, "cold", second, 0, steps=12)
    assert all(s.prefix_tokens_reused == 128 for s in cached)


def test_logits_after_a_reused_prefix_match_those_computed_whole() -> None:
    cached, cold = stages(), stages()
    history = prompt(300)
    finished(cached, "a", history[:200])
    held = open_all(cached, "b", history)
    assert held == 192
    open_all(cold, "c", history)
    got = run(cached, "b", history[held:], held)
    expected = run(cold, "c", history, 0)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


@pytest.mark.parametrize("differs_at", [0, 63, 64, 100, 191])
def test_one_token_changed_inside_a_block_ends_the_reuse_at_that_block(differs_at: int) -> None:
    """Isolation: the KV of another session is reused exactly up to the last whole block
    before the first token that differs, never into it."""
    chain = stages()
    history = prompt(260)
    finished(chain, "a", history)
    other = list(history)
    other[differs_at] = (other[differs_at] + 1) % 200 + 3
    held = open_all(chain, "b", other)
    assert held == differs_at // B * B
    cold = stages()
    open_all(cold, "c", other)
    assert greedy(chain, "b", other, held) == greedy(cold, "c", other, 0)


def test_another_scope_or_another_span_reuses_nothing() -> None:
    chain = stages()
    history = prompt(200)
    finished(chain, "a", history, scope="gateway-1")
    assert open_all(chain, "b", history, scope="gateway-2") == 0
    close_all(chain, "b", [], scope="gateway-2")
    # The same stage, a session over part of its span only: other keys and values.
    stage = chain[0]
    stage.open("c", 1024, 0, 1)
    assert stage.reuse_prefix("c", history, "gateway-1") == 0


def test_at_least_the_last_token_is_left_to_compute() -> None:
    chain = stages()
    history = prompt(2 * B)
    finished(chain, "a", history + [5])
    assert open_all(chain, "b", history) == B  # all of it cached, but its last token's logits are needed
    assert open_all(chain, "c", history + [5, 6]) == 2 * B


def test_the_next_turn_replaces_the_last_one_and_equal_histories_are_kept_once() -> None:
    chain = stages()
    history = prompt(140)
    answer = finished(chain, "a", history)
    assert all(len(s.prefixes) == 1 for s in chain)
    finished(chain, "b", history + answer[:-1] + prompt(100, seed=3))
    assert all(len(s.prefixes) == 1 for s in chain)  # it extends the first: one entry
    finished(chain, "c", history)
    assert all(len(s.prefixes) == 1 for s in chain)  # a start of what is held: nothing new


def test_cached_prefixes_give_way_to_sessions_and_count_as_free_room() -> None:
    [stage] = stages(cuts=(0, LAYERS))
    per_token = stage.bytes_per_token
    stage.cache_budget_bytes = 1024 * per_token
    free = stage.cache_tokens_free
    finished([stage], "a", prompt(500))
    assert len(stage.prefixes) == 1 and stage.prefixes.nbytes == 448 * per_token
    assert stage.cache_tokens_free == free  # a cached prefix is room anyone may take
    stage.open("big", 1024)
    run([stage], "big", prompt(900, seed=2), 0)  # needs more than is left beside the prefix
    assert len(stage.prefixes) == 0 and stage.cache_bytes_used <= stage.cache_budget_bytes
    assert stage.reuse_prefix("big", prompt(500), "gw") == 0


def test_a_new_prefix_evicts_the_least_recently_used_ones() -> None:
    [stage] = stages(cuts=(0, LAYERS))
    stage.cache_budget_bytes = 1400 * stage.bytes_per_token
    first, second, third = prompt(400, seed=7), prompt(400, seed=8), prompt(600, seed=9)
    finished([stage], "a", first)
    finished([stage], "b", second)
    stage.open("touch", 1024)
    assert stage.reuse_prefix("touch", first + [1], "gw") == 384  # `first` is now the most recently used
    stage.close("touch")
    finished([stage], "c", third)  # 576 tokens: one of the others must go
    assert stage.prefixes.nbytes == (384 + 576) * stage.bytes_per_token
    stage.open("d", 1024)
    assert stage.reuse_prefix("d", second + [1], "gw") == 0
    stage.open("e", 1024)
    assert stage.reuse_prefix("e", first + [1], "gw") == 384
    assert stage.cache_bytes_used <= stage.cache_budget_bytes


def test_two_sessions_reuse_one_prefix_at_once_and_each_its_own_copy() -> None:
    chain, cold = stages(), stages()
    base = prompt(200)
    finished(chain, "a", base)
    one, two = base + prompt(30, seed=5), base + prompt(30, seed=6)
    assert open_all(chain, "one", one) == open_all(chain, "two", two) == 192
    # Interleaved, so each writes its own tokens after the shared prefix.
    run(chain, "one", one[192:], 192)
    run(chain, "two", two[192:200], 192)
    run(chain, "two", two[200:], 200)
    open_all(cold, "c1", one)
    open_all(cold, "c2", two)
    assert greedy(chain, "one", one + [7], len(one)) == greedy(cold, "c1", one + [7], 0)
    assert greedy(chain, "two", two + [7], len(two)) == greedy(cold, "c2", two + [7], 0)


def test_the_cache_table_finds_any_start_and_drops_what_a_newer_entry_extends() -> None:
    names = prefix_names(list(range(5 * B)))
    other = prefix_names(list(range(2 * B)) + [9] * (3 * B))
    assert names[:2] == other[:2] and names[2] != other[2]
    assert prefix_names(list(range(5 * B)), "x")[0] != names[0]
    cache = PrefixCache()
    short = CachedPrefix(names[:3], "short", 3)
    cache.add(short)
    assert cache.longest(other) == (short, 2)
    longer = CachedPrefix(names, "long", 5)
    cache.add(longer)
    assert len(cache) == 1 and cache.nbytes == 5 and cache.longest(names[:4]) == (longer, 4)
    branch = CachedPrefix(other, "branch", 5)
    cache.add(branch)
    assert len(cache) == 2 and cache.longest(names) == (longer, 5)
    assert cache.longest(other[:2]) == (branch, 2)  # the newest of the two that hold it
    assert cache.longest(names[:1]) == (branch, 1) and cache.evict_oldest()  # `longer` was the older
    assert cache.longest(names) == (branch, 2) and cache.holds(other) and not cache.holds(names)
    assert cache.evict_oldest() and cache.longest(other) == (None, 0) and cache.nbytes == 0
    cache.add(CachedPrefix(names, "a", 5))
    cache.add(CachedPrefix(other, "b", 5))
    assert cache.longest(names[:1])[0].kv == "b" and cache.longest(names)[0].kv == "a"
    assert cache.evict_oldest()  # `b`: `a` was used last
    assert cache.longest(other) == (cache.longest(names)[0], 2)  # the start they shared is still found, in `a`
