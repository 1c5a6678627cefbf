"""An emulated internet from network namespaces (as root), for tests and benchmarks.

    public hosts  198.18.0.10, .11, ...   ┐
                                          ├── "internet": one bridge, 198.18.0.0/24
    home routers  198.18.0.101, .102, ... ┘   (RFC 2544 addresses: never leave the machine)
        └─ home LAN 10.N.0.0/24: the router 10.N.0.1, its hosts 10.N.0.2, .3, ...

Each home router masquerades its LAN behind its one public address: ``cone`` keeps a
connection's source port where it can (Linux MASQUERADE), so a mapping made by dialling
out can be reused (what hole punching needs); ``random`` gives every connection a random
port (``--random-fully``: a symmetric NAT that hole punching cannot pass). Nothing from
the internet reaches a home host unless it answers a connection the host made.
Every interface, address and rule lives in namespaces made here and deleted on close.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field

WAN = "198.18.0"


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """A machine: its namespace and the address it has there."""

    ns: str
    ip: str

    @property
    def exec(self) -> tuple[str, ...]:
        """The prefix that runs a command on this host."""
        return ("ip", "netns", "exec", self.ns)


@dataclass
class Home:
    router: Host  # its public (WAN) address
    index: int
    nat: str
    hosts: list[Host] = field(default_factory=list)


class Internet:
    """Build with :meth:`public` and :meth:`home`; :meth:`close` deletes everything."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]  # interface names are at most 15 characters
        self.namespaces: list[str] = []
        self.links = 0
        self._wan_link: dict[str, int] = {}  # namespace -> number of its link to the internet
        self.switch = self._namespace("net")
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        self.publics = 0
        self.homes: list[Home] = []

    def _namespace(self, role: str) -> str:
        name = f"smi-{self.tag}-{role}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _wire(self, a_ns: str, b_ns: str) -> tuple[str, str]:
        """A veth pair from namespace ``a_ns`` to ``b_ns``; returns the two ends' names."""
        self.links += 1
        a, b = f"s{self.tag}{self.links}a", f"s{self.tag}{self.links}b"
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "link", "set", a, "netns", a_ns)
        _run("ip", "link", "set", b, "netns", b_ns)
        return a, b

    def _on_internet(self, ns: str, ip: str) -> str:
        port, wan = self._wire(self.switch, ns)
        self._wan_link[ns] = self.links
        _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", wan)
        _run("ip", "-n", ns, "link", "set", wan, "up")
        return wan

    def public(self) -> Host:
        """A host with a public address: anyone on the internet can dial it."""
        self.publics += 1
        ns = self._namespace(f"p{self.publics}")
        ip = f"{WAN}.{9 + self.publics}"
        self._on_internet(ns, ip)
        return Host(ns, ip)

    def home(self, nat: str = "cone", drop_unsolicited: bool = False) -> Home:
        """A home network behind its own NAT router (``cone`` or ``random``). A router
        answers a connection nobody asked for with a reset, unless ``drop_unsolicited``:
        then it drops it silently, as most home routers do (and as hole punching between
        two homes on this delay-free segment needs: a reset would kill the other side's
        attempt before its own packet has left)."""
        if nat not in ("cone", "random"):
            raise ValueError(f"nat must be cone or random, not {nat!r}")
        index = len(self.homes) + 1
        ns = self._namespace(f"r{index}")
        wan = self._on_internet(ns, f"{WAN}.{100 + index}")
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = ["--random-fully"] if nat == "random" else []
        _run("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE", *masquerade)
        if drop_unsolicited:
            _run("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", wan, "-m", "conntrack", "--ctstate", "NEW,INVALID", "-j", "DROP")
        home = Home(Host(ns, f"{WAN}.{100 + index}"), index, nat)
        self.homes.append(home)
        return home

    def home_host(self, home: Home) -> Host:
        """A machine on ``home``'s LAN, its default route through the router."""
        n = len(home.hosts) + 1
        ns = self._namespace(f"h{home.index}{n}")
        inside, lan = self._wire(home.router.ns, ns)
        if n == 1:
            _run("ip", "-n", home.router.ns, "link", "add", "lan", "type", "bridge")
            _run("ip", "-n", home.router.ns, "addr", "add", f"10.{home.index}.0.1/24", "dev", "lan")
            _run("ip", "-n", home.router.ns, "link", "set", "lan", "up")
        _run("ip", "-n", home.router.ns, "link", "set", inside, "master", "lan", "up")
        ip = f"10.{home.index}.0.{n + 1}"
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", lan)
        _run("ip", "-n", ns, "link", "set", lan, "up")
        _run("ip", "-n", ns, "route", "add", "default", "via", f"10.{home.index}.0.1")
        host = Host(ns, ip)
        home.hosts.append(host)
        return host

    def forward(self, home: Home, host: Host, port: int) -> None:
        """Forward TCP ``port`` of ``home``'s public address to ``host`` (a port forward
        set up on a home router, as a user would for one program)."""
        wan = f"s{self.tag}{self._wan_link[home.router.ns]}b"
        _run("ip", "netns", "exec", home.router.ns, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", wan,
             "-p", "tcp", "--dport", str(port), "-j", "DNAT", "--to-destination", f"{host.ip}:{port}")

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def can_build() -> str | None:
    """Why an emulated internet cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (ip netns, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool} (make testdeps installs it as root on Debian)"
    return None
