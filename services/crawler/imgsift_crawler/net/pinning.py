"""Connect only to the address that was checked: no gap for DNS rebinding.

Checking a host's addresses and then letting the HTTP library resolve the name again leaves
a gap: a hostile DNS server can answer with a public address for the check and with
``127.0.0.1`` for the connection. Here the :class:`~imgsift_crawler.fetch.Fetcher` checks
the addresses (:func:`.safety.vet`) and *pins* them for the request it is about to send; the
transport's network backend connects to a pinned address only and refuses any connection
that was not pinned. The URL keeps its host name, so the ``Host`` header, TLS SNI and
certificate verification are for the host name, as they should be.
"""

from __future__ import annotations

import ssl
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache

import certifi
import httpcore
import httpx

from imgsift_crawler.net.safety import BlockedAddress


@dataclass(frozen=True)
class Pin:
    """The checked addresses one request may connect to, for one host and port."""

    host: str  # as httpx sends it: lower case, IDNA-encoded, IPv6 without brackets
    port: int
    addresses: tuple[str, ...]


_PIN: ContextVar[Pin | None] = ContextVar("imgsift_pin", default=None)


@contextmanager
def pinned(pin: Pin) -> Iterator[None]:
    """Within this block (and thread), connections to ``pin.host`` go to ``pin.addresses``."""
    token = _PIN.set(pin)
    try:
        yield
    finally:
        _PIN.reset(token)


class PinnedBackend(httpcore.SyncBackend):
    """An httpcore backend that connects to the pinned addresses, and nowhere else."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        pin = _PIN.get()
        if pin is None or pin.host != host or pin.port != port:
            # Fail closed: a connection the Fetcher did not check (a bug, or a client used
            # outside the Fetcher) is refused rather than resolved by the system.
            raise BlockedAddress(f"connection to {host}:{port} was not checked by the Fetcher; refused")
        error: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in pin.addresses:  # each one was checked; try them in the resolver's order
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None  # a Pin always has an address
        raise error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise BlockedAddress("the crawler does not connect to Unix sockets")


@cache
def _ssl_context() -> ssl.SSLContext:
    """httpx's default verification (certifi's CAs), loaded once per process and shared."""
    return ssl.create_default_context(cafile=certifi.where())


class PinnedTransport(httpx.HTTPTransport):
    """httpx's own transport with the connection pool's network backend swapped for :class:`PinnedBackend`.

    httpx has no public argument for the backend, so the pool httpx builds is replaced by the
    same pool with our backend; tests/crawler/test_safety.py checks that connections really go
    through it (a new httpx that changed this would fail there, not silently).
    """

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=PinnedBackend(),
        )
