"""Downloads: timeouts, the byte cap and redirects, against a real local server."""

from __future__ import annotations

import pytest

from imgsift_common.messages import FailureReason
from imgsift_crawler.fetch import Fetcher, FetchError, Purpose
from tests.support.web import TestWeb


def test_get_returns_body_and_final_url_after_redirect(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/data", b"x" * 100, "application/octet-stream")
    web.add("/moved", b"", status=302, headers={"Location": "/data"})
    got = fetcher.get(web.url("/moved"), purpose=Purpose.IMAGE, max_bytes=1000)
    assert got.content == b"x" * 100
    assert got.url == web.url("/data")


def test_declared_length_over_cap_is_refused(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/big", b"x" * 5000, "image/jpeg")
    with pytest.raises(FetchError) as err:
        fetcher.get(web.url("/big"), purpose=Purpose.IMAGE, max_bytes=1000)
    assert err.value.reason is FailureReason.TOO_LARGE


def test_undeclared_length_over_cap_is_cut_while_streaming(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/stream", b"x" * 50_000, "image/jpeg", send_length=False)
    with pytest.raises(FetchError) as err:
        fetcher.get(web.url("/stream"), purpose=Purpose.IMAGE, max_bytes=10_000)
    assert err.value.reason is FailureReason.TOO_LARGE
    assert "more than 10000 bytes" in err.value.detail


def test_trickling_server_hits_the_total_timeout(web: TestWeb, crawler_settings) -> None:  # type: ignore[no-untyped-def]
    web.add("/slow", b"x" * 20_000, "image/jpeg", trickle=0.1)
    with (
        Fetcher(crawler_settings.model_copy(update={"total_timeout": 0.5})) as fetcher,
        pytest.raises(FetchError) as err,
    ):
        fetcher.get(web.url("/slow"), purpose=Purpose.IMAGE, max_bytes=100_000)
    assert err.value.reason is FailureReason.TIMEOUT


def test_http_errors_and_redirect_loops_have_reasons(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/loop", b"", status=302, headers={"Location": "/loop"})
    with pytest.raises(FetchError) as err:
        fetcher.get(web.url("/missing"), purpose=Purpose.IMAGE)
    assert err.value.reason is FailureReason.HTTP_ERROR and err.value.status == 404
    with pytest.raises(FetchError) as err:
        fetcher.get(web.url("/loop"), purpose=Purpose.IMAGE)
    assert "redirects" in err.value.detail


def test_only_a_location_header_redirects(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/sneaky", b"", status=302, headers={"X-Imgsift-Location": "/data"})
    with pytest.raises(FetchError) as err:
        fetcher.get(web.url("/sneaky"), purpose=Purpose.IMAGE)
    assert err.value.status == 302 and [hit.path for hit in web.hits] == ["/robots.txt", "/sneaky"]


def test_query_parameters_are_sent_with_the_first_request(web: TestWeb, fetcher: Fetcher) -> None:
    web.add("/api", b"{}", "application/json")
    fetcher.get(web.url("/api?a=1"), purpose=Purpose.API, params={"q": "red fox", "page": 2})
    assert web.requests[-1] == "/api?a=1&q=red+fox&page=2"


def test_user_agent_with_contact_is_sent_on_every_request_robots_txt_included(
    web: TestWeb,
    crawler_settings,  # type: ignore[no-untyped-def]
) -> None:
    web.add("/img.jpg", b"x", "image/jpeg")
    web.add("/moved.jpg", b"", status=301, headers={"Location": "/img.jpg"})
    settings = crawler_settings.model_copy(update={"contact": "crawler-ops@example.org"})
    with Fetcher(settings) as fetcher:
        fetcher.get(web.url("/moved.jpg"), purpose=Purpose.IMAGE)
    agents = {hit.path: hit.headers.get("User-Agent") for hit in web.hits}
    assert set(agents) == {"/robots.txt", "/moved.jpg", "/img.jpg"}
    assert set(agents.values()) == {
        "imgsift/0.1 (+https://github.com/imgsift/imgsift) contact: crawler-ops@example.org"
    }


def test_a_cookie_an_answer_sets_is_sent_on_the_next_hop(web: TestWeb, fetcher: Fetcher) -> None:
    """The cookie jar reads only answers that set a cookie, and still reads those."""
    web.add("/img.jpg", b"x", "image/jpeg")
    web.add("/gate", b"", status=302, headers={"Location": "/img.jpg", "Set-Cookie": "seen=1; Path=/"})
    fetcher.get(web.url("/img.jpg"), purpose=Purpose.IMAGE)  # no cookie yet, none set
    fetcher.get(web.url("/gate"), purpose=Purpose.IMAGE)
    cookies = [(hit.path, hit.headers.get("Cookie")) for hit in web.hits if hit.path != "/robots.txt"]
    assert cookies == [("/img.jpg", None), ("/gate", None), ("/img.jpg", "seen=1")]
