"""Politeness, measured by the server: robots.txt, opt-outs, retries, per-host concurrency and spacing.

Timings come from the test web's own log (``web.hits``: when each request arrived), with
tolerances; intervals are small so the module stays fast.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from random import Random

import pytest

from imgsift_common.messages import FailureReason
from imgsift_crawler.fetch import Fetcher, FetchError, Purpose
from imgsift_crawler.net.limits import HostBusy, LocalHostLimiter, RedisHostLimiter
from imgsift_crawler.net.retry import backoff_delay, parse_retry_after
from imgsift_crawler.net.robots import header_opt_out, meta_opt_out
from imgsift_crawler.settings import CrawlerSettings
from tests.support.web import Route, TestWeb

TOLERANCE = 0.03  # seconds: thread wake-ups and the server's own clock reading


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


def gaps(starts: list[float]) -> list[float]:
    ordered = sorted(starts)
    return [b - a for a, b in itertools.pairwise(ordered)]


# ---------------------------------------------------------------------------- robots.txt

ROBOTS = """\
User-agent: *
Disallow: /private/

User-agent: imgsift
Disallow: /no-imgsift/
Disallow: /private/
"""


def test_robots_txt_is_obeyed_and_read_once_per_host(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/robots.txt", ROBOTS, "text/plain")
    for i in range(12):
        web.add(f"/public/{i}.jpg", b"x", "image/jpeg")
    with ThreadPoolExecutor(6) as pool:  # threads asking at once still cause one robots.txt request
        list(pool.map(lambda i: fetcher.get(web.url(f"/public/{i}.jpg"), purpose=Purpose.IMAGE), range(12)))
    for path in ("/private/a.jpg", "/no-imgsift/b.jpg"):
        error = refused(fetcher, web.url(path))
        assert error.reason is FailureReason.ROBOTS_DISALLOWED
        assert "robots.txt disallows" in error.detail and "'imgsift'" in error.detail
    assert len(web.hits_of("/robots.txt")) == 1
    assert not [h for h in web.hits if h.path.startswith(("/private", "/no-imgsift"))]
    assert refused(fetcher, web.url("/private/page.html"), Purpose.PAGE).reason is FailureReason.ROBOTS_DISALLOWED


def test_search_apis_are_not_governed_by_robots_txt(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/robots.txt", "User-agent: *\nDisallow: /\n", "text/plain")
    web.add("/api/search", b"{}", "application/json")
    assert fetcher.get(web.url("/api/search"), purpose=Purpose.API).content == b"{}"
    assert web.hits_of("/robots.txt") == []


def test_missing_robots_txt_allows_everything(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/a.jpg", b"x", "image/jpeg")
    web.add("/b.jpg", b"y", "image/jpeg")
    assert fetcher.get(web.url("/a.jpg"), purpose=Purpose.IMAGE).content == b"x"
    assert fetcher.get(web.url("/b.jpg"), purpose=Purpose.IMAGE).content == b"y"
    assert len(web.hits_of("/robots.txt")) == 1  # the 404 is remembered too


def test_robots_txt_server_error_means_disallow_all_for_a_while(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher
) -> None:
    web.add("/robots.txt", "down", "text/plain", status=503)
    web.add("/a.jpg", b"x", "image/jpeg")
    fetcher = make_fetcher(crawler_settings.model_copy(update={"max_retries": 1}))
    for _ in range(3):
        error = refused(fetcher, web.url("/a.jpg"))
        assert error.reason is FailureReason.ROBOTS_DISALLOWED
        assert "HTTP 503" in error.detail and "disallow" in error.detail
    assert len(web.hits_of("/robots.txt")) == 2  # first try and one retry, then remembered
    assert web.hits_of("/a.jpg") == []


def test_unreachable_robots_txt_refuses_the_host_with_the_connection_error(
    crawler_settings: CrawlerSettings, make_fetcher
) -> None:
    from tests.conftest import free_port

    fetcher = make_fetcher(crawler_settings.model_copy(update={"max_retries": 0}))
    error = refused(fetcher, f"http://127.0.0.1:{free_port()}/a.jpg")
    assert error.reason is FailureReason.CONNECTION_ERROR
    assert "robots.txt could not be fetched" in error.detail


def test_crawl_delay_spaces_requests_to_the_host(web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher) -> None:
    web.add("/robots.txt", "User-agent: *\nCrawl-delay: 0.2\n", "text/plain")
    for i in range(4):
        web.add(f"/{i}.jpg", b"x", "image/jpeg")
    fetcher = make_fetcher(crawler_settings.model_copy(update={"per_host_concurrency": 4}))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: fetcher.get(web.url(f"/{i}.jpg"), purpose=Purpose.IMAGE), range(4)))
    images = [h.started for h in web.hits if h.path.endswith(".jpg")]
    assert len(images) == 4 and min(gaps(images)) >= 0.2 - TOLERANCE, gaps(images)


# ---------------------------------------------------------------------------- opt-outs


@pytest.mark.parametrize(
    ("header", "refused_by"),
    [
        ("noai", "noai"),
        ("noimageai", "noimageai"),
        ("noindex, nofollow", "noindex"),
        ("none", "none"),
        ("NoAI", "noai"),
        ("imgsift: noimageai", "imgsift: noimageai"),
        ("googlebot: nofollow, imgsift: noai", "imgsift: noai"),  # each agent scopes what follows it
        ("googlebot: noindex, noai", None),  # a scope runs to the end of the value
        ("otherbot: noindex", None),
        ("nofollow, max-image-preview: large", None),
        ("unavailable_after: 25 Jun 2030 15:00:00 PST", None),
    ],
)
def test_x_robots_tag_directives(header: str, refused_by: str | None) -> None:
    assert header_opt_out([header], "imgsift") == refused_by


def test_x_robots_tag_opt_out_refuses_the_image_before_its_body_is_read(web: TestWeb, fetcher: Fetcher) -> None:
    # 200 KiB sent 1 KiB per 20 ms: reading the body would take 4 s.
    web.add("/opted-out.jpg", b"x" * 200_000, "image/jpeg", headers={"X-Robots-Tag": "noai"}, trickle=0.02)
    web.add("/other-bot.jpg", b"y", "image/jpeg", headers={"X-Robots-Tag": "otherbot: noindex"})
    web.add("/api.json", b"{}", "application/json", headers={"X-Robots-Tag": "noai"})
    started = time.monotonic()
    error = refused(fetcher, web.url("/opted-out.jpg"))
    assert time.monotonic() - started < 1.0
    assert error.reason is FailureReason.OPTED_OUT and error.detail == "X-Robots-Tag: noai"
    assert fetcher.get(web.url("/other-bot.jpg"), purpose=Purpose.IMAGE).content == b"y"
    assert fetcher.get(web.url("/api.json"), purpose=Purpose.API).content == b"{}"  # APIs: their own terms


def test_meta_robots_opt_out_refuses_a_page(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/noai.html", '<html><head><meta name="robots" content="noimageai"></head><body><img src="/a.jpg">')
    web.add("/ours.html", '<html><head><meta name="imgsift" content="noai"></head><body></body></html>')
    web.add("/fine.html", '<html><head><meta name="robots" content="nofollow"><meta name="otherbot" content="noai">')
    assert refused(fetcher, web.url("/noai.html"), Purpose.PAGE).reason is FailureReason.OPTED_OUT
    assert refused(fetcher, web.url("/ours.html"), Purpose.PAGE).reason is FailureReason.OPTED_OUT
    assert fetcher.get(web.url("/fine.html"), purpose=Purpose.PAGE).status == 200
    assert meta_opt_out(b'<body><meta name="robots" content="noai">', "imgsift") is None  # not in the head


# ---------------------------------------------------------------------------- retries


def test_429_is_retried_after_its_retry_after(web: TestWeb, fetcher: Fetcher) -> None:
    web.add_sequence(
        "/busy.jpg", [Route(b"slow down", status=429, headers={"Retry-After": "1"}), Route(b"ok", "image/jpeg")]
    )
    assert fetcher.get(web.url("/busy.jpg"), purpose=Purpose.IMAGE).content == b"ok"
    first, second = web.hits_of("/busy.jpg")
    assert second.started - first.started >= 1.0 - TOLERANCE


def test_503_twice_then_200_succeeds_with_growing_backoff(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher
) -> None:
    down = Route(b"down", status=503)
    web.add_sequence("/flaky.jpg", [down, down, Route(b"ok", "image/jpeg")])
    fetcher = make_fetcher(crawler_settings.model_copy(update={"backoff_base": 0.05}))
    assert fetcher.get(web.url("/flaky.jpg"), purpose=Purpose.IMAGE).content == b"ok"
    hits = web.hits_of("/flaky.jpg")
    assert len(hits) == 3
    # Full jitter draws each wait from [0, 0.05 * 2**n]: the whole run stays under the caps' sum.
    assert hits[-1].started - hits[0].started <= 0.05 + 0.1 + 3 * TOLERANCE + 0.1


def test_retries_are_bounded_and_only_for_transient_answers(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/down.jpg", b"", status=503)
    web.add("/gone.jpg", b"", status=410)
    web.add("/forbidden.jpg", b"", status=403)
    web.add_sequence("/timeout.jpg", [Route(b"", status=408), Route(b"ok", "image/jpeg")])
    error = refused(fetcher, web.url("/down.jpg"))
    assert error.reason is FailureReason.HTTP_ERROR and error.detail == "HTTP 503 (after 3 retries)"
    assert len(web.hits_of("/down.jpg")) == 4  # max_retries=3
    for path in ("/gone.jpg", "/forbidden.jpg"):
        assert refused(fetcher, web.url(path)).status in (410, 403)
        assert len(web.hits_of(path)) == 1
    assert fetcher.get(web.url("/timeout.jpg"), purpose=Purpose.IMAGE).content == b"ok"


def test_a_retry_after_beyond_patience_fails_at_once_and_holds_the_host_back(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher
) -> None:
    web.add("/later.jpg", b"", status=503, headers={"Retry-After": "120"})
    web.add("/other.jpg", b"x", "image/jpeg")
    fetcher = make_fetcher(crawler_settings.model_copy(update={"host_wait_timeout": 5.0}))
    started = time.monotonic()
    error = refused(fetcher, web.url("/later.jpg"))
    assert "Retry-After 120s is longer than backoff_max" in error.detail
    # The host asked for two minutes: its other URLs are not requested before then.
    assert refused(fetcher, web.url("/other.jpg")).reason is FailureReason.TIMEOUT
    assert time.monotonic() - started < 1.0
    assert len(web.hits_of("/later.jpg")) == 1 and web.hits_of("/other.jpg") == []


def test_backoff_and_retry_after_arithmetic() -> None:
    rng = Random(7)
    for attempt in range(8):
        draws = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        ceiling = min(30.0, 0.5 * 2**attempt)
        assert min(draws) >= 0 and max(draws) <= ceiling
        assert max(draws) > 0.8 * ceiling  # jitter spans the whole range
    assert parse_retry_after("7") == 7.0
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# ---------------------------------------------------------------------------- per-host limits


def _hammer(fetchers: list[Fetcher], web: TestWeb, n: int) -> None:
    """``n`` image requests to one host, from 8 threads spread over ``fetchers``."""
    for i in range(n):
        web.add(f"/img/{i}.jpg", b"x", "image/jpeg", delay=0.1)
    with ThreadPoolExecutor(8) as pool:
        jobs = [
            pool.submit(fetchers[i % len(fetchers)].get, web.url(f"/img/{i}.jpg"), purpose=Purpose.IMAGE)
            for i in range(n)
        ]
        for job in jobs:
            job.result()


def test_concurrency_per_host_stays_under_the_limit(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher
) -> None:
    fetcher = make_fetcher(crawler_settings.model_copy(update={"per_host_concurrency": 2}))
    _hammer([fetcher], web, 10)
    assert web.max_active == 2  # never more; and the threads did overlap up to it


def test_requests_to_a_host_are_spaced_by_the_interval(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher
) -> None:
    fetcher = make_fetcher(crawler_settings.model_copy(update={"per_host_concurrency": 8, "per_host_interval": 0.1}))
    _hammer([fetcher], web, 8)
    starts = [h.started for h in web.hits]  # robots.txt included: it is a request to the host too
    assert len(starts) == 9 and min(gaps(starts)) >= 0.1 - TOLERANCE, gaps(starts)


def test_the_redis_limiter_holds_the_limits_across_fetchers(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher, redis_url: str
) -> None:
    """Two Fetchers (two worker processes, as far as the limiter knows) share one host's limits."""
    settings = crawler_settings.model_copy(update={"per_host_concurrency": 2, "per_host_interval": 0.05})
    fetchers = [make_fetcher(settings, limiter=RedisHostLimiter.from_url(redis_url, 2)) for _ in range(2)]
    _hammer(fetchers, web, 12)
    assert web.max_active == 2
    assert min(gaps([h.started for h in web.hits])) >= 0.05 - TOLERANCE


