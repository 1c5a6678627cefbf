"""The composition root: one trio nursery holding host, registry, stage server, gateway.

Everything a node does is started here and nowhere else, so the whole lifetime of a
node is one readable function (:func:`run_node`): read the model's config, start the
libp2p host, publish its signed record, take a span (given by hand, or chosen from what
the swarm lacks: :mod:`.span_keeper`), serve its hop of other people's chains, and
(unless ``--api off``) serve the OpenAI API over whatever chain of peers covers the
model, until a signal drains and stops it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import trio

from ..api.app import create_app, serve
from ..api.generate import Generator, eos_token_ids
from ..api.metrics_app import create_metrics_app
from ..backends.batch_stats import BatchStats
from ..backends.weights import identity_bytes
from ..mesh.addresses import port_of
from ..mesh.allow_list import AllowList, AllowListError, ConnectionGate, read_allow_list
from ..mesh.discovery import Discovery
from ..mesh.hop_server import HopServer, Limits
from ..mesh.host import MeshHost, running_host
from ..mesh.hints import confirm, follow_hints
from ..mesh.identity import IdentityInUse, default_key_file, holding_identity
from ..mesh.liveness import PING_TIMEOUT, ping_connected
from ..mesh.link_offers import LinkListener, Links
from ..mesh.records import model_identity
from ..mesh.result_trunks import ChainTrunks, ResultTrunks
from ..mesh.registry import Registry
from ..mesh.rtt import answers_ping, publish_rtts
from ..mesh.shared_port import share_port
from ..mesh.swarm_map import PROTOCOL as SWARM_MAP_PROTOCOL, swarm_map_handler
from ..placement.spans import repair
from .blocks import auto_capacity, load_blocks, run_blocks
from .chains import NodeChains, audited_mesh_chains, connected_online_peers
from .config import NodeConfig, UsageError
from .drafting import draft_source
from .heap import settle
from .model import load_model_meta
from .node_metrics import NodeCollector, counted_trunks
from .open_gateway import serve_open_gateway
from .startup import http_url, local_record, read_key
from .reachability import own_addresses, use_relays, watch_own_reachability
from .span_keeper import SpanKeeper

log = logging.getLogger("shardmesh.node")


async def publish_free_cache(registry: Registry, keeper: SpanKeeper, every: float = 2.0) -> None:
    """Keeps ``cache_tokens_free`` in the record current, so routing sees busy nodes."""
    last = None
    while True:
        await trio.sleep(every)
        held = keeper.held
        free = held.hop.cache_tokens_free if held is not None and held.hop is not None else 0
        if free != last:
            registry.update_local(cache_tokens_free=free)
            last = free


async def start_links(config: NodeConfig, mesh: MeshHost, nursery: trio.Nursery) -> Links | None:
    """Hop links (mesh/link.py), unless ``--no-links``: on the libp2p port itself
    (mesh/shared_port.py), or with ``--link-port`` on a port of their own on the host of
    the first ``--listen`` address."""
    if not config.links:
        return None
    if config.link_port is None:
        # Offered to openers, who dial it at the IP they reach us at: behind an
        # announced address (a forwarded port, a delay line) that is its port.
        port = next((p for a in [*config.announce, *map(str, mesh.addrs())] if (p := port_of(a))), None)
        if port is None:
            log.warning("no hop links: no TCP port to share")
            return None
        listener = LinkListener.on_shared_port(port)
        share_port(mesh.host, listener.adopt)
        nursery.start_soon(listener.run)
        return Links(listener)
    from multiaddr import Multiaddr

    first = Multiaddr(config.listen[0])
    protocols = {p.name for p in first.protocols()}
    if not protocols & {"ip4", "ip6"}:
        log.warning("no hop links: the first --listen address %s names no IP to listen on", first)
        return None
    host = first.value_for_protocol("ip4" if "ip4" in protocols else "ip6")
    try:
        listener = await LinkListener.bind(host, config.link_port)
    except OSError as exc:
        raise UsageError(f"--link-port {config.link_port}: cannot listen on {host}: {exc.strerror or exc}; "
                         "pick another port, 0 for a free one, or --no-links") from exc
    nursery.start_soon(listener.run)
    return Links(listener)


async def start_chain_trunks(server: HopServer, links: Links | None, nursery: trio.Nursery) -> ChainTrunks | None:
    """The gateway's trunks (mesh/result_trunks.py): its steps go on the node's own,
    its tokens come on results trunks; None with ``--no-trunks``."""
    if server.trunks is None:
        return None
    results = ResultTrunks(server.open_stream, links, server.max_payload)
    await nursery.start(results.run)
    return ChainTrunks(server.trunks, results)


def read_allowed(config: NodeConfig) -> frozenset[str] | None:
    """The peer ids of ``--allow-peers``, or None for an open swarm."""
    if config.allow_peers is None:
        return None
    try:
        return read_allow_list(config.allow_peers)
    except AllowListError as exc:
        raise UsageError(str(exc)) from exc


JOIN_PATIENCE = 20.0  # seconds before a node that cannot reach any --join peer says so


async def warn_while_alone(discovery: Discovery, config: NodeConfig, say: Callable[[str], None]) -> None:
    """One line when no ``--join`` peer answers: the usual causes are a typo, a peer that
    is down, and a private swarm's key (a peer without it cannot even connect)."""
    if await discovery.wait_bootstrapped(JOIN_PATIENCE):
        return
    key = "the same --swarm-key as theirs" if config.swarm_key else "the --swarm-key of their swarm, if it is private"
    errors = discovery.join_errors()
    last = f"; last error: {errors[0]}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "") if errors else ""
    say(f"no --join peer answered within {JOIN_PATIENCE:g} s; still trying (check the addresses, that a peer is up, "
        f"and that this node has {key}){last}")


