"""One prefill hop's bytes on the wire alone: a frame to a peer that only acknowledges.

``python -m shardmesh.tools.bench_wire`` is that peer; :func:`measure_hop_transfer`
starts it and times frames to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import trio

from .node_processes import LISTENING, NodeProcess, stop_all

SINK_PROTOCOL = "/shardmesh/bench-sink/1.0.0"


async def _sink() -> None:
    """A peer that acknowledges every frame it receives (``python -m shardmesh.tools.bench_wire``)."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from ..mesh.host import running_host
    from ..mesh.wire import RESULT, FrameStream, StreamEnded

    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as mesh:

        async def ack(stream) -> None:
            fs = FrameStream(stream, max_payload=1 << 30)
            try:
                while True:
                    frame = await fs.read_frame()
                    await fs.write({"t": RESULT, "nbytes_seen": len(frame.payload)})
            except StreamEnded:
                pass

        mesh.set_handler(SINK_PROTOCOL, ack)
        print(f"listening on {mesh.addrs()[0]}", flush=True)
        await trio.sleep_forever()


async def hop_transfer_mb_s(address: str, nbytes: int, repeats: int) -> float:
    """MB/s of one frame of ``nbytes`` (a prefill's hidden states) to another process:
    the network part of a prefill hop, without the compute around it."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    from ..mesh.host import running_host
    from ..mesh.wire import STEP, FrameStream

    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as mesh:
        peer = await mesh.connect(address)
        fs = FrameStream(await mesh.open_stream(peer, SINK_PROTOCOL))
        payload = bytes(nbytes)
        best = float("inf")
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            await fs.write({"t": STEP, "dtype": "bfloat16", "shape": [nbytes // 2]}, payload)
            await fs.read_frame(idle_timeout=60)
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e6


def measure_hop_transfer(nbytes: int, repeats: int) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sink = NodeProcess(subprocess.Popen([sys.executable, "-m", "shardmesh.tools.bench_wire"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    threading.Thread(target=lambda: [sink.lines.append(line) for line in sink.proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 60
        while not (m := LISTENING.search("".join(sink.lines))):
            if time.monotonic() > deadline or sink.proc.poll() is not None:
                raise RuntimeError("the bench sink did not start:\n" + "".join(sink.lines))
            time.sleep(0.1)
        return trio.run(hop_transfer_mb_s, m.group(1), nbytes, repeats)
    finally:
        stop_all([sink])


if __name__ == "__main__":
    trio.run(_sink)
