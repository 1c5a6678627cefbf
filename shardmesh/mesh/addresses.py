"""Multiaddrs: checking the ones people give us, and choosing the ones we dial or publish.

A node meets addresses from three directions, and each needs its own care:

* **Typed by a user** (``--join``, ``shardmesh status``): :func:`parse_join_address`
  insists on a trailing ``/p2p/<peer id>``, since without it the Noise handshake could
  not prove we reached the node we meant, and says what is wrong in one line.
* **Learned from the network** (signed records, mDNS answers): :func:`with_peer_id`
  pins each one to the peer it is for and drops junk without raising, and
  :func:`is_local_address` keeps an unauthenticated mDNS answer from sending us to
  the internet.
* **Our own** listen addresses: :func:`advertised_addrs` turns a wildcard
  (``0.0.0.0``) into one address per interface, which is what peers can dial.

Everything here is plain string and address work: no host, no I/O beyond listing the
machine's interfaces.
"""

from __future__ import annotations

import ipaddress

from multiaddr import Multiaddr

__all__ = [
    "advertised_addrs",
    "interface_ips",
    "ip_of",
    "is_local_address",
    "parse_join_address",
    "port_of",
    "with_peer_id",
]


def parse_join_address(address: str) -> tuple[str, str]:
    """Check one ``--join`` address; returns ``(peer id, address)``.

    The address must be a multiaddr with a transport part and a trailing
    ``/p2p/<peer id>``: without the peer id the Noise handshake could not prove we
    reached the node we meant. Raises ``ValueError`` naming the address otherwise.
    """
    from libp2p.peer.id import ID

    text = str(address).strip()
    try:
        ma = Multiaddr(text)
        protos = [p.name for p in ma.protocols()]
    except Exception as exc:
        raise ValueError(f"--join {address!r}: not a multiaddr ({exc})") from None
    if not protos or protos[-1] != "p2p":
        example = "/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW..."
        raise ValueError(f"--join {address!r}: must end in /p2p/<peer id> (e.g. {example})")
    if len(protos) < 2:
        raise ValueError(f"--join {address!r}: a peer id but no address to dial (put /ip4/.../tcp/... before it)")
    peer_text = text.rsplit("/p2p/", 1)[1].strip("/")
    try:
        peer_id = ID.from_base58(peer_text).to_base58()
    except Exception:
        raise ValueError(f"--join {address!r}: {peer_text!r} is not a valid peer id") from None
    return peer_id, text


def with_peer_id(addr: str, peer_id: str) -> str | None:
    """``addr`` ending in ``/p2p/<peer_id>``; None if it names another peer or is junk."""
    text = str(addr).strip()
    if "/p2p/" in text:
        base, named = text.rsplit("/p2p/", 1)
        if named.strip("/") != peer_id:
            return None
    else:
        base = text
    try:
        if not Multiaddr(base).protocols():
            return None
        return str(Multiaddr(f"{base}/p2p/{peer_id}"))
    except Exception:
        return None


def ip_of(addr: str) -> str | None:
    """The IP of an ``/ip4/...`` or ``/ip6/...`` address; None for any other kind."""
    parts = addr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return None


def port_of(addr: str) -> int | None:
    """The TCP port of an address; None without one."""
    parts = addr.split("/")
    for i, p in enumerate(parts[:-1]):
        if p == "tcp":
            try:
                return int(parts[i + 1])
            except ValueError:
                return None
    return None


_CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; also Tailscale


def is_local_address(addr: str) -> bool:
    """Whether an mDNS-learned address stays on this machine or the LAN.

    Private, loopback, link-local and CGNAT IPs, and ``.local`` names. A public IP in
    an mDNS answer is refused: answering mDNS must not be a way to make us dial out.
    """
    parts = addr.split("/")
    if len(parts) < 3:
        return False
    kind, value = parts[1], parts[2]
    if kind in ("dns", "dns4", "dns6"):
        return value.lower().rstrip(".").endswith(".local")
    if kind not in ("ip4", "ip6"):
        return False
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return False
    if ip.is_unspecified or ip.is_multicast:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local or (ip.version == 4 and ip in _CGNAT)


def advertised_addrs(addrs: list[Multiaddr]) -> list[str]:
    """Our listen addresses as others can dial them: wildcards expanded to interfaces.

    A host listening on ``0.0.0.0`` reports ``/ip4/0.0.0.0/...``, which no peer can
    dial; we list each interface's address instead (loopback too, which a peer on
    this machine can use and a peer elsewhere tries last).
    """
    out: list[str] = []
    for ma in addrs:
        text = str(ma)
        parts = text.split("/")
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6") or "tcp" not in parts:
            continue
        if parts[2] in ("0.0.0.0", "::"):
            for ip in interface_ips(6 if parts[1] == "ip6" else 4):
                out.append("/".join(parts[:2] + [ip] + parts[3:]))
        else:
            out.append(text)
    seen: set[str] = set()
    unique = [a for a in out if not (a in seen or seen.add(a))]
    return unique


def interface_ips(version: int) -> list[str]:
    """This machine's IPv4 or IPv6 addresses (IPv6 link-local ones left out: dialling
    them needs a scope id that a multiaddr does not carry)."""
    try:
        import ifaddr  # zeroconf's own dependency
    except ImportError:
        return []
    ips = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if version == 4 and ip.is_IPv4:
                ips.append(ip.ip)
            elif version == 6 and ip.is_IPv6:
                addr = ip.ip[0]
                if not ipaddress.ip_address(addr).is_link_local:  # needs a scope id
                    ips.append(addr)
    return ips
