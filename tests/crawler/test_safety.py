"""Network safety: the crawler refuses private, loopback, link-local and metadata addresses,
after resolution and on every redirect, and connects only to the address it checked.

Every hostile target here is a loopback stand-in (127.0.0.2, 0.0.0.0, ::1, names a test
resolver maps to them) or is refused before any connection: the netguard
(tests/support/netguard.py) fails a test on any connect beyond loopback or any DNS lookup,
and its connect log shows which addresses were even tried.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from imgsift_common.messages import FailureReason
from imgsift_crawler.fetch import Fetcher, FetchError, Purpose
from imgsift_crawler.net.safety import AddressPolicy, BlockedAddress, system_resolver, vet
from imgsift_crawler.settings import CrawlerSettings
from tests.support.netguard import NetGuard
from tests.support.web import TestWeb


class FakeDNS:
    """A resolver with fixed answers per name (successive answers in turn, the last repeating)."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = {name: list(seq) for name, seq in answers.items()}
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            raise AssertionError(f"the test resolver was asked about {host!r}")
        seq = self.answers[host]
        return seq.pop(0) if len(seq) > 1 else seq[0]


@pytest.fixture
def strict(crawler_settings: CrawlerSettings) -> CrawlerSettings:
    """The defaults: no allowlist at all."""
    return crawler_settings.model_copy(update={"network_allowlist": []})


@pytest.fixture
def make_fetcher() -> Iterator[Callable[..., Fetcher]]:
    made: list[Fetcher] = []

    def make(settings: CrawlerSettings, **kw: object) -> Fetcher:
        made.append(Fetcher(settings, **kw))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for fetcher in made:
        fetcher.close()


def refused(fetcher: Fetcher, url: str, purpose: Purpose = Purpose.IMAGE) -> FetchError:
    with pytest.raises(FetchError) as err:
        fetcher.get(url, purpose=purpose)
    return err.value


# ---------------------------------------------------------------------------- the allowlist


