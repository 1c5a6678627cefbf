"""The composition root: one trio nursery holding the stage runner and the gateway.

Everything a node does is started here and nowhere else, so the whole lifetime of a
node is one readable function. The mesh (libp2p host, registry, stage server) plugs in
here too.
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from typing import Callable

import trio

from .api.app import create_app, serve
from .api.generate import Generator, eos_token_ids
from .backends.compute_thread import compute_thread
from .backends.local_chain import LocalChains
from .backends.runner import StageRunner
from .backends.torch_stage import TorchStage
from .backends.weights import ModelFiles, resolve
from .config import NodeConfig, UsageError

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


async def run_node(config: NodeConfig, announce: Callable[[str], None] | None = None) -> None:
    """Load the span, start the gateway, serve until cancelled."""
    say = announce or (lambda line: print(line, flush=True))
    # Abandonable: Ctrl-C during a long download must stop the node, not wait for it.
    model = await trio.to_thread.run_sync(load_model_meta, config, abandon_on_cancel=True)
    start, end = config.span(model.total_blocks)
    if (start, end) != (0, model.total_blocks):
        raise UsageError(
            f"--layers {config.layers}: serving part of a model needs peers for the other blocks; "
            "this build serves whole models only (--layers all)"
        )
    say(f"loading blocks [{start}, {end}) of {model.name}")
    stage = await compute_thread().run(
        lambda: TorchStage(
            model.files,
            start,
            end,
            model_name=model.name,
            dtype=config.dtype,
            device=config.device,
            cache_budget_bytes=int(config.kv_cache_gb * (1 << 30)),
        )
    )
    say(f"serving {model.name} blocks [{start}, {end}) on {stage.info.device} in {stage.info.dtype}")
    runner = StageRunner(stage)
    generator = Generator(
        model.name,
        model.tokenizer,
        model.context_length,
        LocalChains([runner]),
        eos_token_ids(model.tokenizer, model.generation_config),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        nursery.start_soon(expire_idle_sessions, runner, config.session_idle_timeout)
        api = config.api_host_port
        if api is not None:
            app = create_app(generator, api_key=config.api_key)
            port = await nursery.start(serve, app, api[0], api[1])
            host = f"[{api[0]}]" if ":" in api[0] else api[0]
            say(f"gateway ready at http://{host}:{port} (OpenAI base URL http://{host}:{port}/v1)")


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
    trio.run(run_until_signalled, config)
    return 0
