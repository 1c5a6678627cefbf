"""The composition root: one trio nursery holding host, registry, stage server, gateway.

Everything a node does is started here and nowhere else, so the whole lifetime of a
node is one readable function (:func:`run_node`): read the model's config, start the
libp2p host, load this node's blocks, publish its signed record, serve its hop of other
people's chains, and (unless ``--api off``) serve the OpenAI API over whatever chain of
peers covers the model.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import trio

from . import __version__
from .api.app import create_app, serve
from .api.generate import Generator, eos_token_ids
from .backends.compute_thread import compute_thread
from .backends.local_chain import LocalChains
from .backends.runner import StageRunner
from .backends.served_stage import ServedStage
from .backends.throughput import cached_block_throughput, default_cache_dir, throughput_cache_key
from .backends.base import Stage
from .backends.choose import build_stage, choose_backend
from .backends.weights import ModelFiles, identity_bytes, resolve
from .config import NodeConfig
from .mesh.discovery import Discovery
from .mesh.host import MeshHost, default_key_file, load_or_create_identity, running_host
from .mesh.records import NodeRecord, model_identity, server_view
from .mesh.registry import Registry
from .mesh.rtt import publish_rtts
from .mesh.session import MeshChains
from .mesh.stage_server import Limits, StageServer
from .mesh.swarm_map import PROTOCOL as SWARM_MAP_PROTOCOL, swarm_map_handler
from .placement.routing import FailureBackoff, Hop, find_route

log = logging.getLogger("shardmesh.node")


@dataclass
class LoadedModel:
    """What a node knows about its model once the files are local."""

    name: str
    files: ModelFiles
    tokenizer: object
    config: object
    generation_config: object | None

    @property
    def total_blocks(self) -> int:
        return self.config.num_hidden_layers

    @property
    def context_length(self) -> int:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return int(getattr(text, "max_position_embeddings", 2048))


def model_name(files: ModelFiles) -> str:
    """The id clients use: the hub id, or the folder's name for a local model."""
    return files.hub[0] if files.hub else files.root.resolve().name