def test_separate_in_process_limiters_do_not_coordinate(
    web: TestWeb, crawler_settings: CrawlerSettings, make_fetcher
) -> None:
    """The counterpart of the test above: what the Redis limiter prevents does happen without it."""
    settings = crawler_settings.model_copy(update={"per_host_concurrency": 2})
    _hammer([make_fetcher(settings), make_fetcher(settings)], web, 12)
    assert web.max_active > 2


def test_a_redis_slot_is_renewed_while_held_and_freed_soon_after_its_worker_dies(redis_url: str) -> None:
    worker = RedisHostLimiter.from_url(redis_url, concurrency=1, lease=1.0)
    other = RedisHostLimiter.from_url(redis_url, concurrency=1, lease=1.0)
    held = worker.slot("crashy.test", 0.0, timeout=1.0)
    held.__enter__()  # a download that outlasts its lease
    with pytest.raises(HostBusy), other.slot("crashy.test", 0.0, timeout=2.0):
        pass  # 2 s > the 1 s lease: the heartbeat kept the slot
    worker.close()  # the worker dies: no more renewals, and no release
    died = time.monotonic()
    with other.slot("crashy.test", 0.0, timeout=3.0):
        assert time.monotonic() - died <= 1.5
    other.close()


@pytest.mark.parametrize("limiter", ["local", "redis"])
def test_a_deferred_host_fails_at_once_when_the_wait_is_too_long(limiter: str, request: pytest.FixtureRequest) -> None:
    if limiter == "local":
        hosts = LocalHostLimiter(2)
    else:
        hosts = RedisHostLimiter.from_url(request.getfixturevalue("redis_url"), 2)
    hosts.defer("slow.test", 60)
    started = time.monotonic()
    with pytest.raises(HostBusy, match=r"slow\.test"), hosts.slot("slow.test", 0.0, timeout=5):
        pass
    assert time.monotonic() - started < 0.5
    with hosts.slot("other.test", 0.0, timeout=0.5):  # other hosts are not held back
        pass
