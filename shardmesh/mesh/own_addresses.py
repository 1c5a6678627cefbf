"""Where others can reach us: the addresses our record publishes, and why those.

A node knows three kinds of address of its own, and publishes only the ones that work:

* its **listening** addresses (a wildcard expanded to each interface). Behind a home
  NAT these are private (``10.0.0.5``, ``192.168.1.20``): nobody outside can dial them,
  and publishing them only tells the world how the home network is laid out;
* the addresses peers **reached** it at when they dialled it back (:mod:`.dialback`):
  behind a router that forwards our port, the router's public address, which is the
  one to dial, so it goes first;
* addresses **announced** by hand (``--announce``: a forwarded port on the router, a DNS
  name), which the user knows to be right: they replace the listening ones;
* **relayed** addresses (``.../p2p/RELAY/p2p-circuit/p2p/US``), one per relay that holds
  a reservation for us: how a node behind a NAT is reached at all.

Which of them go in the record follows from whether peers could dial us back
(:mod:`.dialback`): see :func:`published_addrs`. :class:`OwnAddresses` holds the three
and the verdict, and hands the record's fields to whoever publishes it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .addresses import ip_of
from .record_checks import MAX_ADDRS, REACHABILITY

__all__ = ["OwnAddresses", "likely_behind_nat", "published_addrs"]

PUBLIC, PRIVATE, UNKNOWN = REACHABILITY

# Addresses that mean "this LAN" (RFC 1918, carrier-grade NAT, loopback, link-local,
# IPv6 unique-local). Not Python's is_private, which also covers ranges such as
# 198.18.0.0/15 that test networks route like the internet.
_LAN = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10",
)]


def _on_lan(addr: str) -> bool | None:
    """Whether an ``/ip4/`` or ``/ip6/`` address is a LAN one; None for a name."""
    ip = ip_of(addr)
    if ip is None:
        return None
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return any(parsed in net for net in _LAN if net.version == parsed.version)


def likely_behind_nat(listening: Sequence[str], joins: Sequence[str]) -> bool:
    """A node whose every listening address is a LAN one, joining a swarm beyond its
    LAN (a public IP or a DNS name): most likely behind a NAT. Such a node holds its
    listening addresses back until peers have said whether they can dial them."""
    return bool(joins) and all(_on_lan(a) for a in listening) and any(_on_lan(j) is not True for j in joins)


def published_addrs(
    listening: Sequence[str],
    reach: str,
    *,
    announced: Sequence[str] = (),
    relayed: Sequence[str] = (),
    reached: Sequence[str] = (),
    hold_until_known: bool = False,
) -> list[str]:
    """The addresses a record carries, at most ``MAX_ADDRS``:

    * with ``announced`` addresses: those, plus the relayed ones unless we are public
      (the user may be wrong about a forwarded port; a relay still works);
    * ``public``: where peers ``reached`` us, then the listening addresses;
    * ``private``: the relayed ones only;
    * ``unknown``: the listening addresses, plus any relayed ones; but while
      ``hold_until_known`` (:func:`likely_behind_nat`: it will be told within seconds)
      only the relayed ones: a node behind a NAT never publishes its private addresses,
      not even for the moment before the first answer.
    """
    if announced:
        chosen = list(announced) + ([] if reach == PUBLIC else list(relayed))
    elif reach == PUBLIC:
        chosen = list(reached) + list(listening)
    elif reach == PRIVATE or hold_until_known:
        chosen = list(relayed)
    else:
        chosen = list(listening) + list(relayed)
    seen: set[str] = set()
    return [a for a in chosen if not (a in seen or seen.add(a))][:MAX_ADDRS]


@dataclass
class OwnAddresses:
    """Our addresses and reachability, in one place, published through ``publish``
    (the registry's ``update_local``) whenever either changes."""

    peer: str  # our peer id, which each published address ends with
    listening: list[str]
    publish: Callable[..., object]
    announced: list[str] = field(default_factory=list)
    hold_until_known: bool = False
    reach: str = UNKNOWN
    reached: list[str] = field(default_factory=list)
    relayed: list[str] = field(default_factory=list)

    def addrs(self) -> list[str]:
        return published_addrs(
            self.listening,
            self.reach,
            announced=self.announced,
            relayed=self.relayed,
            reached=self.reached,
            hold_until_known=self.hold_until_known,
        )

    def set_reach(self, reach: str, reached: Sequence[str] = ()) -> None:
        """A new verdict of :mod:`.dialback`, and the addresses (``/ip4/IP/tcp/PORT``)
        peers reached us at."""
        self.reach = reach
        self.reached = [f"{a}/p2p/{self.peer}" for a in reached]
        self.hold_until_known = False
        self.publish(reach=reach, addrs=self.addrs())

    def set_relayed(self, relayed: list[str]) -> None:
        """Our relay addresses changed (a reservation made, renewed elsewhere, or lost)."""
        self.relayed = list(relayed)
        self.publish(addrs=self.addrs())