def load_model_meta(config: NodeConfig) -> LoadedModel:
    """Config, tokenizer and weight index; no weights yet (may download small files)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    files = resolve(config.model, config.revision)
    try:
        generation_config = GenerationConfig.from_pretrained(files.root)
    except OSError:
        generation_config = None
    return LoadedModel(
        name=model_name(files),
        files=files,
        tokenizer=AutoTokenizer.from_pretrained(files.root),
        config=AutoConfig.from_pretrained(files.root),
        generation_config=generation_config,
    )


async def expire_idle_sessions(runner: StageRunner, idle_seconds: float) -> None:
    """Frees the caches of sessions whose client vanished without closing them."""
    while True:
        await trio.sleep(min(30.0, idle_seconds))
        for session_id in await runner.expire_idle(idle_seconds):
            log.info("closed idle session %s", session_id)


@dataclass
class LocalBlocks:
    """The blocks this node serves, once loaded."""

    stage: Stage
    runner: StageRunner
    throughput: float


async def load_blocks(config: NodeConfig, model: LoadedModel, model_id: str, span: tuple[int, int], say) -> LocalBlocks:
    start, end = span
    backend = choose_backend(config.backend)
    say(f"loading blocks [{start}, {end}) of {model.name} ({backend})")
    compute = compute_thread()
    stage = await compute.run(
        lambda: build_stage(
            backend,
            model.files,
            start,
            end,
            model_name=model.name,
            dtype=config.dtype,
            device=config.device,
            cache_budget_bytes=int(config.kv_cache_gb * (1 << 30)),
        )
    )
    key = throughput_cache_key(f"{model_id}|{backend}", stage.info.device, stage.info.dtype)
    throughput = await compute.run(cached_block_throughput, stage, default_cache_dir(), key)
    say(
        f"serving {model.name} blocks [{start}, {end}) with {backend} on {stage.info.device} in {stage.info.dtype} "
        f"({throughput:.0f} tokens/s per block)"
    )
    return LocalBlocks(stage, StageRunner(stage), throughput)


def local_record(mesh: MeshHost, model: LoadedModel, model_id: str, span, blocks: LocalBlocks | None, limits: Limits, api: str | None) -> NodeRecord:
    start, end = span or (0, 0)
    info = blocks.stage.info if blocks else None
    return NodeRecord(
        peer=mesh.peer_id_str,
        addrs=tuple(mesh.dialable_addrs()),
        model=model_id,
        start=start,
        end=end,
        total_blocks=model.total_blocks,
        state="online",  # blocks are loaded before the first record (`--layers auto` will announce joining)
        throughput=blocks.throughput if blocks else 0.0,
        cache_tokens_free=blocks.stage.cache_tokens_free if blocks else 0,
        backend=info.backend if info else "none",
        device=info.device if info else "none",
        dtype=info.dtype if info else "none",
        rtt={},
        version=__version__,
        seq=0,
        expires=0.0,
        api=api,
        limits=limits.as_record(),
    )


async def publish_free_cache(registry: Registry, stage: Stage, every: float = 2.0) -> None:
    """Keeps ``cache_tokens_free`` in the record current, so routing sees busy nodes."""
    last = None
    while True:
        await trio.sleep(every)
        free = stage.cache_tokens_free
        if free != last:
            registry.update_local(cache_tokens_free=free)
            last = free


def route_finder(registry: Registry, backoff: FailureBackoff, me: str, total_blocks: int):
    def find(tokens_needed: int) -> list[Hop] | None:
        servers = [server_view(r) for r in registry.records() if r.serves_blocks]
        return find_route(servers, total_blocks, origin=me, exclude=backoff.excluded(time.monotonic()), tokens_needed=tokens_needed)

    return find


async def run_node(config: NodeConfig, announce: Callable[[str], None] | None = None) -> None:
    """Join (or start) the swarm, load the span, start the gateway, serve until cancelled."""
    say = announce or (lambda line: print(line, flush=True))
    # Abandonable: Ctrl-C during a long download must stop the node, not wait for it.
    model = await trio.to_thread.run_sync(load_model_meta, config, abandon_on_cancel=True)
    span = config.span(model.total_blocks)
    model_id = model_identity(model.name, *identity_bytes(model.files))
    key_pair = load_or_create_identity(Path(config.key_file) if config.key_file else default_key_file())
    limits = Limits(idle_timeout=config.session_idle_timeout)
    api = config.api_host_port

    async with running_host(key_pair, list(config.listen)) as mesh, trio.open_nursery() as nursery:
        discovery = Discovery(mesh, list(config.join), mdns=config.mdns)
        for addr in mesh.addrs():
            say(f"listening on {addr}")
        blocks = await load_blocks(config, model, model_id, span, say) if span else None
        if blocks:
            await nursery.start(blocks.runner.run)
            nursery.start_soon(expire_idle_sessions, blocks.runner, config.session_idle_timeout)
        registry = Registry(mesh, model_id, local_record(mesh, model, model_id, span, blocks, limits, None))
        await nursery.start(registry.run)
        mesh.set_handler(SWARM_MAP_PROTOCOL, swarm_map_handler(registry))  # for `shardmesh status`
        await nursery.start(discovery.run)
        server = StageServer(
            mesh,
            ServedStage(blocks.runner) if blocks else None,
            model_id,
            model.total_blocks,
            model.context_length,
            limits,
            addrs_of=lambda peer: list(r.addrs) if (r := registry.get(peer)) else [],
        )
        await nursery.start(server.run)
        if blocks:
            nursery.start_soon(publish_free_cache, registry, blocks.stage)
        me = mesh.peer_id_str
        nursery.start_soon(
            publish_rtts,
            mesh,
            lambda: [r.peer for r in registry.records() if r.end > r.start and r.peer != me],
            lambda rtt: registry.update_local(rtt=rtt),
        )

        if blocks and span == (0, model.total_blocks):
            chains = LocalChains([blocks.runner])  # the whole model here: no network in the way
        else:
            backoff = FailureBackoff()
            chains = MeshChains(
                nursery=nursery,
                open_stream=server.open_stream,
                find_route=route_finder(registry, backoff, mesh.peer_id_str, model.total_blocks),
                model_id=model_id,
                gateway=mesh.peer_id_str,
                on_failure=lambda peer: backoff.failed(peer, time.monotonic()),
                on_success=lambda route: [backoff.succeeded(h.peer) for h in route],
            )
        generator = Generator(
            model.name,
            model.tokenizer,
            model.context_length,
            chains,
            eos_token_ids(model.tokenizer, model.generation_config),
        )
        if api is not None:
            app = create_app(generator, api_key=config.api_key, swarm=registry.to_json)
            port = await nursery.start(serve, app, api[0], api[1])
            host = f"[{api[0]}]" if ":" in api[0] else api[0]
            url = f"http://{host}:{port}"
            registry.update_local(api=url)
            say(f"gateway ready at {url} (OpenAI base URL {url}/v1)")


async def run_until_signalled(config: NodeConfig) -> None:
    """Runs the node until SIGINT or SIGTERM, then cancels everything cleanly."""
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    print(f"received {signal.Signals(signum).name}, stopping", file=sys.stderr, flush=True)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        await run_node(config)
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
