"""DNS names in multiaddrs (``/dns4/``, ``/dns6/``, ``/dns/``), resolved by the system.

``--join /dns4/boot.example.org/tcp/4001/p2p/12D3KooW...`` lets a swarm keep one
address while its bootstrap node moves. py-libp2p would resolve the name itself with
its own DNS client, which asks the name servers directly: it ignores ``/etc/hosts`` (and
a network namespace's own hosts file), and on a machine without a name server it waits
out its retries. So the name is resolved here, with the system resolver
(``getaddrinfo``, run in a worker thread by trio), on every dial: a name that moves to
another address is followed. What comes back is dialled as plain ``/ip4/`` or ``/ip6/``
addresses, the rest of the multiaddr (port, peer id) unchanged.
"""

from __future__ import annotations

import socket

import trio
from multiaddr import Multiaddr

NAME_PROTOCOLS = {"dns": socket.AF_UNSPEC, "dns4": socket.AF_INET, "dns6": socket.AF_INET6}
MAX_RESOLVED = 8  # addresses tried per name: a name with hundreds of records is not our problem

__all__ = ["NameNotResolved", "dial_targets", "has_name", "resolve_names"]


class NameNotResolved(Exception):
    """The system resolver found no address for a multiaddr's name."""


def _split(address: str) -> tuple[str, str, str] | None:
    """``(protocol, name, rest)`` of an address that starts with a DNS name, else None."""
    parts = address.strip().split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] not in NAME_PROTOCOLS or not parts[2]:
        return None
    return parts[1], parts[2], "/" + "/".join(parts[3:]) if len(parts) > 3 else ""


def has_name(address: str) -> bool:
    return _split(address) is not None


async def resolve_names(address: str) -> list[str]:
    """``address`` with its DNS name replaced by each address the system resolver gives
    (IPv4 first for ``/dns/``); ``[address]`` as it is when it holds no name.

    Raises :class:`NameNotResolved`, naming the host, when the resolver finds nothing.
    """
    split = _split(address)
    if split is None:
        return [address]
    protocol, name, rest = split
    try:
        found = await trio.socket.getaddrinfo(name, None, NAME_PROTOCOLS[protocol], socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror: no such name, no resolver, ...
        raise NameNotResolved(f"cannot resolve {name!r}: {exc.strerror or exc}") from None
    except UnicodeError as exc:  # an empty or over-long label, refused before any lookup
        raise NameNotResolved(f"cannot resolve {name!r}: not a valid host name ({exc})") from None
    ips: list[str] = []
    for family, *_, sockaddr in sorted(found, key=lambda f: f[0] != socket.AF_INET):
        ip = str(sockaddr[0]).split("%")[0]  # an IPv6 zone is not a multiaddr's to carry
        kind = "ip4" if family == socket.AF_INET else "ip6"
        text = f"/{kind}/{ip}{rest}"
        if text not in ips:
            ips.append(text)
    resolved = []
    for text in ips[:MAX_RESOLVED]:
        try:
            resolved.append(str(Multiaddr(text)))
        except Exception:  # noqa: BLE001 - a record the resolver should not have given
            continue
    if not resolved:
        raise NameNotResolved(f"cannot resolve {name!r}: no IPv4 or IPv6 address")
    return resolved


async def dial_targets(addrs: list[str]) -> list[str]:
    """A record's addresses as dialable multiaddrs: the final ``/p2p/<peer>`` dropped,
    DNS names resolved (an ``--announce`` may be one), loopback ones last (on another
    machine they reach nobody, or the wrong node); unparsable and unresolvable ones
    left out. A record holds at most ``MAX_ADDRS``, so this is at most that many lookups."""
    out: list[str] = []
    for a in addrs:
        base = a.rsplit("/p2p/", 1)[0] if "/p2p/" in a else a
        try:
            out.extend(str(Multiaddr(r)) for r in (await resolve_names(base) if has_name(base) else [base]))
        except Exception:  # noqa: BLE001 - NameNotResolved, or junk a record should not carry
            continue
    return sorted(dict.fromkeys(out), key=lambda a: a.startswith(("/ip4/127.", "/ip6/::1/")))
