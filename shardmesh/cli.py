"""``shardmesh run | status | tiny-model | bench | sim``: the command line."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .node.openmp_spin import limit_idle_spin


def _add_run(sub) -> None:
    from .node.config import NodeConfig

    p = sub.add_parser("run", help="serve a model (or part of one) and the OpenAI gateway")
    p.add_argument("--model", default=None,
                   help="local folder in Hugging Face layout, or a hub id like Qwen/Qwen3-0.6B; left out with --layers none, "
                        "the node is a gateway for every model the swarm serves (fetched from the hub by name)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--layers", default=NodeConfig.layers,
                   help="blocks to serve: 'auto' (default: what the swarm lacks most, as much as memory allows), "
                        "'all', START:END, or 'none' (a gateway without weights)")
    p.add_argument("--api", default="127.0.0.1:8000", help="HOST:PORT of the OpenAI gateway (port 0 picks one), or 'off'")
    p.add_argument("--api-key", default=None, help="require this bearer key (or set SHARDMESH_API_KEY)")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve Prometheus /metrics at HOST:PORT (port 0 picks one): for a node with --api off, whose "
                        "gateway would otherwise carry them (with --api-key, /metrics wants the key)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages of ORIGIN (e.g. http://localhost:3000; '*' for any) call the API from a browser "
                        "(repeatable; default: none)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--prefill-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the dtype prefill steps compute in (torch); auto: float32 for a bfloat16 or float16 model on a CPU "
                        "that multiplies bfloat16 only by emulation (no AVX-512 BF16, AMX or ARM BF16) unless --dtype is given, "
                        "else the model's dtype")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "mlx"],
                   help="auto: MLX on Apple silicon (when installed), torch elsewhere")
    p.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV cache budget of this node (GiB)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for this node's blocks (torch; default: one per core). "
                        "Nodes sharing a machine should split its cores between them")
    p.add_argument("--listen", action="append", default=None, metavar="MULTIADDR",
                   help="libp2p listen address (repeatable; default /ip4/0.0.0.0/tcp/4001; tcp/0 picks a port)")
    p.add_argument("--join", action="append", default=[], metavar="MULTIADDR",
                   help="a peer of the swarm to join, ending in /p2p/<peer id> (repeatable); none: start a new swarm")
    p.add_argument("--announce", action="append", default=[], metavar="MULTIADDR",
                   help="an address others can dial this node at, published instead of the listening ones "
                        "(repeatable): a port forwarded on the router, a DNS name (/dns4/NAME/tcp/PORT)")
    p.add_argument("--key-file", default=None, help="the node's identity key (created on first run; default in ~/.local/share/shardmesh)")
    p.add_argument("--no-mdns", action="store_true", help="do not look for peers on the LAN by multicast DNS")
    p.add_argument("--link-port", type=int, default=NodeConfig.link_port, metavar="PORT",
                   help="a TCP port of their own for hop links, the sessions' direct encrypted connections "
                        "(0: any free port; default: they share the libp2p port, the one port to forward behind a NAT)")
    p.add_argument("--relay-service", default="on", choices=["on", "off"],
                   help="while peers can dial this node, relay for nodes behind NATs that they cannot dial "
                        "(circuit relay v2, bounded per peer, in bytes and in time; default on)")
    p.add_argument("--no-links", action="store_true",
                   help="keep every session on its libp2p stream (slower per hop; for networks that allow one port only)")
    p.add_argument("--no-trunks", action="store_true",
                   help="send each session's steps on its own stream or link, not those of concurrent sessions to the same next hop in one frame")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every history from its start: keep no finished session's keys and values for the "
                        "next turn of a chat, and ask no hop for them")
    p.add_argument("--max-blocks", type=int, default=NodeConfig.max_blocks, metavar="N", help="with --layers auto: serve at most N blocks")
    p.add_argument("--memory-fraction", type=float, default=NodeConfig.memory_fraction, metavar="F",
                   help="with --layers auto: share of the free memory (VRAM on a GPU) to fill with weights + KV cache (default %(default)g)")
    p.add_argument("--memory-gb", type=float, default=NodeConfig.memory_gb, metavar="GB",
                   help="with --layers auto: memory for weights + KV cache, instead of measuring free memory")
    p.add_argument("--rebalance-interval", type=float, default=NodeConfig.rebalance_interval, metavar="S",
                   help="mean seconds between checks whether moving to other blocks would help the swarm (default %(default)g)")
    p.add_argument("--route-wait", type=float, default=NodeConfig.route_wait, metavar="S",
                   help="seconds a request waits for a working chain of peers before answering 503 (default %(default)g)")
    p.add_argument("--drain-timeout", type=float, default=NodeConfig.drain_timeout, metavar="S",
                   help="seconds running sessions get to finish on stop (SIGINT/SIGTERM) or a move (default %(default)g)")
    p.add_argument("--audit-rate", type=float, default=NodeConfig.audit_rate, metavar="R",
                   help="share of generated tokens this gateway re-checks on independent peers; a new peer's first "
                        "tokens are always checked; 0 turns auditing off (default %(default)g)")
    p.add_argument("--no-speculation", action="store_true",
                   help="this gateway sends one token per decode step (default: it proposes draft tokens, found by "
                        "prompt lookup or --draft-model, that the chain checks in the same trip; output is the same)")
    p.add_argument("--draft-tokens", type=int, default=NodeConfig.draft_tokens, metavar="K",
                   help="the most draft tokens per decode step, 1 to 16 (default %(default)d); "
                        "how many up to that adapts to how many are kept")
    p.add_argument("--draft-model", default=None, metavar="PATH",
                   help="a small model with the same tokenizer (a folder or a hub id), run at this gateway to propose draft tokens "
                        "(default: prompt lookup, which needs no model)")
    p.add_argument("--allow-peers", default=None, metavar="FILE",
                   help="a private swarm: talk only to the peer ids in FILE (one per line); others are disconnected and never routed to")
    p.add_argument("--swarm-key", default=None, metavar="FILE",
                   help="a private swarm: every connection needs the pre-shared key in FILE (libp2p pnet; "
                        "make one with `shardmesh swarm-key FILE`)")


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="show the swarm map (peers, spans, coverage) of the swarm a peer belongs to")
    p.add_argument("--join", required=True, metavar="MULTIADDR",
                   help="any peer of the swarm, ending in /p2p/<peer id>; it is the only address dialled")
    p.add_argument("--json", action="store_true", help="print the map as JSON")
    p.add_argument("--swarm-key", default=None, metavar="FILE", help="the key of a private swarm (see `run --swarm-key`)")
    p.add_argument("--timeout", type=float, default=15.0, metavar="S",
                   help="seconds to reach the peer and get its map (default 15)")


def _add_swarm_key(sub) -> None:
    p = sub.add_parser("swarm-key", help="write a new pre-shared key for a private swarm (--swarm-key)")
    p.add_argument("path", metavar="FILE", help="where to write it (never overwritten; readable by you only)")


def _add_tiny(sub) -> None:
    from .tools.tiny_config import ARCHS  # torch-free: every command builds this parser

    p = sub.add_parser("tiny-model", help="write a tiny random model + tokenizer (offline tests and demos)")
    p.add_argument("path")
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)


def _thread_settings(text: str) -> list[int | None]:
    """``default,1`` -> [None, 1]: None leaves torch's own thread count."""
    settings: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        if part == "default":
            setting = None
        elif part.isdigit() and int(part) > 0:
            setting = int(part)
        else:
            raise argparse.ArgumentTypeError(f"{part!r} is not a thread count: use positive integers or 'default'")
        if setting in settings:
            raise argparse.ArgumentTypeError(f"{part!r} is given twice")
        settings.append(setting)
    return settings


