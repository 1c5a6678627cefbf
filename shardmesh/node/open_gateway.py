"""A gateway for whatever the swarm serves: ``shardmesh run --layers none`` with no ``--model``.

It holds no blocks and names no model. Every 2 s (every 30 s once it has run a minute)
it asks a sample of the peers it is connected to for their swarm maps
(:mod:`shardmesh.mesh.model_finder`); each model that is served whole and that it does
not serve yet, it opens: the model's small files by identity (the hub id before the
``@``, :func:`~.model.files_of`), a registry on the model's own gossip topic and DHT
keys (announcing this node there as a gateway), chains over its peers, audited as any
gateway's, and a generator, added to the one OpenAI API
(``api/app.py``): ``/v1/models`` lists every model opened, and a request goes to the
one it names. A model that cannot be opened (its files are nowhere to be found, or are
other weights under its name) is said once and not tried again.

Deliberately plainer than a node with a model (``run.py``): no hop links and no trunks
(its sessions use ordinary streams), no rtt or hint publishing, and no blocks to serve.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Callable

import trio

from ..api.app import create_app, serve
from ..api.generate import Generator, eos_token_ids
from ..api.speculation import PromptLookupSource
from ..backends.weights import ModelSourceError
from ..mesh.discovery import Discovery
from ..mesh.hop_server import HopServer, Limits
from ..mesh.host import MeshHost, running_host
from ..mesh.liveness import PING_TIMEOUT, ping_connected
from ..mesh.model_finder import ServedModel, find_served_models
from ..mesh.registry import Registry
from ..mesh.rtt import answers_ping
from ..placement.spans import repair
from .chains import audited_mesh_chains, connected_online_peers
from .config import NodeConfig
from .model import LoadedModel, files_of, loaded_model
from .startup import http_url, local_record, read_key

__all__ = ["EAGER_FOR", "FIND_EVERY", "MAX_MODELS", "REFIND_EVERY", "serve_open_gateway"]

log = logging.getLogger("shardmesh.node.open_gateway")

FIND_EVERY = 2.0  # seconds between two rounds of asking the connected peers what they serve, at first
EAGER_FOR = 60.0  # seconds after start that it asks that often; then every REFIND_EVERY
REFIND_EVERY = 30.0  # a map can be megabytes: a settled gateway asks rarely
MAX_MODELS = 16  # models one gateway opens: records are free to forge, a registry and its files are not


async def open_model(
    mesh: MeshHost, nursery: trio.Nursery, config: NodeConfig, model: LoadedModel, model_id: str, api_url: str | None,
) -> Generator:
    """This gateway's part in ``model_id``'s swarm: its registry, chains and generator."""
    limits = Limits(idle_timeout=config.session_idle_timeout)
    record = local_record(mesh, [str(a) for a in mesh.addrs()], model, model_id, limits)
    registry = Registry(mesh, model_id, record)
    await nursery.start(registry.run)
    # The model's records now, from the peers that showed it to us (signed: verified
    # again here), rather than whenever gossip and the DHT bring them.
    await registry.sync_from([p.to_base58() for p in mesh.connected_peers()])
    if api_url is not None:
        registry.update_local(api=api_url)
    server = HopServer(mesh, None, model_id, model.total_blocks, model.context_length, limits, hidden_size=model.hidden_size,
                       unreachable=lambda peer: registry.view.liveness.since(peer) is not None, trunks=False,
                       prefix_cache=config.prefix_cache)  # fmt: skip
    await nursery.start(server.run)
    nursery.start_soon(ping_connected, partial(connected_online_peers, mesh, registry), partial(answers_ping, mesh, timeout=PING_TIMEOUT),
                       registry.view.liveness, time.time)
    return Generator(
        model.name,
        model.tokenizer,
        model.context_length,
        audited_mesh_chains(mesh, nursery, server, registry, model_id, model.total_blocks, config),
        eos_token_ids(model.tokenizer, model.generation_config),
        route_wait=config.route_wait,
        repair=lambda: repair(registry.servers(), model.total_blocks),
        drafts=PromptLookupSource() if config.speculation else None,  # a --draft-model is one model's, not every model's
        draft_tokens=config.draft_tokens,
    )


async def serve_open_gateway(config: NodeConfig, key_pair, say: Callable[[str], None], stop: trio.Event | None) -> None:
    """:func:`~.run.run_node` for a node with no ``--model`` (see the module docstring)."""
    api = config.api_host_port
    async with running_host(key_pair, list(config.listen), read_key(config)) as mesh, trio.open_nursery() as nursery:
        for addr in mesh.addrs():
            say(f"listening on {addr}")
        await nursery.start(Discovery(mesh, list(config.join), mdns=config.mdns).run)
        app = create_app([], api_key=config.api_key, cors_origins=config.cors_origins)
        gateway = app.state.gateway
        url = None
        if api is not None:
            url = http_url(api[0], await nursery.start(serve, app, api[0], api[1]))
            say(f"gateway ready at {url} (OpenAI base URL {url}/v1): it serves the models it finds in the swarm")
        failed: set[str] = set()
        started = trio.current_time()
        while stop is None or not stop.is_set():
            peers = [p.to_base58() for p in mesh.connected_peers()]
            for found in (await find_served_models(mesh, peers)).values():
                if len(gateway.models) >= MAX_MODELS:
                    break
                if found.complete and found.name not in gateway.models and found.model not in failed:
                    generator = await _open_found(mesh, nursery, config, found, url, say, failed)
                    if generator is not None:
                        gateway.add(generator)
                        say(f"serving {found.name} ({found.total_blocks} blocks on {len(found.servers)} peers)")
            with trio.move_on_after(FIND_EVERY if trio.current_time() - started < EAGER_FOR else REFIND_EVERY):
                await (stop.wait() if stop is not None else trio.sleep_forever())
        say(f"draining: finishing running answers (up to {config.drain_timeout:.0f} s)")
        for generator in gateway.generators:
            generator.accepting = False
        with trio.move_on_after(config.drain_timeout):
            while any(g.active for g in gateway.generators):
                await trio.sleep(0.1)
        say("drained; stopping")
        nursery.cancel_scope.cancel()


async def _open_found(mesh: MeshHost, nursery: trio.Nursery, config: NodeConfig, found: ServedModel, url: str | None,
                      say: Callable[[str], None], failed: set[str]) -> Generator | None:  # fmt: skip
    """``found`` opened, or None (said once) when its files cannot be had."""
    try:
        files = await trio.to_thread.run_sync(files_of, found.model, abandon_on_cancel=True)
        model = await trio.to_thread.run_sync(loaded_model, files, abandon_on_cancel=True)
    except ModelSourceError as exc:
        failed.add(found.model)
        say(f"not serving {found.model}: {exc}")
        return None
    return await open_model(mesh, nursery, config, model, found.model, url)
