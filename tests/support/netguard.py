"""A guard that keeps the test suite on loopback: no connection and no DNS lookup leaves the machine.

Loaded as a pytest plugin (``pytest_plugins`` in tests/conftest.py), it is on for the whole
session, from before test modules are imported. It wraps ``socket.socket.connect`` /
``connect_ex`` (which ``socket.create_connection``, httpx, redis-py, minio... all end in) and
``socket.getaddrinfo`` / ``gethostbyname``:

- a connect to anything but loopback (127.0.0.0/8, ::1, and 0.0.0.0 / ::, which Linux
  delivers to this machine) raises ``ConnectionRefusedError`` *before* the system call, so
  no packet is sent, and is recorded as a violation;
- a name lookup that would go to DNS (anything but IP literals, ``localhost`` and this
  machine's own name) raises ``socket.gaierror`` and is recorded too;
- every connect, allowed or not, is logged, so a test can assert that no connection to an
  address was even attempted (``netguard.attempts_to(...)``).

A test during which a violation happened fails in its teardown, even if the code under test
swallowed the error (the crawler turns it into a ``connection_error`` record, say).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo
_real_gethostbyname = socket.gethostbyname
_real_gethostbyname_ex = socket.gethostbyname_ex

LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, ::ffff:127.x, and the unspecified addresses (Linux connects them locally)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host.lower().rstrip(".") in LOCAL_NAMES
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


@dataclass
class NetGuard:
    """What the guard saw: every connect attempt, and the ones it stopped."""

    attempts: list[tuple[str, int]] = field(default_factory=list)  # (host, port) of every connect
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attempts_to(self, host: str, port: int | None = None) -> list[tuple[str, int]]:
        with self.lock:
            return [(h, p) for h, p in self.attempts if h == host and (port is None or p == port)]

    def take_violations(self) -> list[str]:
        with self.lock:
            found, self.violations = self.violations, []
            return found

    def _violation(self, what: str) -> None:
        with self.lock:
            self.violations.append(what)

    def check_connect(self, sock: socket.socket, address: Any) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
            return  # Unix sockets and the like stay on this machine
        host, port = str(address[0]), int(address[1])
        with self.lock:
            self.attempts.append((host, port))
        if not is_loopback(host):
            self._violation(f"connect to {host}:{port}")
            raise ConnectionRefusedError(f"netguard: tests may only connect to loopback, not {host}:{port}")

    def check_name(self, host: Any) -> None:
        if host is None:
            return
        name = host.decode() if isinstance(host, bytes) else str(host)
        if is_loopback(name) or name.lower() == socket.gethostname().lower():
            return
        try:
            _real_getaddrinfo(name, None, flags=socket.AI_NUMERICHOST)
            return  # an IP literal in some spelling: no DNS involved
        except (socket.gaierror, UnicodeError):
            pass
        self._violation(f"DNS lookup of {name!r}")
        raise socket.gaierror(socket.EAI_NONAME, f"netguard: tests may not look up {name!r} in DNS")


GUARD = NetGuard()
STRAY: list[str] = []  # violations outside any test (imports, session fixtures)


def install(guard: NetGuard = GUARD) -> None:
    def connect(self: socket.socket, address: Any) -> None:
        guard.check_connect(self, address)
        return _real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        guard.check_connect(self, address)
        return _real_connect_ex(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        flags = kwargs.get("flags", args[4] if len(args) > 4 else 0)
        if not flags & socket.AI_NUMERICHOST:  # AI_NUMERICHOST never asks DNS
            guard.check_name(host)
        return _real_getaddrinfo(host, *args, **kwargs)

    def gethostbyname(host: str) -> str:
        guard.check_name(host)
        return _real_gethostbyname(host)

    def gethostbyname_ex(host: str) -> Any:
        guard.check_name(host)
        return _real_gethostbyname_ex(host)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    socket.gethostbyname = gethostbyname
    socket.gethostbyname_ex = gethostbyname_ex


def uninstall() -> None:
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = _real_getaddrinfo
    socket.gethostbyname = _real_gethostbyname
    socket.gethostbyname_ex = _real_gethostbyname_ex


# ---------------------------------------------------------------------------- pytest plugin


def pytest_configure(config: pytest.Config) -> None:
    # ultralytics asks DNS whether it is online when imported; tests never are. Subprocesses
    # (the CLI, the services of the system test) inherit this.
    os.environ.setdefault("YOLO_OFFLINE", "1")
    install()


def pytest_unconfigure(config: pytest.Config) -> None:
    uninstall()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    STRAY.extend(GUARD.take_violations())
    if STRAY:
        session.config.get_terminal_writer().line(
            "netguard: network traffic off loopback was attempted outside tests (and stopped): " + "; ".join(STRAY),
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _no_traffic_off_loopback() -> Iterator[None]:
    """Fail the test if anything it ran tried to leave loopback, even if the error was swallowed."""
    STRAY.extend(GUARD.take_violations())  # between tests: reported at the end of the session
    yield
    if found := GUARD.take_violations():
        pytest.fail("network traffic off loopback was attempted (and stopped): " + "; ".join(found), pytrace=False)


@pytest.fixture
def netguard() -> Iterator[NetGuard]:
    """The session's guard, with its connect log cleared for this test."""
    with GUARD.lock:
        GUARD.attempts.clear()
    yield GUARD