def _session_counts(text: str) -> list[int]:
    """``1,4,12`` -> [1, 4, 12]: numbers of concurrent sessions, each once, in order."""
    counts = []
    for part in text.split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a number of sessions: use positive integers")
        counts.append(int(part))
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError("a number of sessions is given twice")
    return sorted(counts)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure decode speed against transformers generate")
    p.add_argument("--model", default=None, help="model folder (default: a cached 100M-parameter tiny Llama)")
    p.add_argument("--tokens", type=int, default=128, help="tokens to decode per run")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs of each path; the best is reported")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions for the batching figure")
    p.add_argument("--mesh", action="store_true", help="node processes on loopback: 3-node chain vs one process, per-hop cost")
    p.add_argument("--concurrent", type=_session_counts, default=None, metavar="N[,N...]",
                   help="aggregate tokens/s of N concurrent chats through one node and 2- and 3-node chains "
                        "(node processes and a gateway), e.g. 1,4,12")
    p.add_argument("--wan", action="store_true",
                   help="a chain over emulated distance (a delay line in front of every node, on loopback): decode tok/s "
                        "against the latency bound, and time to first token, without and with the delay")
    p.add_argument("--delay-ms", type=float, default=10.0, metavar="MS", help="with --wan: one-way delay per link (default %(default)g)")
    p.add_argument("--hops", type=int, default=3, metavar="N", help="with --wan: serving nodes in the chain (default %(default)d)")
    p.add_argument("--draft-k", type=int, default=4, metavar="K",
                   help="with --wan: the most draft tokens per step of the gateway whose draft model is the target (default %(default)d)")
    p.add_argument("--internet", action="store_true",
                   help="on an emulated internet (network namespaces, as root): connection set-up direct and through "
                        "a relay, and a 3-hop chain's decode speed with every hop public vs every hop behind a NAT")
    p.add_argument("--stage", action="store_true",
                   help="the torch stage alone on its device (--device): decode steps at batch 1, 8 and 32, steps with "
                        "draft tokens, prefills")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="with --stage: where it runs")
    p.add_argument("--prefill", action="store_true",
                   help="time to first token of a 2,048-token prompt through 1- and 3-node chains next to transformers' "
                        "forward in bfloat16 and float32, and over the turns of a growing chat")
    p.add_argument("--grammar", action="store_true",
                   help="what constrained decoding (response_format json_schema) costs per token: each grammar engine "
                        "installed here on a 131,072-token vocabulary")
    p.add_argument("--memory", action="store_true",
                   help="resident memory of a --layers none gateway and of a serving node (beyond weights and KV cache)")
    p.add_argument("--audit", action="store_true",
                   help="what auditing costs: the same chats through a gateway with and without --audit-rate")
    p.add_argument("--churn", type=int, default=0, metavar="N",
                   help="a serving node's memory and view while N fresh identities publish records (e.g. 3000)")
    p.add_argument(
        "--threads", type=_thread_settings, default=[None, 1], metavar="N[,N...]",
        help="with --mesh or --concurrent: torch threads per process, one measurement for each; 'default' is torch's own count (default: default,1)",
    )


