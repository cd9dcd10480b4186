"""Which addresses the crawler may connect to: public ones, unless an allowlist says otherwise.

The crawler fetches URLs that strangers wrote (search results, links on pages, redirects),
so a URL must never make it reach the machine it runs on, the deployment's private network
or a cloud metadata service (server-side request forgery). The check is on the *addresses a
host resolves to*, not on the URL's text: ``http://2130706433/``, ``http://0x7f.1/`` and a
DNS name pointing at ``127.0.0.1`` all resolve to loopback and are refused alike. The address
checked is then the one connected to (:mod:`.pinning`), so a second DNS answer cannot differ.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Union
from urllib.parse import unquote

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]  # noqa: UP007 (a runtime alias)
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]  # noqa: UP007

#: ``(host, port) -> addresses``: how a host name becomes IP addresses (injectable for tests).
Resolver = Callable[[str, int], Sequence[str]]

ALLOWLIST_SETTING = "IMGSIFT_CRAWLER_NETWORK_ALLOWLIST"

# Cloud metadata services hand out credentials: refused even when an allowlist entry covers
# them (an allowlisted 169.254.0.0/16 or 0.0.0.0/0 must not open them).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.170.23",  # AWS EKS pod identity
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "100.100.100.200",  # Alibaba Cloud
    )
)
METADATA_HOSTS = frozenset(
    {"metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal"}
)
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)


class BlockedAddress(Exception):
    """A host or address the crawler refuses to connect to; the message says why and how to allow it."""


class Unresolvable(Exception):
    """A host name that does not resolve to any address."""


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, no IPv6 brackets: the form hosts are compared in."""
    return host.strip().strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses only, plus the networks and host names of an allowlist."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def from_allowlist(cls, entries: Iterable[str]) -> AddressPolicy:
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        for entry in entries:
            network = parse_allowlist_entry(entry)
            if isinstance(network, str):
                hosts.add(network)
            else:
                networks.append(network)
        return cls(tuple(networks), frozenset(hosts))

    def allows_host(self, host: str) -> bool:
        return normalize_host(host) in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)

    def refusal(self, address: IPAddress, host: str) -> str | None:
        """Why ``address`` (which ``host`` resolved to) is refused, or None when it may be used."""
        address = unmap(address)
        if address in METADATA_ADDRESSES:
            return f"{address} is a cloud metadata endpoint; the crawler never connects to one"
        if self.allows_host(host) or self.allows_address(address):
            return None
        kind = address_kind(address)
        if kind is None:
            return None
        shown = address if normalize_host(host) == str(address) else f"{address} (from {host!r})"
        return (
            f"{shown} is {kind}; the crawler only connects to public addresses. To allow it "
            f"(tests, an internal deployment), add '{address}/{address.max_prefixlen}', its network, "
            f"or the host name to {ALLOWLIST_SETTING}"
        )


def parse_allowlist_entry(entry: str) -> IPNetwork | str:
    """An allowlist entry: a network (``10.0.0.0/8``), an address (``127.0.0.1``) or a host name."""
    text = entry.strip()
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    host = normalize_host(text)
    if not _HOSTNAME.match(host):
        raise ValueError(
            f"network allowlist entry {entry!r} is neither a network (10.0.0.0/8, 127.0.0.1/32, ::1/128) "
            "nor a host name (minio.internal)"
        )
    return host


def unmap(address: IPAddress) -> IPAddress:
    """``::ffff:127.0.0.1`` is 127.0.0.1: an IPv4-mapped address is judged (and reached) as IPv4."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_kind(address: IPAddress) -> str | None:
    """What makes ``address`` non-public ("a loopback address"...), or None for a public address."""
    address = unmap(address)
    if address.is_unspecified:
        return "the unspecified address (it reaches this machine)"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED_ADDRESS_SPACE:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if isinstance(address, ipaddress.IPv6Address):
        # 6to4 and Teredo carry an IPv4 address that a relay would reach on our behalf.
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and (inner := address_kind(embedded)) is not None:
            return f"an IPv6 address embedding {embedded}, {inner}"
    if not address.is_global:
        return "not a globally routable address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """The system's ``getaddrinfo``: /etc/hosts, then DNS."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def literal_address(host: str) -> IPAddress | None:
    """The address a host *is* when written as a standard IP literal, else None."""
    try:
        return ipaddress.ip_address(unquote(normalize_host(host)))
    except ValueError:
        return None


def numeric_addresses(host: str) -> list[str] | None:
    """What the OS reads in a numeric host however it is spelled (``2130706433``, ``0x7f.1``,
    ``0177.0.0.1``, ``127.1``: inet_aton's forms), without asking DNS; None for a name."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return None
    return [str(info[4][0]) for info in infos]


def vet(host: str, port: int, policy: AddressPolicy, resolver: Resolver) -> tuple[str, ...]:
    """The addresses of ``host`` the crawler may connect to, all of them checked.

    Refuses (:class:`BlockedAddress`) when *any* resolved address is refused: a name that
    answers with a public and a private address must not get a chance at the private one.
    """
    name = normalize_host(host)
    if name in METADATA_HOSTS:
        raise BlockedAddress(f"{host!r} is a cloud metadata host name; the crawler never connects to one")
    literal = literal_address(name)
    if literal is not None:
        resolved = [str(literal)]
    elif (numeric := numeric_addresses(name)) is not None:
        resolved = numeric  # checked as the address the OS would connect to, not as a name
    else:
        try:
            resolved = list(resolver(name, port))
        except (OSError, UnicodeError) as exc:
            raise Unresolvable(f"cannot resolve {host!r}: {exc}") from exc
    addresses: list[str] = []
    for text in resolved:
        try:
            address = unmap(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError as exc:
            raise BlockedAddress(f"{host!r} resolved to {text!r}, which is not an IP address") from exc
        if (why := policy.refusal(address, name)) is not None:
            raise BlockedAddress(why)
        if str(address) not in addresses:
            addresses.append(str(address))
    if not addresses:
        raise Unresolvable(f"{host!r} resolved to no address")
    return tuple(addresses)
