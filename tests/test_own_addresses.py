"""What a record says about where to reach its node (mesh/own_addresses.py), and how a
record's addresses are turned into dials (mesh/names.py ``dial_targets``)."""

from __future__ import annotations

import trio

from shardmesh.mesh.names import dial_targets
from shardmesh.mesh.own_addresses import OwnAddresses, likely_behind_nat, published_addrs
from shardmesh.mesh.record_checks import MAX_ADDRS

ME = "12D3KooWRBhwfeP2Y4TCx1SM6s9rUoHhR5STiGwxBhgFRcw3UERE"
RELAY = "12D3KooWLvz2xAJRDYfSnpkT5LBqnMrSV9h1f4ePJxj8rAZs3GcA"
LAN = f"/ip4/10.0.0.5/tcp/4001/p2p/{ME}"
LOOPBACK = f"/ip4/127.0.0.1/tcp/4001/p2p/{ME}"
CIRCUIT = f"/ip4/198.18.0.2/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}"
FORWARDED = f"/ip4/198.18.1.1/tcp/4001/p2p/{ME}"
NAMED = f"/dns4/node.example/tcp/4001/p2p/{ME}"


def test_what_each_reachability_publishes() -> None:
    listening = [LOOPBACK, LAN]
    assert published_addrs(listening, "public", reached=[FORWARDED]) == [FORWARDED, LOOPBACK, LAN]
    assert published_addrs(listening, "private", relayed=[CIRCUIT]) == [CIRCUIT]
    assert published_addrs(listening, "private") == []
    # A node alone (nobody to ask) publishes what it has; one that joins holds its
    # listening addresses back until peers have answered.
    assert published_addrs(listening, "unknown", relayed=[CIRCUIT]) == [LOOPBACK, LAN, CIRCUIT]
    assert published_addrs(listening, "unknown", relayed=[CIRCUIT], hold_until_known=True) == [CIRCUIT]
    # --announce replaces the listening addresses; relays stay while not public.
    assert published_addrs(listening, "public", announced=[NAMED], reached=[FORWARDED]) == [NAMED]
    assert published_addrs(listening, "private", announced=[NAMED], relayed=[CIRCUIT]) == [NAMED, CIRCUIT]
    many = [f"/ip4/10.0.0.{i}/tcp/4001/p2p/{ME}" for i in range(40)]
    assert published_addrs(many, "public", reached=[FORWARDED]) == [FORWARDED, *many[: MAX_ADDRS - 1]]


def test_who_holds_its_addresses_back() -> None:
    """Only a node that is all-LAN and joins beyond its LAN waits for the dial-back."""
    boot = f"/p2p/{RELAY}"
    assert likely_behind_nat([LAN, LOOPBACK], [f"/ip4/198.18.0.10/tcp/4001{boot}"])
    assert likely_behind_nat([LAN], [f"/dns4/boot.example.org/tcp/4001{boot}"])
    assert not likely_behind_nat([LAN], [f"/ip4/192.168.1.2/tcp/4001{boot}"])  # a LAN swarm
    assert not likely_behind_nat([LOOPBACK], [f"/ip4/127.0.0.1/tcp/4001{boot}"])  # one machine
    assert not likely_behind_nat([FORWARDED, LAN], [f"/ip4/198.18.0.10/tcp/4001{boot}"])  # has a public interface
    assert not likely_behind_nat([LAN], [])  # starts a swarm: nobody to ask


def test_own_addresses_publish_each_change() -> None:
    published: list[dict] = []
    own = OwnAddresses(ME, [LAN], lambda **changes: published.append(changes), hold_until_known=True)
    assert own.addrs() == []
    own.set_relayed([CIRCUIT])
    assert published[-1] == {"addrs": [CIRCUIT]}
    own.set_reach("private", [])
    assert published[-1] == {"reach": "private", "addrs": [CIRCUIT]}
    own.set_reach("public", ["/ip4/198.18.1.1/tcp/4001"])  # its port got forwarded
    assert published[-1] == {"reach": "public", "addrs": [FORWARDED, LAN]}


def test_dial_targets_resolve_names_and_put_loopback_last() -> None:
    hosts_name = "localhost"  # in every /etc/hosts: no name server needed
    addrs = [LOOPBACK, f"/dns4/{hosts_name}/tcp/4002/p2p/{ME}", CIRCUIT, LAN, "junk", f"/dns4/no-such-name.invalid/tcp/1/p2p/{ME}"]
    targets = trio.run(dial_targets, addrs)
    assert targets == [
        f"/ip4/198.18.0.2/tcp/4001/p2p/{RELAY}/p2p-circuit",  # only the final /p2p/ goes
        "/ip4/10.0.0.5/tcp/4001",
        "/ip4/127.0.0.1/tcp/4001",
        "/ip4/127.0.0.1/tcp/4002",
    ]