def _add_sim(sub) -> None:
    from .tools import sim as sim_cli

    sim_cli.add_arguments(sub.add_parser("sim", help=sim_cli.HELP))


def run(args) -> int:
    from .backends.weights import ModelSourceError
    from .contract import MAX_DRAFT_TOKENS
    from .node.config import NodeConfig, UsageError, env_api_key
    from .node.run import main as node_main

    config = NodeConfig(
        model=args.model,
        revision=args.revision,
        layers=args.layers,
        api=args.api,
        api_key=args.api_key or env_api_key(),
        dtype=args.dtype,
        prefill_dtype=args.prefill_dtype,
        device=args.device,
        backend=args.backend,
        kv_cache_gb=args.kv_cache_gb,
        threads=args.threads,
        listen=tuple(args.listen or NodeConfig.listen),
        join=tuple(args.join),
        announce=tuple(args.announce),
        key_file=args.key_file,
        mdns=not args.no_mdns,
        links=not args.no_links,
        trunks=not args.no_trunks,
        prefix_cache=not args.no_prefix_cache,
        relay_service=args.relay_service == "on",
        link_port=args.link_port,
        max_blocks=args.max_blocks,
        memory_fraction=args.memory_fraction,
        memory_gb=args.memory_gb,
        rebalance_interval=args.rebalance_interval,
        route_wait=args.route_wait,
        drain_timeout=args.drain_timeout,
        allow_peers=args.allow_peers,
        swarm_key=args.swarm_key,
        audit_rate=args.audit_rate,
        metrics=args.metrics,
        cors_origins=tuple(args.cors_origin),
        speculation=not args.no_speculation,
        draft_model=args.draft_model,
        draft_tokens=args.draft_tokens,
    )
    try:
        if not 1 <= config.draft_tokens <= MAX_DRAFT_TOKENS:
            raise UsageError(f"--draft-tokens wants 1 to {MAX_DRAFT_TOKENS}, got {config.draft_tokens}")
        if config.draft_model is not None and not config.speculation:
            raise UsageError("--draft-model proposes draft tokens, --no-speculation turns them off: choose one")
        config.api_host_port
        config.metrics_host_port
        if config.model is None and config.layers != "none":
            raise UsageError("--model is needed to serve blocks; without it, --layers none makes a gateway for whatever the swarm serves")
        if config.model is None and config.allow_peers is not None:
            raise UsageError("--allow-peers is not supported yet by a gateway without --model; name the model it serves")
        if config.threads is not None and config.threads < 1:
            raise UsageError(f"--threads wants a positive number of threads, got {config.threads}")
        if not 0 <= config.audit_rate <= 1:
            raise UsageError(f"--audit-rate wants a share between 0 and 1, got {config.audit_rate:g}")
        _check_addresses(config)
        return node_main(config)
    except BaseException as exc:
        # Errors the user can fix (bad flags, a model that cannot be found) get one
        # plain line; anything else keeps its traceback.
        leaves = _leaves(exc)
        if not all(isinstance(e, (ModelSourceError, UsageError)) for e in leaves):
            raise
        for leaf in leaves:
            print(f"shardmesh: {leaf}", file=sys.stderr)
        return 2


