"""``make soak``: a churning swarm under steady traffic, every answer checked.

Six ``--layers auto`` nodes (each with room for half of an 8-block tiny Llama) and two
``--layers none`` gateways on loopback. Clients send a steady stream of chats and
completions, greedy and seeded-sampled, streamed and not, to either gateway; each answer
is compared with single-process transformers (:mod:`.reference`: greedy by
``generate``, seeded by transformers' logits through shardmesh's own sampler). Meanwhile
a chaos loop SIGKILLs, SIGTERMs, SIGSTOPs (5-20 s, then SIGCONT) and restarts nodes at
random, never leaving fewer live nodes than the model needs plus one spare, and waits
for full coverage after each blow.

At the end it prints the requests, wrong answers (there must be none: exit 1
otherwise), errors and their causes, the failover pauses the gateways logged, the time
from each blow to full coverage, and the gateways' memory at the start and the end.
``SOAK_MINUTES`` (default 20) sets the length.
"""

from __future__ import annotations

import os
import random
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from .node_processes import NodeProcess, start_node, stop_all, wait_gateway, wait_serving
from .tiny_model import cached_tiny_model

BLOCKS = 8
NODES = 6
MIN_LIVE = 3  # two halves of the model plus a spare to move into a gap
TOKENS = 24
PROMPTS = ["Once upon a time", "The capital of France is", "In the beginning", "Foxes eat"]
SEEDS = (7, 1234)
REQUEST_EVERY = 1.5  # s between requests
CLIENTS = 4  # requests in flight at most
CHAOS_EVERY = (10.0, 25.0)  # s between blows, uniform
AUTO = ("--max-blocks", str(BLOCKS // 2), "--rebalance-interval", "30", "--drain-timeout", "10")
RESUMED = re.compile(r"generation resumed on a new chain after ([\d.]+) s")


@dataclass
class Tally:
    requests: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    blows: Counter = field(default_factory=Counter)
    to_coverage: list[float] = field(default_factory=list)
    kept_coverage: int = 0  # blows after which every block still had a server
    lock: threading.Lock = field(default_factory=threading.Lock)


def _pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.1f}"


class Soak:
    def __init__(self, minutes: float, seed: int = 0) -> None:
        self.minutes = minutes
        self.rng = random.Random(seed)
        self.path = cached_tiny_model("llama", layers=BLOCKS, hidden=64)
        self.keys = Path(tempfile.mkdtemp(prefix="shardmesh-soak-keys-"))
        self.tally = Tally()
        self.nodes: dict[str, NodeProcess] = {}  # auto nodes by name, the live process
        self.stopped: set[str] = set()  # SIGSTOPped now
        self.down: set[str] = set()  # SIGKILLed or SIGTERMed (draining counts as gone), until restarted
        self.hit: set[int] = set()  # pids of every process a blow struck
        self.gateways: list[NodeProcess] = []
        self.done = threading.Event()

    # -- the swarm ---------------------------------------------------------------------

    def start(self) -> None:
        first = self._auto("n0")
        wait_serving(first)
        for i in range(1, NODES):
            self._auto(f"n{i}", join=first.address)
        for i in range(2):
            g = start_node(self.path, "none", "float32", self.keys, join=first.address, api=True, name=f"g{i}")
            self.gateways.append(g)
        for g in self.gateways:
            wait_gateway(g)
        for node in self.nodes.values():
            wait_serving(node)
        self._wait_coverage(300)

    def _auto(self, name: str, join: str | None = None) -> NodeProcess:
        """An auto node; it joins ``join``, else a gateway (they live throughout)."""
        join = join or (self.gateways[0].address if self.gateways else None)
        node = start_node(self.path, "auto", "float32", self.keys, join=join, name=name, extra=AUTO)
        self.nodes[name] = node
        return node

    def _coverage_ok(self) -> bool:
        try:
            view = httpx.get(f"{self.gateways[0].url}/v1/swarm", timeout=10).json()
        except httpx.HTTPError:
            return False
        return all(view["coverage"])

    def _wait_coverage(self, timeout: float) -> float | None:
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self._coverage_ok():
                return time.monotonic() - began
            time.sleep(0.2)
        return None

    # -- the chaos ---------------------------------------------------------------------

    def _live(self) -> list[str]:
        return [n for n, p in self.nodes.items() if p.proc.poll() is None and n not in self.stopped | self.down]

    def chaos(self) -> None:
        while not self.done.wait(self.rng.uniform(*CHAOS_EVERY)):
            dead = [n for n, p in self.nodes.items() if p.proc.poll() is not None]
            live = self._live()
            if dead and (len(live) <= MIN_LIVE or self.rng.random() < 0.4):
                name = self.rng.choice(dead)
                node = self._auto(name)
                self.down.discard(name)
                self.tally.blows["restart"] += 1
                print(f"[chaos] restarted {name}", flush=True)
                try:
                    wait_serving(node, timeout=120)
                except RuntimeError as exc:
                    print(f"[chaos] {name} did not come back: {str(exc)[:200]}", flush=True)
                continue
            if len(live) <= MIN_LIVE:
                continue
            name, blow = self.rng.choice(live), self.rng.choice(["kill", "term", "stop"])
            proc = self.nodes[name].proc
            print(f"[chaos] {blow} {name}", flush=True)
            self.tally.blows[blow] += 1
            self.hit.add(proc.pid)
            if blow == "kill":
                self.down.add(name)
                proc.send_signal(signal.SIGKILL)
            elif blow == "term":
                self.down.add(name)
                proc.send_signal(signal.SIGTERM)
            else:
                self.stopped.add(name)
                proc.send_signal(signal.SIGSTOP)
                threading.Timer(self.rng.uniform(5, 20), self._thaw, args=(name,)).start()
            self._after_blow(time.monotonic())

    def _after_blow(self, began: float) -> None:
        """Wait for full coverage; a blow that opened a gap (seen within 3 s) counts
        its time from the blow to full coverage again."""
        while time.monotonic() - began < 3:
            if not self._coverage_ok():
                took = self._wait_coverage(300)
                if took is not None:
                    self.tally.to_coverage.append(time.monotonic() - began)
                print(f"[chaos] a gap, {'filled after %.1f s' % (time.monotonic() - began) if took is not None else 'not filled in 300 s'}", flush=True)
                return
            time.sleep(0.2)
        self.tally.kept_coverage += 1

    def _thaw(self, name: str) -> None:
        self.nodes[name].proc.send_signal(signal.SIGCONT)
        self.stopped.discard(name)

    # -- the traffic -------------------------------------------------------------------

    def client(self, references: dict, model: str) -> None:
        slots = threading.Semaphore(CLIENTS)
        while not self.done.is_set():
            slots.acquire()
            key = self.rng.choice(list(references))
            threading.Thread(target=self._ask, args=(key, references[key], model, slots), daemon=True).start()
            time.sleep(REQUEST_EVERY)

    def _ask(self, key: tuple, want: str, model: str, slots: threading.Semaphore) -> None:
        kind, prompt, seed, stream = key
        gateway = self.rng.choice(self.gateways)
        sampling = {"temperature": 0} if seed is None else {"temperature": 0.8, "top_p": 0.95, "seed": seed}
        body = {"model": model, "max_tokens": TOKENS, "stream": stream, **sampling}
        if kind == "chat":
            url, body = f"{gateway.url}/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
        else:
            url, body = f"{gateway.url}/v1/completions", {**body, "prompt": prompt}
        complete = self._coverage_ok()
        try:
            got = _request(url, body, stream, kind)
            with self.tally.lock:
                self.tally.requests += 1
                if got != want:
                    self.tally.wrong.append(f"{key}: got {got!r}, want {want!r}")
        except Exception as exc:  # counted with its cause: the soak reports, never stops
            cause = f"{type(exc).__name__}: {str(exc)[:120]}" + ("" if complete else " (coverage incomplete)")
            with self.tally.lock:
                self.tally.requests += 1
                self.tally.errors[cause] += 1
        finally:
            slots.release()

    # -- the run -----------------------------------------------------------------------

    def run(self) -> int:
        from .reference import Transformers

        ref = Transformers(self.path)
        references = {}
        for prompt in PROMPTS:
            for kind in ("chat", "completion"):
                ids = ref.chat_ids([{"role": "user", "content": prompt}]) if kind == "chat" else ref.prompt_ids(prompt)
                for seed in (None, *SEEDS):
                    tokens = ref.greedy(ids, TOKENS).token_ids if seed is None else _seeded(ref, ids, seed)
                    text = ref.tokenizer.decode(tokens, skip_special_tokens=True)
                    for stream in (False, True):
                        references[(kind, prompt, seed, stream)] = text
        print(f"soak: {self.minutes:g} min, {NODES} auto nodes + 2 gateways, {len(references)} kinds of request", flush=True)
        try:
            self.start()
            long_lived = [*self.gateways, *self.nodes.values()]
            memory = {n.proc.pid: psutil.Process(n.proc.pid).memory_info().rss for n in long_lived}
            model = httpx.get(f"{self.gateways[0].url}/v1/models", timeout=10).json()["data"][0]["id"]
            threads = [threading.Thread(target=self.chaos, daemon=True),
                       threading.Thread(target=self.client, args=(references, model), daemon=True)]
            for t in threads:
                t.start()
            self.done.wait(self.minutes * 60)
            self.done.set()
            time.sleep(TOKENS)  # requests in flight finish
            alive = {n.proc.pid for n in [*self.gateways, *self.nodes.values()] if n.proc.poll() is None}
            end = {pid: psutil.Process(pid).memory_info().rss for pid in memory if pid in alive and pid not in self.hit}
            pauses = [float(m) for g in self.gateways for m in RESUMED.findall("".join(g.lines))]
            return self._report(pauses, memory, end)
        finally:
            self.done.set()
            for name in list(self.stopped):
                self._thaw(name)
            stop_all([*self.nodes.values(), *self.gateways])

    def _report(self, pauses: list[float], start: dict[int, int], end: dict[int, int]) -> int:
        t = self.tally
        print(f"\nrequests      {t.requests}")
        print(f"wrong answers {len(t.wrong)}")
        for line in t.wrong[:10]:
            print(f"  {line}")
        print(f"errors        {sum(t.errors.values())}")
        for cause, n in t.errors.most_common():
            print(f"  {n} x {cause}")
        print(f"blows         {dict(t.blows)}")
        print(f"failover pause (gateway logs, {len(pauses)}): p50 {_pct(pauses, 0.5)} s, p99 {_pct(pauses, 0.99)} s")
        print(f"blow -> full coverage, blows that opened a gap ({len(t.to_coverage)}): p50 {_pct(t.to_coverage, 0.5)} s, "
              f"p99 {_pct(t.to_coverage, 0.99)} s; {t.kept_coverage} blows left every block served")
        for pid in end:
            role = "gateway" if pid in {g.proc.pid for g in self.gateways} else "auto node never hit"
            print(f"{role} {pid} RSS: {start[pid] / 1e6:.0f} MB at start, {end[pid] / 1e6:.0f} MB at the end")
        return 1 if t.wrong else 0


def _seeded(ref, ids: list[int], seed: int) -> list[int]:
    from ..contract import SamplingParams

    return ref.sample(ids, SamplingParams(temperature=0.8, top_p=0.95, seed=seed), TOKENS)


def _request(url: str, body: dict, stream: bool, kind: str) -> str:
    field = "content" if kind == "chat" else "text"
    if not stream:
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if kind == "chat" else choice["text"]
    import json

    pieces = []
    with httpx.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error'].get('message', '')[:100]}")
                if event["choices"]:
                    part = event["choices"][0]["delta"].get(field) if kind == "chat" else event["choices"][0].get(field)
                    pieces.append(part or "")
    return "".join(pieces)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Soak(float(os.environ.get("SOAK_MINUTES", "20"))).run()


if __name__ == "__main__":
    raise SystemExit(main())
