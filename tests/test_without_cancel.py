"""without_cancel: our deadlines stop the waiting, never the py-libp2p call."""

from __future__ import annotations

import pytest
import trio

from shardmesh.mesh.without_cancel import StillRunning, without_cancel


def test_a_slow_call_is_left_running_not_cancelled() -> None:
    finished: list[str] = []

    async def slow_write() -> str:
        await trio.sleep(0.3)
        finished.append("written")
        return "done"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(StillRunning, match="slow_write still running after 0.05 s"):
                await without_cancel(nursery, 0.05, slow_write)
            assert finished == []
        assert finished == ["written"], "the call ran to its end in the background"

    trio.run(main)


def test_results_and_errors_come_back_in_time() -> None:
    async def answer(x: int) -> int:
        await trio.sleep(0)
        return x * 2

    async def broken() -> None:
        raise ValueError("no route")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            assert await without_cancel(nursery, 5, answer, 21) == 42
            with pytest.raises(ValueError, match="no route"):
                await without_cancel(nursery, 5, broken)

    trio.run(main)
