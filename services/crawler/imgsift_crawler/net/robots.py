"""robots.txt and the per-response opt-outs (``X-Robots-Tag``, ``<meta name="robots">``).

robots.txt is read once per origin (scheme, host, port: RFC 9309 scopes it so) and kept for
``robots_ttl`` seconds. What an answer means, after the Fetcher's own redirects and retries:

- 2xx: the rules are parsed with protego (Scrapy's parser: RFC 9309 matching, wildcards,
  ``Crawl-delay`` and ``Request-rate``) and applied to our product token (``imgsift``);
- 4xx (404, 403, 410...): the file is *unavailable*, everything is allowed (RFC 9309 §2.3.1.3);
- 429, 5xx, or no answer at all: the file is *unreachable*; RFC 9309 §2.3.1.4 and Google say
  to assume a complete disallow. The origin is refused for ``robots_error_ttl`` seconds, then
  robots.txt is asked again: a site that is down or overloaded is left alone rather than
  crawled blind.

``Crawl-delay`` and ``Request-rate`` become the minimum interval between two requests to the
host (the limiter takes the larger of that and the configured interval).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html.parser import HTMLParser

from protego import Protego

from imgsift_common.messages import FailureReason

# Directives that take a value after a colon; anything else before a colon is a user agent.
_VALUED = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
OPT_OUT_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "none"})


class RobotsRefusal(Exception):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RobotsAnswer:
    """What fetching robots.txt gave: a status and body, or the failure that stopped it."""

    status: int | None
    body: bytes = b""
    failure: tuple[FailureReason, str] | None = None  # no HTTP answer: connection refused, timeout...


@dataclass(frozen=True)
class _Entry:
    expires: float
    rules: Protego | None = None  # None: everything allowed
    refusal: tuple[FailureReason, str] | None = None  # every URL of the origin refused
    delay: float | None = None  # seconds between requests, from Crawl-delay / Request-rate


class RobotsCache:
    """robots.txt per origin, fetched once (one request however many threads ask), kept for a TTL."""

    def __init__(
        self,
        token: str,
        fetch: Callable[[str], RobotsAnswer],
        ttl: float,
        error_ttl: float,
        max_origins: int = 10_000,
    ) -> None:
        self.token = token
        self.fetch = fetch
        self.ttl = ttl
        self.error_ttl = error_ttl
        self.max_origins = max_origins
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._origin_locks: dict[str, threading.Lock] = {}

    def check(self, url: str, origin: str) -> None:
        """Raise :class:`RobotsRefusal` unless robots.txt of ``origin`` lets us fetch ``url``."""
        entry = self._entry(origin)
        if entry.refusal is not None:
            raise RobotsRefusal(*entry.refusal)
        if entry.rules is not None and not entry.rules.can_fetch(url, self.token):
            raise RobotsRefusal(
                FailureReason.ROBOTS_DISALLOWED, f"{origin}/robots.txt disallows {url} for user agent {self.token!r}"
            )

    def delay(self, origin: str) -> float | None:
        """The origin's Crawl-delay / Request-rate interval, if its robots.txt is known (never fetches)."""
        with self._lock:
            entry = self._entries.get(origin)
        return entry.delay if entry is not None else None

    def _entry(self, origin: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(origin)
            if entry is not None and entry.expires > time.monotonic():
                self._entries.move_to_end(origin)
                return entry
            origin_lock = self._origin_locks.setdefault(origin, threading.Lock())
        with origin_lock:  # one fetch per origin; the other threads wait for its result
            with self._lock:
                entry = self._entries.get(origin)
                if entry is not None and entry.expires > time.monotonic():
                    return entry
            entry = self._judge(origin, self.fetch(f"{origin}/robots.txt"))
            with self._lock:
                self._entries[origin] = entry
                self._entries.move_to_end(origin)
                while len(self._entries) > self.max_origins:
                    old, _ = self._entries.popitem(last=False)
                    self._origin_locks.pop(old, None)
            return entry

    def _judge(self, origin: str, answer: RobotsAnswer) -> _Entry:
        now = time.monotonic()
        status = answer.status
        if answer.failure is not None and status is None:
            reason, detail = answer.failure
            if reason not in (FailureReason.CONNECTION_ERROR, FailureReason.TIMEOUT):
                reason = FailureReason.ROBOTS_DISALLOWED
            return _Entry(
                now + self.error_ttl,
                refusal=(
                    reason,
                    f"{origin}/robots.txt could not be fetched ({detail}); "
                    f"not crawling {origin} for {self.error_ttl:g}s (RFC 9309: unreachable means disallow)",
                ),
            )
        if status is not None and (status == 429 or status >= 500):
            return _Entry(
                now + self.error_ttl,
                refusal=(
                    FailureReason.ROBOTS_DISALLOWED,
                    f"{origin}/robots.txt answered HTTP {status}; treated as disallow-all for "
                    f"{self.error_ttl:g}s (RFC 9309: a server error means disallow)",
                ),
            )
        if status is None or not 200 <= status < 300:
            return _Entry(now + self.ttl)  # 4xx (or a redirect loop): no robots.txt, all allowed
        rules = Protego.parse(answer.body.decode("utf-8", errors="replace"))
        return _Entry(now + self.ttl, rules=rules, delay=_interval(rules, self.token))


def _interval(rules: Protego, token: str) -> float | None:
    delays = []
    if (crawl_delay := rules.crawl_delay(token)) is not None:
        delays.append(float(crawl_delay))
    rate = rules.request_rate(token)
    if rate is not None and rate.requests:
        delays.append(rate.seconds / rate.requests)
    return max(delays) if delays else None


def header_opt_out(values: Iterable[str], token: str) -> str | None:
    """The opt-out directive (noai, noimageai, noindex, none) ``X-Robots-Tag`` headers give us, if any.

    A header may scope its directives to one user agent (``googlebot: noindex``); those apply
    only when the agent is our token (``imgsift: noai``).
    """
    token = token.lower()
    for value in values:
        scope: str | None = None
        for raw in value.split(","):
            part = raw.strip().lower()
            if ":" in part:
                name, rest = (s.strip() for s in part.split(":", 1))
                if name in _VALUED:
                    continue
                scope, part = name, rest
            if part in OPT_OUT_DIRECTIVES and scope in (None, token, "*"):
                return part if scope is None else f"{scope}: {part}"
    return None


class _MetaRobots(HTMLParser):
    """Collects ``<meta name="robots" | name="<token>" content=...>`` from a page's head."""

    def __init__(self, token: str) -> None:
        super().__init__(convert_charrefs=True)
        self.token = token
        self.found: list[tuple[str, str]] = []  # (name, content)
        self.done = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.done = True
        if tag != "meta" or self.done:
            return
        values = {k.lower(): (v or "") for k, v in attrs}
        name = values.get("name", "").strip().lower()
        if name in ("robots", self.token):
            self.found.append((name, values.get("content", "")))


def meta_opt_out(html: bytes, token: str) -> str | None:
    """The opt-out directive in a page's ``<meta name="robots">`` (or ``name="imgsift"``), if any."""
    parser = _MetaRobots(token.lower())
    head = html[: 256 * 1024].decode("utf-8", errors="replace")
    with contextlib.suppress(AssertionError):  # html.parser on broken markup: what was read still counts
        parser.feed(head)
    for name, content in parser.found:
        for part in content.split(","):
            directive = part.strip().lower()
            if directive in OPT_OUT_DIRECTIVES:
                return f'<meta name="{name}" content="{directive}">'
    return None
