"""Which network interface the ranks talk over: the one a recipe or the environment names, or, for
DDP's Gloo when nothing names one, the one that reaches rank 0.

Each library picks its own interface when none is named (docs/cluster.md, "Network interface"):
Gloo binds to the address this host's name resolves to, and to loopback when the name does not
resolve, so a host whose name resolves to ``127.0.1.1`` (Debian's default ``/etc/hosts``) or not
at all cannot be reached by the other nodes, and the job hangs at its first collective.
:func:`choose_gloo_interface` finds that case and names the interface whose address routes to
``MASTER_ADDR`` instead. :func:`candidate_addresses` gives the addresses at which rank 0's
watchdog (:mod:`tsmtrain.dist.watchdog`) can be reached.

Pure Python (sockets and psutil); no torch.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Callable, Mapping

__all__ = ["IFNAME_VARIABLES", "ipv4_addresses", "named_interface", "candidate_addresses", "route_interface",
           "hostname_is_usable", "choose_gloo_interface"]

IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "HOROVOD_GLOO_IFACE", "NCCL_SOCKET_IFNAME")
"""The variables that name an interface (set by the job script from ``cluster.network_interface``),
in the order :func:`named_interface` reads them."""


def ipv4_addresses() -> dict[str, list[str]]:
    """This host's IPv4 addresses by interface name (``psutil.net_if_addrs``), loopback included."""
    import psutil

    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def named_interface(environ: Mapping[str, str] | None = None,
                    interfaces: Mapping[str, list[str]] | None = None) -> str | None:
    """The first interface of this host named by :data:`IFNAME_VARIABLES` (a comma-separated
    value gives several names; NCCL's ``^exclude`` and ``=exact`` forms are skipped or read
    plainly), or ``None`` when none names an interface with an IPv4 address here."""
    env = os.environ if environ is None else environ
    found = ipv4_addresses() if interfaces is None else interfaces
    for var in IFNAME_VARIABLES:
        value = env.get(var, "")
        if value.startswith("^"):
            continue
        for name in value.lstrip("=").split(","):
            if found.get(name.strip()):
                return name.strip()
    return None


def candidate_addresses(interface: str | None = None,
                        interfaces: Mapping[str, list[str]] | None = None) -> list[str]:
    """The IPv4 addresses at which another host may reach this one, best first: ``interface``'s
    when it is given and has one, else every non-loopback address of this host, else
    ``["127.0.0.1"]``."""
    found = ipv4_addresses() if interfaces is None else interfaces
    if interface and found.get(interface):
        return list(found[interface])
    outside = [a for addrs in found.values() for a in addrs if not _loopback(a)]
    return outside or ["127.0.0.1"]


def route_interface(address: str, interfaces: Mapping[str, list[str]] | None = None) -> str | None:
    """The interface whose address this host sends from to reach the IPv4 ``address`` (the
    kernel's route, found by connecting a UDP socket, which sends nothing); ``None`` when there
    is no route or no interface holds that source address."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((address, 9))
            source = probe.getsockname()[0]
    except OSError:
        return None
    found = ipv4_addresses() if interfaces is None else interfaces
    return next((name for name, addrs in found.items() if source in addrs), None)


def _resolve_ipv4(name: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)})


def hostname_is_usable(hostname: str, resolve: Callable[[str], list[str]] = _resolve_ipv4) -> str | None:
    """Why Gloo cannot bind to ``hostname``'s address for the other nodes to reach (it resolves
    only to loopback, or not at all), or ``None`` when it resolves to an address outside loopback."""
    try:
        addresses = resolve(hostname)
    except OSError as err:
        return f"this host's name {hostname} does not resolve ({err.strerror or err})"
    if not addresses:
        return f"this host's name {hostname} does not resolve"
    if all(_loopback(a) for a in addresses):
        return f"this host's name {hostname} resolves to loopback ({', '.join(addresses)})"
    return None


_OUTSIDE = "192.0.2.1"  # TEST-NET-1: any address off this host selects the default route


def choose_gloo_interface(master_addr: str | None, environ: Mapping[str, str] | None = None,
                          hostname: str | None = None, resolve: Callable[[str], list[str]] = _resolve_ipv4,
                          interfaces: Mapping[str, list[str]] | None = None) -> tuple[str, str] | None:
    """The interface Gloo should use on a job that spans hosts, when it would otherwise pick
    loopback: ``(interface, why)``, or ``None`` when nothing needs choosing (``GLOO_SOCKET_IFNAME``
    is set, or this host's name resolves to an address outside loopback, or no interface is
    found).

    The interface is the one that routes to ``master_addr`` (rank 0's host); on rank 0's own host
    (``master_addr`` resolves to loopback or to this host) the one of the default route, else the
    first interface with an address outside loopback.
    """
    env = os.environ if environ is None else environ
    if env.get("GLOO_SOCKET_IFNAME"):
        return None
    why = hostname_is_usable(hostname or socket.gethostname(), resolve)
    if why is None:
        return None
    found = ipv4_addresses() if interfaces is None else interfaces
    target = None
    if master_addr:
        try:
            target = next((a for a in resolve(master_addr) if not _loopback(a)), None)
        except OSError:
            target = None
    mine = {a for addrs in found.values() for a in addrs}
    name = None
    if target and target not in mine:
        name = route_interface(target, found)
    if name is None or name == "lo":
        name = route_interface(_OUTSIDE, found)
    if name is None or all(_loopback(a) for a in found.get(name, [])):
        name = next((n for n, addrs in found.items() if any(not _loopback(a) for a in addrs)), None)
    if name is None:
        return None
    return name, why