def _check_addresses(config) -> None:
    """Bad --listen / --join / --announce addresses are the user's to fix: one line, before anything starts."""
    from multiaddr import Multiaddr

    from .node.config import UsageError
    from .mesh.addresses import parse_join_address
    from .mesh.host import port_in_use

    for address in config.listen:
        try:
            Multiaddr(address)
        except Exception as exc:
            raise UsageError(f"--listen {address}: not a multiaddr ({exc})") from exc
        if port_in_use(address):
            raise UsageError(
                f"--listen {address}: that port is in use (another node on this machine?); "
                "pick another port, or tcp/0 for a free one"
            )
    for address in config.join:
        try:
            parse_join_address(address)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    for address in config.announce:
        try:
            protocols = [p.name for p in Multiaddr(address).protocols()]
        except Exception as exc:
            raise UsageError(f"--announce {address}: not a multiaddr ({exc})") from exc
        if "tcp" not in protocols or protocols[0] not in ("ip4", "ip6", "dns", "dns4", "dns6"):
            raise UsageError(f"--announce {address}: wants an IP or DNS name and a TCP port, e.g. /ip4/203.0.113.7/tcp/4001")


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups raised by nurseries."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def status(args) -> int:
    from .tools.status import main as status_main

    return status_main(args.join, as_json=args.json, timeout=args.timeout, swarm_key=args.swarm_key)


def swarm_key(args) -> int:
    from .mesh.swarm_key import SwarmKeyError, write_new_swarm_key

    try:
        key = write_new_swarm_key(args.path)
    except SwarmKeyError as exc:
        print(f"shardmesh swarm-key: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a new swarm key to {args.path} (fingerprint {key.fingerprint()}); copy it to every node of the "
          f"private swarm and start each with --swarm-key {args.path}")
    return 0


def tiny_model(args) -> int:
    from .tools.tiny_build import build_tiny_model

    path = build_tiny_model(args.path, args.arch, layers=args.layers, hidden=args.hidden, seed=args.seed)
    print(f"wrote a tiny {args.arch} model to {path}; serve it with: shardmesh run --model {path}")
    return 0


def bench(args) -> int:
    from .tools.bench import run_bench

    return run_bench(args)


def sim(args) -> int:
    from .tools.sim import run as run_sim

    return run_sim(args)


def main(argv: list[str] | None = None) -> int:
    limit_idle_spin()  # first: building the parsers imports torch
    parser = argparse.ArgumentParser(prog="shardmesh", description="LLM inference across many machines, one service")
    parser.add_argument("--version", action="version", version=f"shardmesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_status(sub)
    _add_swarm_key(sub)
    _add_tiny(sub)
    _add_bench(sub)
    _add_sim(sub)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"run": run, "status": status, "swarm-key": swarm_key, "tiny-model": tiny_model, "bench": bench, "sim": sim}[args.command](args)
