"""Finding peers on the local network with mDNS, kept off the trio loop.

We speak the libp2p mDNS spec on top of ``zeroconf``: service
``<random>._p2p._udp.local.``, one ``dnsaddr=<multiaddr>/p2p/<id>`` TXT string per
address. We do not use py-libp2p's ``MDNSDiscovery`` (0.8.1): its ``start()`` calls
``trio.lowlevel.spawn_system_task`` and so cannot run in a worker thread, yet it blocks
the loop while zeroconf probes the network; it finds its own IP by a UDP ``connect()``
to 8.8.8.8; it writes the peerstore from zeroconf's threads; and it puts each address
under its own TXT key (``dnsaddr``, ``dnsaddr2``...) where the spec (and go/js-libp2p)
repeat ``dnsaddr=``.

An mDNS answer is unauthenticated. That is fine for the peer id, which the Noise
handshake proves when we dial, but not for where we dial: the caller
(:class:`~shardmesh.mesh.discovery.Discovery`) dials only local addresses learned this
way (:func:`~shardmesh.mesh.addresses.is_local_address`).
"""

from __future__ import annotations

import logging
import secrets
import string
from typing import Callable

import trio

from .addresses import ip_of, port_of

log = logging.getLogger("shardmesh.mesh.mdns")

MDNS_SERVICE = "_p2p._udp.local."  # the libp2p mDNS spec's service type
MDNS_QUERY_TIMEOUT_MS = 3000  # waiting for a found service's TXT and A records
MDNS_STOP_TIMEOUT = 5.0  # seconds: unregistering sends goodbye packets

__all__ = ["MDNS_SERVICE", "MdnsService", "run_mdns"]

Found = Callable[[str, list[str]], None]


async def run_mdns(peer_id: str, addrs: list[str], found: Found) -> None:
    """Advertise ``addrs`` and browse until cancelled; on any failure, log and return.

    ``found(peer_id, addrs)`` is called in the trio thread for every other peer seen.
    No multicast (or port 5353 taken) is a reason to go on without mDNS, never to stop
    the node.
    """
    service = MdnsService(peer_id, addrs, found, trio.lowlevel.current_trio_token())
    try:
        # Zeroconf() opens sockets and register_service() probes the network for over
        # a second, synchronously: on the event loop that would freeze the node.
        await trio.to_thread.run_sync(service.start)
        log.info("mDNS: advertising %s", ", ".join(service.addrs) or "nothing (no usable address)")
        await trio.sleep_forever()
    except Exception as exc:  # noqa: BLE001 - no multicast is a reason to go on without mDNS
        log.warning("mDNS disabled: %s: %s", type(exc).__name__, exc)
    finally:
        # Shielded so the goodbye packets go out on cancellation; abandoned after a
        # deadline so a wedged zeroconf cannot hold up shutdown.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(MDNS_STOP_TIMEOUT):
                await trio.to_thread.run_sync(service.stop, abandon_on_cancel=True)


class MdnsService:
    """One node's mDNS presence: its advertisement and its browser.

    ``start`` and ``stop`` block (call them through ``trio.to_thread``). Found peers
    are handed to ``found`` in the trio thread via ``trio.from_thread``.
    """

    def __init__(self, peer_id: str, addrs: list[str], found: Found, token) -> None:
        self.peer_id = peer_id
        self.addrs = addrs
        self._found = found
        self._token = token
        alphabet = string.ascii_lowercase + string.digits
        # Spec: a random peer name of 32-63 characters, not the peer id.
        self.name = "".join(secrets.choice(alphabet) for _ in range(40))
        self._zc = None
        self._browser = None
        self._stopped = False

    def start(self) -> None:
        from zeroconf import ServiceBrowser, ServiceInfo, Zeroconf

        self._zc = Zeroconf()
        ips = sorted({ip_of(a) for a in self.addrs} - {None})
        if ips:
            txt = b"".join(_txt_string(f"dnsaddr={a}") for a in self.addrs if len(a) <= 240)
            info = ServiceInfo(
                MDNS_SERVICE,
                f"{self.name}.{MDNS_SERVICE}",
                port=port_of(self.addrs[0]) or 0,
                properties=txt,
                server=f"{self.name}.local.",
                parsed_addresses=ips,
            )
            self._zc.register_service(info, allow_name_change=True)
        if self._stopped:  # stop() ran while we were starting
            return
        self._browser = ServiceBrowser(self._zc, MDNS_SERVICE, handlers=[self._on_change])

    def stop(self) -> None:
        self._stopped = True
        try:
            if self._browser is not None:
                self._browser.cancel()
        except Exception as exc:
            log.debug("mDNS browser cancel: %s", exc)
        try:
            if self._zc is not None:
                self._zc.close()  # unregisters (goodbye packets) and closes sockets
        except Exception as exc:
            log.debug("mDNS close: %s", exc)

    def _on_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        """Runs in zeroconf's browser thread, so it may block (get_service_info)."""
        from zeroconf import ServiceStateChange

        if self._stopped or state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        if name == f"{self.name}.{MDNS_SERVICE}":
            return
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=MDNS_QUERY_TIMEOUT_MS)
            if info is None or not info.text:
                return
            by_peer: dict[str, list[str]] = {}
            for entry in _txt_strings(info.text):
                if entry.startswith(b"dnsaddr="):
                    addr = entry[len(b"dnsaddr=") :].decode("utf-8", "replace")
                    if "/p2p/" in addr:
                        by_peer.setdefault(addr.rsplit("/p2p/", 1)[1], []).append(addr)
            for peer_id, addrs in by_peer.items():
                if peer_id != self.peer_id and not self._stopped:
                    trio.from_thread.run_sync(self._found, peer_id, addrs, trio_token=self._token)
        except trio.RunFinishedError:
            pass
        except Exception as exc:  # noqa: BLE001 - a bad answer from the LAN is not our crash
            log.debug("mDNS: ignoring %s: %s: %s", name, type(exc).__name__, exc)


def _txt_string(text: str) -> bytes:
    data = text.encode()[:255]  # callers keep strings short; a TXT string holds 255 bytes
    return bytes([len(data)]) + data


def _txt_strings(raw: bytes) -> list[bytes]:
    """Split a raw TXT record into its length-prefixed strings (RFC 1035 3.3.14)."""
    out, i = [], 0
    while i < len(raw):
        n = raw[i]
        out.append(raw[i + 1 : i + 1 + n])
        i += 1 + n
    return out
