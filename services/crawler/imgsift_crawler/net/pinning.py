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
import time
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


class LeanPool(httpcore.ConnectionPool):
    """httpcore's connection pool, assigning requests to connections at a cost that does not grow
    with the square of the pool.

    httpcore checks every connection of the pool, under the pool's lock, whenever a request comes
    or a response closes: whether its keep-alive ran out, and for an idle one whether the server
    closed it (a ``poll`` of its socket), counting the pool once more per idle connection. With
    a download thread per connection (16), that was a sixth of a fetch's CPU, and threads queued
    on the lock. Here a connection is checked that way when it is about to be reused (so a
    request never goes out on a connection the server closed or that outlived its keep-alive,
    as before) and the whole pool at most once a second; the rest is as httpcore does it: closed
    connections leave, idle ones are closed when the pool holds more than the keep-alive limit,
    a request takes the first connection free for its origin, else a new one, else the place of
    an idle one.
    """

    SWEEP_SECONDS = 1.0

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_sweep = 0.0

    def _assign_requests_to_connections(self) -> list[httpcore.ConnectionInterface]:
        closing: list[httpcore.ConnectionInterface] = []
        now = time.monotonic()
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + self.SWEEP_SECONDS
        for connection in list(self._connections):
            if connection.is_closed():
                self._connections.remove(connection)
            elif (sweep and connection.has_expired()) or (
                connection.is_idle() and len(self._connections) > self._max_keepalive_connections
            ):
                self._connections.remove(connection)
                closing.append(connection)
        for pool_request in [request for request in self._requests if request.is_queued()]:
            origin = pool_request.request.url.origin
            chosen = None
            for connection in list(self._connections):
                if connection.can_handle_request(origin) and connection.is_available():
                    if connection.has_expired():  # what httpcore checked for every connection
                        self._connections.remove(connection)
                        closing.append(connection)
                        continue
                    chosen = connection
                    break
            if chosen is None:
                if len(self._connections) >= self._max_connections:
                    idle = next((c for c in self._connections if c.is_idle()), None)
                    if idle is None:
                        continue  # the request waits for a connection to come free
                    self._connections.remove(idle)
                    closing.append(idle)
                chosen = self.create_connection(origin)
                self._connections.append(chosen)
            pool_request.assign_to_connection(chosen)
        return closing


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
        self._pool = LeanPool(
            ssl_context=_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=PinnedBackend(),
        )
