"""One mDNS test peer: a host with Discovery(mdns=True) and no --join address.

Run only inside a network namespace (tests/test_discovery.py makes one), so the
multicast stays there. It prints, one line each:

    ID <our peer id>
    CONNECTED <peer id>     for every peer that connects, whoever dialled
    LOOP_MAX_GAP_MS <ms>    the event loop's longest stall while discovery ran
    STOPPED                 after a clean shutdown

and exits when stdin closes or after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys

import trio


async def main(lifetime: float) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from shardmesh.mesh.discovery import Discovery
    from shardmesh.mesh.host import running_host

    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as mesh:
        discovery = Discovery(mesh, [], mdns=True, retry_interval=0.5)
        print("ID", mesh.peer_id_str, flush=True)
        max_gap = 0.0

        async def watch_loop() -> None:
            # Starting zeroconf on the loop would stall it ~1.6 s; we start it in a thread.
            nonlocal max_gap
            while True:
                before = trio.current_time()
                await trio.sleep(0.01)
                max_gap = max(max_gap, trio.current_time() - before - 0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_loop)
            await trio.sleep(0.05)
            await nursery.start(discovery.run)

            async def report() -> None:
                seen: set[str] = set()
                while True:
                    for pid in sorted(discovery.connected() - seen):
                        print("CONNECTED", pid, flush=True)
                        seen.add(pid)
                    await trio.sleep(0.1)

            async def until_stdin_closes() -> None:
                # A blocking read in a thread: trio has no portable async stdin.
                await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)

            nursery.start_soon(report)
            with trio.move_on_after(lifetime):
                await until_stdin_closes()
            nursery.cancel_scope.cancel()
        print("LOOP_MAX_GAP_MS", round(max_gap * 1000), flush=True)
    print("STOPPED", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    trio.run(main, args.lifetime)