def guard_private_swarm(mesh: MeshHost, allowed: frozenset[str] | None, nursery: trio.Nursery) -> AllowList | None:
    """With ``--allow-peers``: every connection to a peer not on the list is closed."""
    if allowed is None:
        return None
    allow = AllowList(allowed, mesh.peer_id_str)
    mesh.host.get_network().register_notifee(ConnectionGate(allow, nursery))
    return allow


async def run_node(config: NodeConfig, announce: Callable[[str], None] | None = None, stop: trio.Event | None = None) -> None:
    """Join (or start) the swarm, take a span, start the gateway, serve until ``stop``
    is set (then drain: see :func:`drain`) or until cancelled. The node's key file is
    held (locked) the whole time: a second node on it stops at once with a UsageError."""
    key_file = Path(config.key_file) if config.key_file else default_key_file()
    try:
        with holding_identity(key_file) as key_pair:
            serve = serve_node if config.model is not None else serve_open_gateway
            await serve(config, key_pair, announce or (lambda line: print(line, flush=True)), stop)
    except IdentityInUse as exc:
        raise UsageError(str(exc)) from exc


async def serve_node(config: NodeConfig, key_pair, say: Callable[[str], None], stop: trio.Event | None) -> None:
    """:func:`run_node` once the identity is held."""
    allowed = read_allowed(config)  # files the user names are checked before any long work
    swarm_key = read_key(config)
    # Abandonable: Ctrl-C during a long download must stop the node, not wait for it.
    model = await trio.to_thread.run_sync(load_model_meta, config, abandon_on_cancel=True)
    settle()  # what the imports and the model's metadata made lives as long as the node (heap.py)
    fixed_span = config.span(model.total_blocks)
    capacity = auto_capacity(config, model) if config.auto_layers else 0
    model_id = model_identity(model.name, *identity_bytes(model.files))
    limits = Limits(idle_timeout=config.session_idle_timeout)
    api = config.api_host_port

    async with running_host(key_pair, list(config.listen), swarm_key) as mesh, trio.open_nursery() as nursery:
        allow = guard_private_swarm(mesh, allowed, nursery)
        discovery = Discovery(mesh, list(config.join), mdns=config.mdns)
        for addr in mesh.addrs():
            say(f"listening on {addr}")
        if swarm_key is not None:
            say(f"private swarm: every connection needs the key in {config.swarm_key} (fingerprint {swarm_key.fingerprint()})")
        if allow is not None:
            say(f"private swarm: only the {len(allow.peers) - 1} other peer ids in {config.allow_peers}")
        own = own_addresses(mesh, config, lambda **changes: registry.update_local(**changes))
        registry = Registry(mesh, model_id, local_record(mesh, own.addrs(), model, model_id, limits), allowed=allow and allow.allows)
        await nursery.start(registry.run)
        mesh.set_handler(SWARM_MAP_PROTOCOL, swarm_map_handler(registry))  # `shardmesh status`, joining nodes
        await nursery.start(discovery.run)
        nursery.start_soon(warn_while_alone, discovery, config, say)
        links = await start_links(config, mesh, nursery)
        if links is not None and links.listener is not None and config.link_port is not None:
            say(f"hop links on tcp port {links.listener.port} (forward it with the libp2p port behind a NAT)")
        server = HopServer(
            mesh,
            None,
            model_id,
            model.total_blocks,
            model.context_length,
            limits,
            hidden_size=model.hidden_size,
            links=links,
            allowed=allow and allow.allows,
            unreachable=lambda peer: registry.view.liveness.since(peer) is not None,
            trunks=config.trunks,
            prefix_cache=config.prefix_cache,
        )
        await nursery.start(server.run)
        chain_trunks = await start_chain_trunks(server, links, nursery)
        batch_stats = BatchStats()  # every span's batches, over the node's life
        keeper = SpanKeeper(
            registry=registry,
            server=server,
            total_blocks=model.total_blocks,
            capacity=capacity,
            load=lambda span: load_blocks(config, model, model_id, span, say, batch_stats),
            run_blocks=lambda blocks, task_status=trio.TASK_STATUS_IGNORED: run_blocks(
                blocks, config.session_idle_timeout, task_status=task_status
            ),
            drain_timeout=config.drain_timeout,
            say=say,
        )
        keeper.start(nursery)
        if fixed_span is not None:
            await keeper.serve_fixed(fixed_span)
        elif config.auto_layers:
            say(f"room for {capacity} of {model.total_blocks} blocks; looking for the blocks the swarm lacks most")
            await nursery.start(
                partial(
                    keeper.run_auto,
                    expect_peers=bool(config.join),
                    rebalance_interval=config.rebalance_interval,
                )
            )
        nursery.start_soon(publish_free_cache, registry, keeper)
        me = mesh.peer_id_str

        def serving_peers() -> list[str]:
            return [r.peer for r in registry.records() if r.end > r.start and r.peer != me]

        nursery.start_soon(publish_rtts, mesh, serving_peers, lambda rtt: registry.update_local(rtt=rtt))
        liveness = registry.view.liveness
        nursery.start_soon(ping_connected, partial(connected_online_peers, mesh, registry), partial(answers_ping, mesh, timeout=PING_TIMEOUT),
                           liveness, time.time)
        check = partial(confirm, connected=mesh.is_connected, ping=partial(answers_ping, mesh), dial=mesh.dial_peer, liveness=liveness, clock=time.time)
        nursery.start_soon(follow_hints, me, registry.records, liveness, check, lambda s: registry.update_local(suspects=s), time.time)
        watch_own_reachability(mesh, registry, own, swarm_key, nursery)
        use_relays(mesh, registry, own, config, nursery)

        mesh_chains = audited_mesh_chains(mesh, nursery, server, registry, model_id, model.total_blocks, config, links=links,
                                          trunks=chain_trunks)  # fmt: skip
        generator = Generator(
            model.name,
            model.tokenizer,
            model.context_length,
            NodeChains(keeper, mesh_chains, model.total_blocks),
            eos_token_ids(model.tokenizer, model.generation_config),
            route_wait=config.route_wait,
            repair=lambda: repair(registry.servers(), model.total_blocks),
            drafts=await draft_source(config, model, nursery),
            draft_tokens=config.draft_tokens,
        )
        links_taken = (lambda: links.taken) if links is not None else None
        trunk_counts = partial(counted_trunks, server, chain_trunks)
        own_figures = NodeCollector(keeper, registry, batch_stats, model.total_blocks)
        if api is not None:
            app = create_app(generator, api_key=config.api_key, swarm=registry.to_json, stage_counts=keeper.stage_counts,
                             links_taken=links_taken, trunk_counts=trunk_counts, cors_origins=config.cors_origins,
                             prefix_counts=keeper.prefix_counts, collectors=[own_figures])
            url = http_url(api[0], await nursery.start(serve, app, api[0], api[1]))
            registry.update_local(api=url)
            say(f"gateway ready at {url} (OpenAI base URL {url}/v1)")
        if (where := config.metrics_host_port) is not None:
            metrics = create_metrics_app(stage_counts=keeper.stage_counts, links_taken=links_taken, trunk_counts=trunk_counts,
                                         api_key=config.api_key, prefix_counts=keeper.prefix_counts, collectors=[own_figures])
            say(f"metrics at {http_url(where[0], await nursery.start(serve, metrics, where[0], where[1]))}/metrics")
        if stop is not None:
            await stop.wait()
            await drain(keeper, generator, config.drain_timeout, say)
            nursery.cancel_scope.cancel()


