"""The floor under ``bench --mesh``: the same split, on the same machine, with no mesh.

``bench --mesh`` compares a chain of node processes with one process. Part of the gap
is the mesh (libp2p, hop links, the event loop, the gateway) and part is the machine:
one decode step split over processes that share its cores, each process's compute
starting after an idle gap. This module measures the second part alone, so that a run
says how much of the gap any mesh could close.

Plain processes, each a bare loop around a :class:`~shardmesh.backends.torch.stage.TorchStage`
(no event loop, no libp2p, no threads of ours), are linked by socketpairs in the shape
of a chain. For a decode step the driver (the bench process) sends the token id to the
first, each hands its hidden states to the next, and the last takes the argmax and sends
the token id back to the driver: the same one-way messages a token takes through the
mesh's chain, each a 20-byte header and the raw tensor bytes. A route of one process
(``0:12``) is the 1-node chain's counterpart. The same process also runs the decode
loop by itself, with no messages at all: the one-process figure.

A message: ``struct "<iqq"`` (kind, position, payload bytes), then the payload.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass

from ..contract import DTYPE_SIZES, RawTensor, StepRequest

HEADER = struct.Struct("<iqq")
READY, RESET, STEP, ALONE = range(4)
SESSION = "plain"


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_message(sock: socket.socket) -> tuple[int, int, bytes] | None:
    """``(kind, position, payload)``, or None once the other end has closed."""
    head = _read_exact(sock, HEADER.size)
    if head is None:
        return None
    kind, position, nbytes = HEADER.unpack(head)
    payload = _read_exact(sock, nbytes) if nbytes else b""
    return None if payload is None else (kind, position, payload)


def write_message(sock: socket.socket, kind: int, position: int, payload: bytes = b"") -> None:
    sock.sendall(HEADER.pack(kind, position, len(payload)) + payload)


# -- a plain process ----------------------------------------------------------------


class PlainStage:
    """One process's blocks and how its messages turn into steps."""

    def __init__(self, path: str, dtype: str, start: int, end: int) -> None:
        from ..backends.torch.stage import TorchStage
        from ..backends.weights import resolve_local

        self.stage = TorchStage(resolve_local(path), start, end, dtype=dtype, model_name="plain")
        self.first = start == 0
        self.last = end == self.stage.info.total_blocks

    def reset(self, max_length: int) -> None:
        if SESSION in self.stage.sessions:
            self.stage.close(SESSION)
        self.stage.open(SESSION, max_length)

    def step(self, position: int, payload: bytes) -> bytes:
        """Token ids (first) or hidden states in; hidden states or the argmax (last) out."""
        from ..backends.torch.tensors import tensor_from_raw

        if self.first:
            inputs = RawTensor("int64", (len(payload) // 8,), payload)
        else:
            info = self.stage.info
            rows = len(payload) // (info.hidden_size * DTYPE_SIZES[info.dtype])
            inputs = RawTensor(info.dtype, (rows, info.hidden_size), payload)
        output = self.stage.step([StepRequest(SESSION, inputs, position)])[0]
        if self.last:
            return struct.pack("<q", int(tensor_from_raw(output).argmax()))
        return bytes(output.data)

    def alone(self, prompt: bytes, tokens: int) -> bytes:
        """The one-process loop: prompt, then ``tokens`` greedy steps. Seconds per step
        (float64), then the tokens (int64)."""
        n = len(prompt) // 8
        self.reset(n + tokens + 1)
        token = self.step(0, prompt)
        seconds, drawn = array("d"), array("q")
        for i in range(tokens):
            began = time.perf_counter()
            token = self.step(n + i, token)
            seconds.append(time.perf_counter() - began)
            drawn.frombytes(token)
        return seconds.tobytes() + drawn.tobytes()


def serve(stage: PlainStage, upstream: socket.socket, downstream: socket.socket) -> None:
    """Until upstream closes: pass every message on, through the blocks where it is a step."""
    if not stage.first:  # READY travels down the route once every process has loaded
        if read_message(upstream) is None:
            return
    write_message(downstream, READY, 0)
    while (message := read_message(upstream)) is not None:
        kind, position, payload = message
        if kind == RESET:
            stage.reset(position)
            write_message(downstream, RESET, position)
        elif kind == STEP:
            write_message(downstream, STEP, position, stage.step(position, payload))
        elif kind == ALONE:
            write_message(downstream, ALONE, 0, stage.alone(payload, position))


# -- the driver ---------------------------------------------------------------------


@dataclass
class Decode:
    """One greedy decode: seconds per step, and the tokens it drew."""

    seconds: list[float]
    tokens: list[int]

    @property
    def tokens_per_s(self) -> float:
        return len(self.seconds) / sum(self.seconds)

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds)


class PlainRoute:
    """Plain processes serving ``spans`` in order, linked by socketpairs; always :meth:`close`."""

    def __init__(self, path: str, dtype: str, spans: list[str], threads: int | None) -> None:
        links = [socket.socketpair() for _ in range(len(spans) + 1)]  # driver -> p0 -> ... -> driver
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.procs: list[subprocess.Popen] = []
        try:
            for i, span in enumerate(spans):
                up, down = links[i][1], links[i + 1][0]
                fds = (up.fileno(), down.fileno())
                cmd = [sys.executable, "-m", "shardmesh.tools.bench_no_mesh", path, dtype, *span.split(":"), *map(str, fds)]
                self.procs.append(subprocess.Popen(cmd, pass_fds=fds, env=env))
        finally:
            for i in range(len(spans)):  # the children hold their ends now
                links[i][1].close()
                links[i + 1][0].close()
        self.send, self.receive = links[0][0], links[-1][1]
        self.receive.settimeout(600)
        try:
            self._expect(READY)
        except BaseException:
            self.close()
            raise

    def _expect(self, kind: int) -> tuple[int, bytes]:
        message = read_message(self.receive)
        if message is None or message[0] != kind:
            codes = [p.poll() for p in self.procs]
            raise RuntimeError(f"a plain process failed (exit codes {codes}); got {message and message[0]} for {kind}")
        return message[1], message[2]

    def decode(self, prompt: list[int], tokens: int) -> Decode:
        """Greedy decode of ``tokens`` tokens through the route, timed per step here."""
        write_message(self.send, RESET, len(prompt) + tokens + 1)
        self._expect(RESET)
        write_message(self.send, STEP, 0, array("q", prompt).tobytes())
        _, token = self._expect(STEP)
        seconds, drawn = [], []
        for i in range(tokens):
            began = time.perf_counter()
            write_message(self.send, STEP, len(prompt) + i, token)
            _, token = self._expect(STEP)
            seconds.append(time.perf_counter() - began)
            drawn.append(struct.unpack("<q", token)[0])
        return Decode(seconds, drawn)

    def alone(self, prompt: list[int], tokens: int) -> Decode:
        """The same decode run inside the route's only process, with no messages."""
        assert len(self.procs) == 1, "only a route of one process holds every block"
        write_message(self.send, ALONE, tokens, array("q", prompt).tobytes())
        _, payload = self._expect(ALONE)
        seconds, drawn = array("d"), array("q")
        seconds.frombytes(payload[: 8 * tokens])
        drawn.frombytes(payload[8 * tokens :])
        return Decode(list(seconds), list(drawn))

    def close(self) -> None:
        self.send.close()  # each process sees its upstream close and exits in turn
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.receive.close()


def measure_plain(
    path: str, dtype: str, prompt: list[int], tokens: int, repeats: int, threads: int | None, whole_span: str, spans: list[str]
) -> dict:
    """One process, a route of one process (``whole_span``) and one of ``spans``, taking
    turns for ``repeats`` rounds. Each one's best tokens/s and best median step (ms),
    in that order: one process, the 1-process route, the split route."""
    whole = PlainRoute(path, dtype, [whole_span], threads)
    try:
        split = PlainRoute(path, dtype, spans, threads)
        try:
            for route in (whole, split):
                route.decode(prompt, 4)  # warm-up
            runs: dict[str, list[Decode]] = {"one process": [], "1-process route": [], f"{len(spans)}-process route": []}
            for _ in range(repeats):
                for decodes, run in zip(runs.values(), (whole.alone, whole.decode, split.decode)):
                    decodes.append(run(prompt, tokens))
        finally:
            split.close()
    finally:
        whole.close()
    return {name: (max(d.tokens_per_s for d in ds), min(d.median_ms for d in ds)) for name, ds in runs.items()}


def split_ratio(plain: dict) -> float:
    """The split route's tokens/s over one process's."""
    (one, _), _, (split, _) = plain.values()
    return split / one


def report_plain(plain: dict) -> None:
    (one, _), (r1, m1), (r3, m3) = plain.values()
    print("the same split with no mesh (plain processes over socketpairs; the machine's floor):")
    for name, (rate, median) in plain.items():
        print(f"  {name:22s} {rate:12.1f} tok/s {rate / one:6.2f} of one process   median step {median:6.2f} ms")
    per_hop = (1000 / r3 - 1000 / r1) / 2
    print(f"  added per hop, (t3 - t1) / 2: {per_hop:.2f} ms from tokens/s, {(m3 - m1) / 2:.2f} ms from the median step")


def _main(argv: list[str]) -> None:
    path, dtype, start, end, up, down = argv
    stage = PlainStage(path, dtype, int(start), int(end))
    serve(stage, socket.socket(fileno=int(up)), socket.socket(fileno=int(down)))


if __name__ == "__main__":
    _main(sys.argv[1:])
