"""Capacity: how many blocks fit, when the first and last blocks carry more weight."""

from __future__ import annotations

from shardmesh.placement.capacity import blocks_that_fit, window_bytes

BLOCKS = [10] * 8


def test_window_bytes_adds_embeddings_and_head_at_the_ends() -> None:
    assert window_bytes(BLOCKS, 25, 30, 0, 2) == 45
    assert window_bytes(BLOCKS, 25, 30, 3, 5) == 20
    assert window_bytes(BLOCKS, 25, 30, 6, 8) == 50
    assert window_bytes(BLOCKS, 25, 30, 0, 8) == 135


def test_capacity_is_what_the_heaviest_window_allows() -> None:
    # Two blocks at the end weigh 20 + 30: 49 bytes hold one block anywhere, not two.
    assert blocks_that_fit(BLOCKS, 25, 30, 49) == 1
    assert blocks_that_fit(BLOCKS, 25, 30, 50) == 2
    assert blocks_that_fit(BLOCKS, 0, 0, 49) == 4
    assert blocks_that_fit(BLOCKS, 25, 30, 135) == 8
    assert blocks_that_fit(BLOCKS, 25, 30, 10**9) == 8


def test_no_room_for_a_block_is_zero() -> None:
    assert blocks_that_fit(BLOCKS, 25, 30, 39) == 0
    assert blocks_that_fit(BLOCKS, 25, 30, -5) == 0
    assert blocks_that_fit([], 0, 0, 100) == 0