async def drain(keeper: SpanKeeper, generator: Generator, timeout: float, say: Callable[[str], None]) -> None:
    """A graceful stop: announce ``draining`` (routing stops choosing this node), take
    no new sessions or requests, and let the running ones finish, up to ``timeout``."""
    say(f"draining: finishing running sessions (up to {timeout:.0f} s)")
    generator.accepting = False
    with trio.move_on_after(timeout):
        await keeper.drain(timeout)
        while generator.active:
            await trio.sleep(0.1)
    left = keeper.server.sessions_on(keeper.held.hop) if keeper.held is not None else 0
    if left or generator.active:
        say(f"stopping with {left + generator.active} session(s) unfinished")
    else:
        say("drained; stopping")


async def run_until_signalled(config: NodeConfig) -> None:
    """Runs the node until SIGINT or SIGTERM: the first drains and stops, a second
    stops at once."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if stop.is_set():
                        print(f"received {name} again, stopping now", file=sys.stderr, flush=True)
                        nursery.cancel_scope.cancel()
                        return
                    print(f"received {name}, draining (again to stop at once)", file=sys.stderr, flush=True)
                    stop.set()

        nursery.start_soon(stop_on_signal)
        await run_node(config, stop=stop)
        nursery.cancel_scope.cancel()


def main(config: NodeConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The hub client's HTTP libraries log every request at INFO; downloads show progress
    # bars instead.
    for chatty in ("httpx", "httpx2", "huggingface_hub"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    if os.environ.get("SHARDMESH_DEBUG"):
        logging.getLogger("shardmesh").setLevel(logging.DEBUG)
    trio.run(run_until_signalled, config)
    return 0
