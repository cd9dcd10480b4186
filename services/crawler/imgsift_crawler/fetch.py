"""HTTP fetching: one :class:`Fetcher` per worker process, every request of the crawler goes through it.

:class:`Fetcher` is where the rules for talking to the web live, so that sources and
downloads cannot bypass them. For each request, and again for every redirect hop:

1. the URL must be http or https;
2. its host is resolved and *every* address checked (:mod:`.net.safety`): private, loopback,
   link-local, multicast, reserved and cloud-metadata addresses are refused unless the
   allowlist says otherwise; the connection then goes to a checked address and nowhere else
   (:mod:`.net.pinning`);
3. pages and images obey the origin's robots.txt (:mod:`.net.robots`); search APIs are used
   under their own terms and skip it;
4. the host's slot is awaited (:mod:`.net.limits`): at most ``per_host_concurrency`` requests
   in flight, at least ``per_host_interval`` (or the robots.txt Crawl-delay) between them;
5. the answer: redirects are followed here (httpx's own following is off, it would skip 1-4);
   429, 408 and 5xx are retried with backoff and jitter, honouring ``Retry-After``
   (:mod:`.net.retry`); an ``X-Robots-Tag`` opt-out refuses the response before its body is
   read; the body is streamed under a byte cap and a total deadline.

Every refusal is a :class:`FetchError` whose ``reason`` the download record keeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

import httpx

from imgsift_common.messages import FailureReason
from imgsift_crawler.net.limits import HostBusy, HostLimiter, LocalHostLimiter
from imgsift_crawler.net.pinning import Pin, PinnedTransport, pinned
from imgsift_crawler.net.retry import backoff_delay, parse_retry_after, should_retry_status
from imgsift_crawler.net.robots import RobotsAnswer, RobotsCache, RobotsRefusal, header_opt_out, meta_opt_out
from imgsift_crawler.net.safety import (
    AddressPolicy,
    BlockedAddress,
    Resolver,
    Unresolvable,
    literal_address,
    numeric_addresses,
    system_resolver,
    vet,
)
from imgsift_crawler.settings import CrawlerSettings

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_DEFER = 3600.0  # longest Retry-After that holds back a host's other requests


class FetchError(Exception):
    """A URL could not be fetched; ``reason`` is what the download record says."""

    def __init__(
        self, reason: FailureReason, detail: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status  # the HTTP status, when an answer was the failure
        self.retry_after = retry_after  # seconds the server's Retry-After asked for, when it sent one
        self.body = b""  # the start of an API's error answer (what it says went wrong), when there was one

    @property
    def transient(self) -> bool:
        """Whether the same request may succeed later: 429, 408, 5xx, no connection, a timeout."""
        if self.status is not None:
            return should_retry_status(self.status)
        return self.reason in (FailureReason.CONNECTION_ERROR, FailureReason.TIMEOUT)


@dataclass(frozen=True)
class Fetched:
    url: str  # after redirects
    status: int
    content_type: str
    content: bytes


class Purpose(StrEnum):
    """Why a request is made: the rules differ (robots.txt governs pages and images, not APIs)."""

    PAGE = "page"  # an HTML page of a site crawl
    IMAGE = "image"  # a candidate image
    API = "api"  # a search API a source queries (Openverse, Wikimedia, Flickr...)


@dataclass(frozen=True)
class _Rules:
    """What applies to one request, from its purpose."""

    cap: int
    accept: str | None
    robots: bool  # robots.txt, X-Robots-Tag
    meta: bool  # <meta name="robots"> in an HTML page
    truncate: bool = False  # read up to the cap and keep it, rather than fail (robots.txt)
    headers: tuple[tuple[str, str], ...] = ()  # a source's request profile (User-Agent, Referer...)
    error_body: bool = False  # keep the start of an error answer (an API says why it refused)
    min_interval: float = 0.0  # seconds between requests to the host that a service's rate limit asks for


class _Retry(Exception):
    """A transient failure: try again after ``after`` seconds (the server's) or a backoff."""

    def __init__(self, error: FetchError, after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.after = after


_LOCATION = "X-Imgsift-Location"


def _take_location(response: httpx.Response) -> None:
    """Move ``Location`` out of httpx's sight: the Fetcher follows redirects itself.

    Even with ``follow_redirects=False`` httpx parses a redirect's ``Location`` into
    ``next_request``, and fails on one it cannot parse (``http://0177.0.0.1/``) before the
    Fetcher could say why it refuses it.
    """
    response.headers.pop(_LOCATION, None)  # only ever ours, never the server's
    if "Location" in response.headers:
        response.headers[_LOCATION] = response.headers.pop("Location")


class _Cookies(httpx.Cookies):
    """httpx's cookie jar, which reads an answer's cookies only when it sets one.

    The standard library's jar that httpx wraps takes cookies from ``Set-Cookie`` only (its
    default policy ignores the obsolete ``Set-Cookie2``); httpx builds a urllib request and
    response for it on every answer, most of which (images) set none.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        if "set-cookie" in response.headers:
            super().extract_cookies(response)


def _make_client(settings: CrawlerSettings) -> httpx.Client:
    """One client per Fetcher: connection pooling over the pinned transport, our User-Agent."""
    limits = httpx.Limits(max_connections=max(settings.download_concurrency * 2, 10))
    client = httpx.Client(
        transport=PinnedTransport(limits),
        headers={"User-Agent": settings.full_user_agent, "Accept": "image/*, text/html;q=0.9, */*;q=0.5"},
        timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
        follow_redirects=False,  # every hop is checked again by the Fetcher
        event_hooks={"response": [_take_location]},
        trust_env=False,  # a worker's proxy variables must not silently reroute crawls
    )
    client._cookies = _Cookies()  # the setter would wrap it in a plain httpx.Cookies
    return client


class Fetcher:
    """The crawler's HTTP client: network safety, robots.txt, per-host limits, retries, byte caps.

    ``resolver`` turns a host into addresses (default: the system's ``getaddrinfo``);
    ``limiter`` holds the per-host limits (default: this process only; the Celery workers pass
    a Redis-backed one shared by all of them). Safe to share between threads.
    """

    def __init__(
        self,
        settings: CrawlerSettings,
        *,
        resolver: Resolver | None = None,
        limiter: HostLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.policy = AddressPolicy.from_allowlist(settings.network_allowlist)
        self.resolver = resolver or system_resolver
        self.limiter = limiter or LocalHostLimiter(settings.per_host_concurrency)
        self.client = _make_client(settings)
        # host, port -> the checked addresses of a host written as an address (``127.0.0.1``,
        # ``0x7f.1``): the same answer every time, resolver or not; a name is resolved per request.
        self._numeric: dict[tuple[str, int], tuple[str, ...]] = {}
        self.robots = RobotsCache(
            settings.robots_token, self._fetch_robots, ttl=settings.robots_ttl, error_ttl=settings.robots_error_ttl
        )

    def get(
        self,
        url: str,
        *,
        purpose: Purpose,
        max_bytes: int | None = None,
        params: dict[str, str | int] | None = None,
        accept: str | None = None,
        headers: Mapping[str, str] | None = None,
        min_interval: float = 0.0,
    ) -> Fetched:
        """GET ``url`` under the crawler's rules; raise :class:`FetchError` with a reason.

        ``headers`` are a source's request profile (its User-Agent, Accept-Language, Referer,
        fetch metadata), sent on this request and its redirect hops; they change what the
        request says, never which rules apply to it (addresses, robots.txt, limits, caps).
        ``min_interval`` raises the host's interval for this request (a service's published
        rate limit, kept across workers by the host limiter).
        """
        cap = max_bytes or (self.settings.max_image_bytes if purpose is Purpose.IMAGE else self.settings.max_page_bytes)
        rules = _Rules(
            cap=cap,
            accept=accept,
            robots=purpose is not Purpose.API,
            meta=purpose is Purpose.PAGE,
            headers=_profile(headers),
            error_body=purpose is Purpose.API,
            min_interval=min_interval,
        )
        start = self._parse(url)
        if params:
            start = start.copy_merge_params(params)
        return self._with_retries(start, rules)

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """POST ``body`` under the same address rules as every fetch; the answer's status.

        For webhooks: no robots.txt (the receiver asked for the call), no redirect followed
        (a 3xx is the answer), no retry here (the delivery task retries with backoff).
        """
        target = self._parse(url)
        pin = self._vet(target)
        try:
            with pinned(pin):
                response = self.client.post(target, content=body, headers=headers)
        except BlockedAddress as exc:
            raise FetchError(FailureReason.BLOCKED_ADDRESS, str(exc)) from None
        except httpx.TimeoutException as exc:
            raise FetchError(FailureReason.TIMEOUT, type(exc).__name__) from exc
        except httpx.HTTPError as exc:
            raise FetchError(FailureReason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}") from exc
        return response.status_code

    # ------------------------------------------------------------------ retries and redirects

    def _with_retries(self, url: httpx.URL, rules: _Rules) -> Fetched:
        attempt = 0
        while True:
            try:
                return self._follow(url, rules)
            except _Retry as retry:
                error = retry.error
                if retry.after is not None and retry.after > self.settings.backoff_max:
                    raise FetchError(
                        error.reason,
                        f"{error.detail}; Retry-After {retry.after:g}s is longer than backoff_max "
                        f"{self.settings.backoff_max:g}s, not retried",
                        error.status,
                        retry.after,
                    ) from None
                if attempt >= self.settings.max_retries:
                    if attempt:
                        raise FetchError(
                            error.reason, f"{error.detail} (after {attempt} retries)", error.status, retry.after
                        ) from None
                    raise FetchError(error.reason, error.detail, error.status, retry.after) from None
                wait = (
                    retry.after
                    if retry.after is not None
                    else backoff_delay(attempt, self.settings.backoff_base, self.settings.backoff_max)
                )
                log.debug(
                    "retrying",
                    extra={
                        "url": str(url.copy_with(query=None)),  # no query: it may hold an API key
                        "attempt": attempt + 1,
                        "wait": wait,
                    },
                )
                time.sleep(wait)
                attempt += 1

    def _follow(self, url: httpx.URL, rules: _Rules) -> Fetched:
        """One attempt: the request and its redirects, each hop checked as if it were the first."""
        current = url
        for _hop in range(self.settings.max_redirects + 1):
            pin = self._vet(current)
            origin = _origin(current, pin.port)
            if rules.robots:
                try:
                    self.robots.check(str(current), origin)
                except RobotsRefusal as exc:
                    raise FetchError(exc.reason, exc.detail) from None
            interval = max(self.settings.per_host_interval, self.robots.delay(origin) or 0.0, rules.min_interval)
            result = self._hop(current, pin, interval, rules)
            if isinstance(result, Fetched):
                return result
            current = result
        raise FetchError(FailureReason.HTTP_ERROR, f"more than {self.settings.max_redirects} redirects")

    def _hop(self, url: httpx.URL, pin: Pin, interval: float, rules: _Rules) -> Fetched | httpx.URL:
        """One request to a checked address: the answer, or where it redirects to."""
        headers = dict(rules.headers)
        if rules.accept:
            headers["Accept"] = rules.accept
        try:
            with self.limiter.slot(pin.host, interval, self.settings.host_wait_timeout):
                deadline = time.monotonic() + self.settings.total_timeout  # from the host's turn, not the wait
                with pinned(pin), self.client.stream("GET", url, headers=headers) as response:
                    return self._answer(url, pin, response, rules, deadline)
        except HostBusy as exc:
            raise FetchError(FailureReason.TIMEOUT, str(exc)) from None
        except BlockedAddress as exc:  # the transport refused a connection the Fetcher did not check
            raise FetchError(FailureReason.BLOCKED_ADDRESS, str(exc)) from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
            # Nothing (or nothing usable) came back: worth another try, within max_retries.
            raise _Retry(FetchError(FailureReason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}")) from None
        except httpx.TimeoutException as exc:
            raise FetchError(FailureReason.TIMEOUT, type(exc).__name__) from exc
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise FetchError(FailureReason.INVALID_URL, str(exc)) from exc
        except httpx.HTTPError as exc:
            raise FetchError(FailureReason.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}") from exc

    def _answer(
        self, url: httpx.URL, pin: Pin, response: httpx.Response, rules: _Rules, deadline: float
    ) -> Fetched | httpx.URL:
        status = response.status_code
        if status in REDIRECT_STATUSES and _LOCATION in response.headers:
            return self._parse(response.headers[_LOCATION], base=url)
        if should_retry_status(status):
            after = parse_retry_after(response.headers.get("Retry-After"))
            if after is not None:
                self.limiter.defer(pin.host, min(after, MAX_DEFER))  # the host's other requests wait too
            raise _Retry(FetchError(FailureReason.HTTP_ERROR, f"HTTP {status}", status), after)
        if not 200 <= status < 300:
            error = FetchError(FailureReason.HTTP_ERROR, f"HTTP {status}", status)
            if rules.error_body:
                error.body = _read_error_body(response)
            raise error
        token = self.settings.robots_token
        if rules.robots and (directive := header_opt_out(response.headers.get_list("X-Robots-Tag"), token)):
            raise FetchError(FailureReason.OPTED_OUT, f"X-Robots-Tag: {directive}", status)  # body never read
        content = _read(response, rules.cap, deadline, self.settings.total_timeout, rules.truncate)
        content_type = response.headers.get("Content-Type", "")
        if rules.meta and "html" in content_type.lower() and (directive := meta_opt_out(content, token)):
            raise FetchError(FailureReason.OPTED_OUT, directive, status)
        return Fetched(url=str(url), status=status, content_type=content_type, content=content)

    # ------------------------------------------------------------------ checks

    def _parse(self, url: str, base: httpx.URL | None = None) -> httpx.URL:
        try:
            return base.join(url) if base is not None else httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise self._invalid(url if base is None else f"{url} (from {base})", url, exc) from None

    def _invalid(self, shown: str, url: str, exc: Exception) -> FetchError:
        """A URL httpx cannot parse; if its host is an unusual spelling of a refused address, say so."""
        try:
            host = urlsplit(url).hostname
            if host and numeric_addresses(host) is not None:  # never a DNS lookup for a URL we will not fetch
                vet(host, 0, self.policy, self.resolver)
        except BlockedAddress as blocked:
            return FetchError(FailureReason.BLOCKED_ADDRESS, str(blocked))
        except (ValueError, Unresolvable):
            pass
        return FetchError(FailureReason.INVALID_URL, f"{shown}: {exc}")

    def _vet(self, url: httpx.URL) -> Pin:
        """The checked addresses this URL's request may connect to."""
        if url.scheme not in DEFAULT_PORTS:
            raise FetchError(FailureReason.INVALID_URL, f"{url}: only http and https URLs are fetched")
        host = url.raw_host.decode("ascii")
        if not host:
            raise FetchError(FailureReason.INVALID_URL, f"{url}: no host")
        port = url.port or DEFAULT_PORTS[url.scheme]
        if (known := self._numeric.get((host, port))) is not None:
            return Pin(host, port, known)
        try:
            addresses = vet(host, port, self.policy, self.resolver)
        except BlockedAddress as exc:
            log.info("address refused", extra={"url": str(url), "why": str(exc)})
            raise FetchError(FailureReason.BLOCKED_ADDRESS, str(exc)) from None
        except Unresolvable as exc:
            raise FetchError(FailureReason.CONNECTION_ERROR, str(exc)) from None
        if literal_address(host) is not None or numeric_addresses(host) is not None:
            if len(self._numeric) >= 4096:
                self._numeric.clear()
            self._numeric[(host, port)] = addresses
        return Pin(host, port, addresses)

    def _fetch_robots(self, robots_url: str) -> RobotsAnswer:
        """robots.txt, under the same safety, limits and retries as any request (but not robots itself)."""
        rules = _Rules(
            cap=self.settings.robots_max_bytes, accept="text/plain, */*;q=0.1", robots=False, meta=False, truncate=True
        )
        try:
            got = self._with_retries(self._parse(robots_url), rules)
        except FetchError as exc:
            return RobotsAnswer(status=exc.status, failure=(exc.reason, exc.detail))
        return RobotsAnswer(status=got.status, body=got.content)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# Headers a profile may not set: the Fetcher decides where a request goes and how its body is framed.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "accept"})


def _profile(headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """A source's headers, checked: a profile says who asks, never where the request goes."""
    if not headers:
        return ()
    for name in headers:
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"a request profile may not set {name!r}; the Fetcher sets it (Accept: use accept=)")
    return tuple(headers.items())


def _origin(url: httpx.URL, port: int) -> str:
    """``scheme://host[:port]``: the scope of a robots.txt (RFC 9309), as it appears in URLs."""
    host = url.raw_host.decode("ascii")
    netloc = f"[{host}]" if ":" in host else host
    if port != DEFAULT_PORTS[url.scheme]:
        netloc += f":{port}"
    return f"{url.scheme}://{netloc}"


ERROR_BODY_BYTES = 4096  # of an API's error answer: enough for its message, never a whole page


def _read_error_body(response: httpx.Response) -> bytes:
    """The first bytes of an error answer; nothing if it cannot be read (the status says enough)."""
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            chunks.append(chunk[: ERROR_BODY_BYTES - size])
            size += len(chunks[-1])
            if size >= ERROR_BODY_BYTES:
                break
    except httpx.HTTPError:
        pass
    return b"".join(chunks)


def _read(response: httpx.Response, cap: int, deadline: float, total_timeout: float, truncate: bool) -> bytes:
    """The body, refused over ``cap`` bytes (declared or streamed) or when it trickles past the deadline."""
    declared = response.headers.get("Content-Length")
    if not truncate and declared and declared.isdigit() and int(declared) > cap:
        raise FetchError(FailureReason.TOO_LARGE, f"Content-Length {declared} > {cap} bytes", response.status_code)
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        if size + len(chunk) > cap:
            if truncate:
                chunks.append(chunk[: cap - size])
                break
            raise FetchError(FailureReason.TOO_LARGE, f"more than {cap} bytes", response.status_code)
        size += len(chunk)
        if time.monotonic() > deadline:
            raise FetchError(FailureReason.TIMEOUT, f"download took longer than {total_timeout}s", response.status_code)
        chunks.append(chunk)
    return b"".join(chunks)
