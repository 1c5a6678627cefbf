"""``make internet-demo``: a small swarm on an emulated internet, to look at by hand.

As root, on this machine only (:mod:`.emulated_internet`): a public node that serves
the first half of a tiny model and relays; a node at home behind a cone NAT serving the
second half; a gateway in a second home, behind a NAT that gives every connection a
random port. Neither home can dial the other: the chain goes through the relay. It
prints each node's host and the commands that reach them (every address lives inside
the namespaces, so commands run in one: ``ip netns exec NAME ...``), and runs until
Ctrl-C, then deletes every namespace it made.

``python -m shardmesh.tools.internet_demo [MODEL]``: ``MODEL`` defaults to a tiny Llama
built once and cached.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from .emulated_internet import Internet, can_build
from .node_processes import start_node, stop_all, wait_gateway, wait_serving


def main(argv: list[str]) -> int:
    why = can_build()
    if why is not None:
        print(f"internet-demo: the emulated internet {why}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv:
        model = Path(argv[0])
    else:
        from .tiny_model import cached_tiny_model

        model = cached_tiny_model("llama", layers=4, hidden=64)
    internet = Internet()
    keys = Path(tempfile.mkdtemp(prefix="shardmesh-demo-"))
    nodes = []
    try:
        public = internet.public()
        desk = internet.home_host(internet.home("cone"))
        laptop = internet.home_host(internet.home("random"))
        first = start_node(model, "0:2", "auto", keys, prefix=public.exec, listen=f"/ip4/{public.ip}/tcp/4001", name="public")
        nodes.append(first)
        wait_serving(first)
        second = start_node(model, "2:4", "auto", keys, first.address, prefix=desk.exec, listen=f"/ip4/{desk.ip}/tcp/4001", name="desk")
        gateway = start_node(model, "none", "auto", keys, first.address, api=True, prefix=laptop.exec,
                             listen=f"/ip4/{laptop.ip}/tcp/4001", name="laptop")
        nodes += [second, gateway]
        wait_serving(second)
        wait_gateway(gateway)
        run = f"ip netns exec {laptop.ns}"
        print(f"""
an emulated internet, 198.18.0.0/24 (nothing leaves this machine):
  public  {public.ns:18s} {public.ip:12s} serves blocks 0:2, relays   {first.peer}
  home 1  {desk.ns:18s} {desk.ip:12s} behind a cone NAT ({internet.homes[0].router.ip}), blocks 2:4   {second.peer}
  home 2  {laptop.ns:18s} {laptop.ip:12s} behind a random-port NAT ({internet.homes[1].router.ip}), the gateway

from the gateway's host (as root):
  {run} curl -s {gateway.url}/v1/swarm | python3 -m json.tool     # reach, addrs, connection per peer
  {run} curl -s {gateway.url}/v1/chat/completions -H 'content-type: application/json' \\
      -d '{{"model": "{model.name}", "messages": [{{"role": "user", "content": "hello"}}], "max_tokens": 16}}'
  {run} {sys.executable} -m shardmesh status --join {first.address}

Ctrl-C stops the nodes and deletes the namespaces.""", flush=True)
        while all(n.proc.poll() is None for n in nodes):
            time.sleep(1)
        print("a node stopped:\n" + "".join(next(n for n in nodes if n.proc.poll() is not None).lines[-20:]))
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_all(nodes)
        internet.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
