"""The network: everything that crosses between nodes, over py-libp2p and hop links.

This room runs the libp2p host and finds peers; publishes, verifies and keeps the
swarm's signed records (the view, gossip, the DHT and the thin registry over them);
serves this node's hop of other people's chains (``/shardmesh/infer/1.0.0``) and opens
the gateway's own; and moves sessions to hop links. It imports only the contract and
``placement``, and never a tensor library: tensors cross it as raw bytes. See
``docs/ARCHITECTURE.md`` and, for every byte on the wire, ``docs/PROTOCOL.md``.

The names below are this room's public modules; importing the package loads none of
them (``from shardmesh.mesh import wire`` does).
"""

__all__ = [
    "addresses",
    "allow_list",
    "answer_check",
    "audit_policy",
    "audited_chains",
    "cbor_plain",
    "chain_blame",
    "chain_client",
    "deadlines",
    "dht",
    "dht_peers",
    "dht_values",
    "dialback",
    "discovery",
    "gateway_ticket",
    "gossip",
    "hints",
    "hole_punch",
    "hop_attach",
    "hop_server",
    "hop_session",
    "hop_step",
    "host",
    "identity",
    "link",
    "link_offers",
    "liveness",
    "mdns",
    "mesh_chains",
    "names",
    "next_hop",
    "notifee",
    "one_at_a_time",
    "open_rate",
    "open_request",
    "own_addresses",
    "peer_table",
    "pipe",
    "prefix_wire",
    "read_exactly",
    "reclaim",
    "record_checks",
    "record_keys",
    "records",
    "registry",
    "registry_stats",
    "relay_client",
    "relay_dial",
    "relay_service",
    "relay_wire",
    "result_tokens",
    "result_trunks",
    "rtt",
    "shared_port",
    "step_inbox",
    "swarm_key",
    "swarm_map",
    "swarm_view",
    "trunk",
    "trunk_frame",
    "trunk_server",
    "view_room",
    "wire",
    "without_cancel",
]