def test_loopback_is_refused_by_default_and_reached_through_the_allowlist(
    web: TestWeb, strict: CrawlerSettings, crawler_settings: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    web.add("/cat.jpg", b"meow", "image/jpeg")
    error = refused(make_fetcher(strict), web.url("/cat.jpg"))
    assert error.reason is FailureReason.BLOCKED_ADDRESS
    assert "127.0.0.1 is a loopback address" in error.detail
    assert "IMGSIFT_CRAWLER_NETWORK_ALLOWLIST" in error.detail and "127.0.0.1/32" in error.detail  # how to allow it
    assert netguard.attempts == [] and web.hits == []

    got = make_fetcher(crawler_settings).get(web.url("/cat.jpg"), purpose=Purpose.IMAGE)
    assert got.content == b"meow"


LOOPBACK_SPELLINGS = [
    "2130706433",  # decimal
    "0x7f000001",  # hex
    "017700000001",  # octal
    "0x7f.1",  # a.b: the last part fills 24 bits
    "127.1",
    "0177.0.0.1",  # octal dotted: httpx refuses to parse it, and the refusal still says why
    "[::ffff:127.0.0.1]",  # IPv4-mapped IPv6
    "[::ffff:7f00:1]",
    "localhost",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_every_spelling_of_loopback_is_refused_by_default(
    host: str, strict: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    error = refused(make_fetcher(strict), f"http://{host}:8080/a.jpg")
    assert error.reason is FailureReason.BLOCKED_ADDRESS, error
    assert "is a loopback address" in error.detail
    assert netguard.attempts == []


def test_a_numeric_spelling_reaches_the_address_the_os_reads_in_it(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    # 2130706433 is 127.0.0.1 to getaddrinfo, so it is checked, allowed and connected as 127.0.0.1.
    web.add("/a.jpg", b"ok", "image/jpeg")
    port = web.server.server_address[1]
    assert make_fetcher(crawler_settings).get(f"http://2130706433:{port}/a.jpg", purpose=Purpose.IMAGE).content == b"ok"
    assert {host for host, _ in netguard.attempts} == {"127.0.0.1"}


ATTACKS = [
    "http://127.0.0.2:{port}/a.jpg",  # loopback outside the allowlisted 127.0.0.1/32
    "http://2130706434:{port}/a.jpg",  # 127.0.0.2, decimal
    "http://0x7f000002:{port}/a.jpg",  # 127.0.0.2, hex
    "http://0x7f.2:{port}/a.jpg",
    "http://0177.0.0.2:{port}/a.jpg",
    "http://0.0.0.0:{port}/a.jpg",  # unspecified: Linux connects it to this machine
    "http://0:{port}/a.jpg",
    "http://[::]:{port}/a.jpg",
    "http://[::1]:{port}/a.jpg",
    "http://[::ffff:127.0.0.2]:{port}/a.jpg",
    "http://[::ffff:0.0.0.0]:{port}/a.jpg",
    "http://[::127.0.0.1]:{port}/a.jpg",  # IPv4-compatible (deprecated, reserved)
    "http://[2002:7f00:1::]:{port}/a.jpg",  # 6to4 wrapping 127.0.0.1
    "http://[64:ff9b::7f00:1]:{port}/a.jpg",  # NAT64 wrapping 127.0.0.1
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",  # cloud metadata
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata.google.internal./computeMetadata/v1/",
    "http://METADATA.GOOGLE.INTERNAL/computeMetadata/v1/",
    "http://100.100.100.200/latest/meta-data/",
    "http://169.254.1.1/",  # link-local
    "http://[fe80::1]/",
    "http://10.0.0.1/",  # private
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://[fc00::1]/",
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://224.0.0.1/",  # multicast
    "http://[ff02::1]/",
    "http://255.255.255.255/",  # broadcast
    "http://240.0.0.1/",  # reserved
    "http://198.18.0.1/",  # benchmarking
    "http://192.0.2.1/",  # documentation
    "https://user:pass@127.0.0.2:{port}/a.jpg",
]


@pytest.mark.parametrize("template", ATTACKS)
def test_attack_urls_are_refused_before_any_connection(
    template: str, web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    """With the tests' allowlist (127.0.0.1/32) on: nothing else gets through."""
    url = template.format(port=web.server.server_address[1])
    fetcher = make_fetcher(crawler_settings, resolver=FakeDNS({}))
    for purpose in Purpose:
        error = refused(fetcher, url, purpose)
        assert error.reason is FailureReason.BLOCKED_ADDRESS, (url, error)
    assert netguard.attempts == [] and web.hits == []


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/a.jpg", "gopher://127.0.0.1:6379/_INFO", "data:image/png;base64,AA"]
)
def test_other_schemes_are_invalid_urls(url: str, crawler_settings: CrawlerSettings, make_fetcher, netguard) -> None:
    error = refused(make_fetcher(crawler_settings), url)
    assert error.reason is FailureReason.INVALID_URL
    assert netguard.attempts == []


def test_metadata_stays_refused_whatever_the_allowlist(strict: CrawlerSettings, make_fetcher, netguard) -> None:
    everything = strict.model_copy(update={"network_allowlist": ["0.0.0.0/0", "::/0", "metadata.google.internal"]})
    fetcher = make_fetcher(everything, resolver=FakeDNS({}))
    for url in ("http://169.254.169.254/latest/", "http://[fd00:ec2::254]/", "http://metadata.google.internal/"):
        error = refused(fetcher, url)
        assert error.reason is FailureReason.BLOCKED_ADDRESS and "metadata" in error.detail
    assert netguard.attempts == []


# ---------------------------------------------------------------------------- names and DNS


def test_a_name_resolving_to_loopback_outside_the_allowlist_is_refused(
    crawler_settings: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    dns = FakeDNS({"images.example.test": [["127.0.0.2"]]})
    error = refused(make_fetcher(crawler_settings, resolver=dns), "http://images.example.test/cat.jpg")
    assert error.reason is FailureReason.BLOCKED_ADDRESS
    assert "127.0.0.2 (from 'images.example.test') is a loopback address" in error.detail
    assert netguard.attempts == []


@pytest.mark.parametrize(
    "answer",
    [
        ["93.184.215.14", "127.0.0.2"],  # a public address first: still refused, never connected
        ["127.0.0.1", "10.1.2.3"],  # the allowlisted address first: the other one still refuses the name
        ["127.0.0.1", "::ffff:169.254.169.254"],
    ],
)
def test_one_bad_address_among_the_answers_refuses_the_name(
    answer: list[str], crawler_settings: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    dns = FakeDNS({"mixed.example.test": [answer]})
    error = refused(make_fetcher(crawler_settings, resolver=dns), "http://mixed.example.test/cat.jpg")
    assert error.reason is FailureReason.BLOCKED_ADDRESS
    assert netguard.attempts == []


def test_an_allowlisted_name_connects_to_its_checked_address_with_its_own_host_header(
    web: TestWeb, strict: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    web.add("/cat.jpg", b"meow", "image/jpeg")
    port = web.server.server_address[1]
    internal = strict.model_copy(update={"network_allowlist": ["images.internal"]})
    fetcher = make_fetcher(internal, resolver=FakeDNS({"images.internal": [["127.0.0.1"]]}))
    assert fetcher.get(f"http://images.internal:{port}/cat.jpg", purpose=Purpose.IMAGE).content == b"meow"
    assert {hit.headers["Host"] for hit in web.hits} == {f"images.internal:{port}"}
    assert refused(fetcher, web.url("/cat.jpg")).reason is FailureReason.BLOCKED_ADDRESS  # the address alone is not


def test_dns_rebinding_cannot_move_the_connection(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher, netguard: NetGuard, monkeypatch
) -> None:
    """The system resolver answers 127.0.0.1 (allowed) once, then 127.0.0.2 (refused).

    A crawler that checked the name and let the HTTP library resolve it again would connect
    to 127.0.0.2; this one connects to the address it checked, and checks every new request.
    """
    port = web.server.server_address[1]
    web.add("/cat.jpg", b"meow", "image/jpeg")
    web.add("/again", b"", status=302, headers={"Location": f"http://rebind.test:{port}/cat.jpg"})
    guarded_getaddrinfo = socket.getaddrinfo
    answers = ["127.0.0.1"]
    asked: list[str] = []

    def rebinding_getaddrinfo(host, port_, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "rebind.test":
            if kwargs.get("flags", 0) & socket.AI_NUMERICHOST:
                raise socket.gaierror(socket.EAI_NONAME, "not numeric")
            asked.append(host)
            address = answers[0] if len(asked) == 1 else "127.0.0.2"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_))]
        return guarded_getaddrinfo(host, port_, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    fetcher = make_fetcher(crawler_settings.model_copy(update={"max_retries": 0}))

    assert fetcher.get(f"http://rebind.test:{port}/cat.jpg", purpose=Purpose.API).content == b"meow"
    assert asked == ["rebind.test"]  # resolved once: the connection did not ask again
    assert {hit.local_address for hit in web.hits} == {"127.0.0.1"}
    # The next request, and a redirect hop to the same name, are checked again: now refused.
    assert refused(fetcher, f"http://rebind.test:{port}/cat.jpg", Purpose.API).reason is FailureReason.BLOCKED_ADDRESS
    assert refused(fetcher, f"http://127.0.0.1:{port}/again", Purpose.API).reason is FailureReason.BLOCKED_ADDRESS
    web_hosts = {host for host, _ in netguard.attempts}
    assert web_hosts == {"127.0.0.1"}, netguard.attempts  # 127.0.0.2 was never even tried


def test_the_transport_refuses_connections_the_fetcher_did_not_check(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    """Fail closed: the client used directly (no check, no pin) connects nowhere."""
    web.add("/cat.jpg", b"meow", "image/jpeg")
    fetcher = make_fetcher(crawler_settings)
    with pytest.raises(BlockedAddress, match="not checked"):
        fetcher.client.get(web.url("/cat.jpg"))
    assert netguard.attempts == [] and web.hits == []


# ---------------------------------------------------------------------------- redirects


REDIRECT_TARGETS = [
    ("http://0.0.0.0:{port}/cat.jpg", FailureReason.BLOCKED_ADDRESS),
    ("http://169.254.169.254/latest/meta-data/", FailureReason.BLOCKED_ADDRESS),
    ("http://metadata.google.internal/computeMetadata/v1/", FailureReason.BLOCKED_ADDRESS),
    ("http://[::1]:{port}/cat.jpg", FailureReason.BLOCKED_ADDRESS),
    ("http://127.0.0.2:{port}/cat.jpg", FailureReason.BLOCKED_ADDRESS),
    ("http://2130706434:{port}/cat.jpg", FailureReason.BLOCKED_ADDRESS),
    ("http://0177.0.0.2:{port}/cat.jpg", FailureReason.BLOCKED_ADDRESS),
    ("http://inside.example.test:{port}/cat.jpg", FailureReason.BLOCKED_ADDRESS),  # resolves to 127.0.0.2
    ("file:///etc/passwd", FailureReason.INVALID_URL),
    ("gopher://127.0.0.1:6379/_FLUSHALL", FailureReason.INVALID_URL),
]


@pytest.mark.parametrize(("target", "reason"), REDIRECT_TARGETS)
@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_to_a_refused_target_is_stopped_before_connecting_to_it(
    target: str,
    reason: FailureReason,
    status: int,
    web: TestWeb,
    crawler_settings: CrawlerSettings,
    make_fetcher,
    netguard: NetGuard,
) -> None:
    port = web.server.server_address[1]
    location = target.format(port=port)
    web.add("/go", b"", status=status, headers={"Location": location})
    web.add("/cat.jpg", b"meow", "image/jpeg")
    fetcher = make_fetcher(crawler_settings, resolver=FakeDNS({"inside.example.test": [["127.0.0.2"]]}))
    error = refused(fetcher, web.url("/go"))
    assert error.reason is reason, error
    assert [hit.path for hit in web.hits] == ["/robots.txt", "/go"]  # the allowed server only
    assert {host for host, _ in netguard.attempts} == {"127.0.0.1"}  # the target was never tried


# ---------------------------------------------------------------------------- every spelling


_NON_PUBLIC_V4 = [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
]


@pytest.fixture
def strict_fetcher(strict: CrawlerSettings) -> Iterator[Fetcher]:
    with Fetcher(strict, resolver=FakeDNS({})) as fetcher:
        yield fetcher


@st.composite
def non_public_hosts(draw: st.DrawFn) -> tuple[str, ipaddress.IPv4Address]:
    network = ipaddress.ip_network(draw(st.sampled_from(_NON_PUBLIC_V4)))
    address = network[draw(st.integers(0, network.num_addresses - 1))]
    n = int(address)
    parts = [int(p) for p in str(address).split(".")]
    spelling = draw(st.sampled_from(["dotted", "decimal", "hex", "octal", "octal-dotted", "a.b", "a.b.c", "mapped"]))
    host = {
        "dotted": str(address),
        "decimal": str(n),
        "hex": hex(n),
        "octal": "0" + format(n, "o"),
        "octal-dotted": ".".join("0" + format(p, "o") for p in parts),
        "a.b": f"{parts[0]}.{n & 0xFFFFFF}",
        "a.b.c": f"{hex(parts[0])}.{parts[1]}.{(parts[2] << 8) | parts[3]}",
        "mapped": f"[::ffff:{address}]",
    }[spelling]
    return host, address


@given(case=non_public_hosts())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_spelling_of_a_non_public_ipv4_address_gets_through(
    case: tuple[str, ipaddress.IPv4Address], strict_fetcher: Fetcher, netguard: NetGuard
) -> None:
    host, address = case
    error = refused(strict_fetcher, f"http://{host}/a.jpg")
    assert error.reason is FailureReason.BLOCKED_ADDRESS, (host, error)
    assert str(address) in error.detail, (host, error.detail)
    assert netguard.attempts == []


@given(st.ip_addresses(v=4).filter(lambda a: a.is_global and not a.is_multicast and not a.is_private))
@settings(max_examples=100, deadline=None)
def test_public_addresses_pass_the_check_in_any_spelling(address: ipaddress.IPv4Address) -> None:
    """The check alone, no connection: public addresses are not refused by mistake."""
    if address in ipaddress.ip_network("100.64.0.0/10"):
        return
    policy = AddressPolicy()
    for host in (str(address), str(int(address)), hex(int(address))):
        assert vet(host, 80, policy, system_resolver) == (str(address),)


# ---------------------------------------------------------------------------- settings and the guard


def test_allowlist_setting_is_read_from_the_environment_and_checked(monkeypatch) -> None:
    monkeypatch.setenv("IMGSIFT_CRAWLER_NETWORK_ALLOWLIST", '["127.0.0.1/32", "10.0.0.0/8", "::1", "minio.internal"]')
    settings_ = CrawlerSettings(storage="local")
    policy = AddressPolicy.from_allowlist(settings_.network_allowlist)
    assert policy.hosts == {"minio.internal"}
    assert policy.allows_address(ipaddress.ip_address("10.9.8.7")) and policy.allows_address(
        ipaddress.ip_address("::1")
    )
    assert not policy.allows_address(ipaddress.ip_address("127.0.0.2"))
    monkeypatch.delenv("IMGSIFT_CRAWLER_NETWORK_ALLOWLIST")
    assert CrawlerSettings(storage="local").network_allowlist == []  # the default: public addresses only
    with pytest.raises(ValidationError, match="neither a network"):
        CrawlerSettings(storage="local", network_allowlist=["10.0.0.0/8 and more"])


def test_the_guard_stops_connections_and_lookups_beyond_loopback(netguard: NetGuard) -> None:
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match="netguard"):
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: never routed, and never reached either
    with pytest.raises(socket.gaierror, match="netguard"):
        socket.getaddrinfo("imgsift.invalid", 80)
    assert netguard.take_violations() == ["connect to 192.0.2.1:80", "DNS lookup of 'imgsift.invalid'"]
    assert netguard.attempts_to("192.0.2.1") == [("192.0.2.1", 80)]


def test_an_address_is_checked_once_a_name_on_every_request(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher, netguard: NetGuard
) -> None:
    """A host written as an address has one answer, kept; a name is resolved (and checked) each time."""
    web.add("/cat.jpg", b"meow", "image/jpeg")
    port = web.server.server_address[1]
    dns = FakeDNS({"images.example.test": [["127.0.0.1"], ["127.0.0.2"]]})
    fetcher = make_fetcher(crawler_settings, resolver=dns)
    for _ in range(3):
        assert fetcher.get(web.url("/cat.jpg"), purpose=Purpose.IMAGE).content == b"meow"
        assert refused(fetcher, f"http://127.0.0.2:{port}/cat.jpg").reason is FailureReason.BLOCKED_ADDRESS
        assert refused(fetcher, f"http://0x7f.0.0.2:{port}/cat.jpg").reason is FailureReason.BLOCKED_ADDRESS
    named = f"http://images.example.test:{port}/cat.jpg"  # an API request: no robots.txt lookup of its own
    assert fetcher.get(named, purpose=Purpose.API).content == b"meow"
    assert refused(fetcher, named, Purpose.API).reason is FailureReason.BLOCKED_ADDRESS  # the name moved
    assert dns.calls == ["images.example.test", "images.example.test"]
    assert {host for host, _ in netguard.attempts} <= {"127.0.0.1"}


def test_a_kept_alive_connection_the_server_closed_is_not_reused(
    crawler_settings: CrawlerSettings, make_fetcher
) -> None:
    """The pool checks an idle connection before it reuses it: no request goes out on a closed one."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:  # answers one request per connection, keep-alive as far as the client knows, then hangs up
        for _ in range(3):
            conn, _ = server.accept()
            accepted.append(1)
            with conn:
                while b"\r\n\r\n" not in (data := conn.recv(4096)) and data:
                    pass
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 4\r\n\r\nmeow")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    fetcher = make_fetcher(crawler_settings.model_copy(update={"max_retries": 0}))
    for _ in range(3):  # within the pool's sweep interval: the check on reuse is what finds the hang-up
        assert fetcher.get(f"http://127.0.0.1:{port}/cat.jpg", purpose=Purpose.API).content == b"meow"
        time.sleep(0.05)  # the server's close reaches the idle socket
    thread.join(5)
    server.close()
    assert len(accepted) == 3
