"""The keyword sources against the answers the live services give: the headers each sends
(its request profile), paging within each service's limits, and each failure mode (a 429
with Retry-After, a 400 past the last page, an empty page, a changed format, an expired
token) told apart as transient or permanent, in the source and in a job.

Failure answers are recorded or taken from the services' own code (fixtures/SOURCES.md),
served by a loopback server standing in for each service.
"""

from __future__ import annotations

import itertools
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from imgsift_common.messages import Job, JobSpec, SourceKind, SourceSpec
from imgsift_crawler import pipeline
from imgsift_crawler.fetch import Fetcher, Purpose
from imgsift_crawler.settings import CrawlerSettings
from imgsift_crawler.sources import SOURCES, SourceContext, SourceError, bing, duckduckgo, flickr, openverse, wikimedia
from imgsift_crawler.sources.base import FormatChanged
from tests.crawler.conftest import every_page
from tests.support.web import Route, TestWeb

FIXTURES = Path(__file__).parent / "fixtures"
BING_PAGE = (FIXTURES / "bing_images_search.html").read_bytes()
DDG_SEARCH_PAGE = (FIXTURES / "duckduckgo_search_vqd.html").read_bytes()
DDG_VQD = "3-320068370671196460038575011587633753929-199869977846294510399902480995708132308"
THROTTLED = (FIXTURES / "openverse_429_throttled.json").read_bytes()
PAGE_DEPTH = (FIXTURES / "openverse_400_page_depth.json").read_bytes()


# Each keyword source: the setting of its endpoint and the path it asks for results.
SOURCE_PATHS = {
    SourceKind.OPENVERSE: ("openverse_url", "/v1/images/"),
    SourceKind.WIKIMEDIA: ("wikimedia_url", "/w/api.php"),
    SourceKind.BING: ("bing_url", "/images/async"),
    SourceKind.DUCKDUCKGO: ("duckduckgo_url", "/i.js"),
    SourceKind.FLICKR: ("flickr_url", "/services/rest/"),
}


def _json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _ctx(fetcher: Fetcher, settings: CrawlerSettings, query: str = "cat") -> SourceContext:
    return SourceContext(fetcher=fetcher, settings=settings, query=query)


def _pages(web: TestWeb, path: str) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(hit.path).query, keep_blank_values=True) for hit in web.hits_of(path)]


def _openverse_page(page_count: int) -> bytes:
    recorded = _json("openverse_page1.json")
    recorded["page_count"] = page_count
    return json.dumps(recorded).encode()


# ============================================================================ request profiles


def test_each_source_sends_its_request_profile(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/images/async", BING_PAGE)
    web.add("/ddg/", DDG_SEARCH_PAGE)
    web.add("/ddg/i.js", json.dumps(_json("duckduckgo_images_no_results.json")), "application/json")
    web.add("/v1/images/", _openverse_page(1), "application/json")
    web.add("/w/api.php", json.dumps(_json("wikimedia_search.json")), "application/json")
    settings = crawler_settings.model_copy(
        update={
            "bing_url": web.url("/images/async"),
            "duckduckgo_url": web.url("/ddg/"),
            "openverse_url": web.url("/v1/images/"),
            "wikimedia_url": web.url("/w/api.php"),
            "contact": "ops@example.org",
            "bing_market": "de-DE",
        }
    )
    for source, kind in ((bing, SourceKind.BING), (duckduckgo, SourceKind.DUCKDUCKGO)):
        source.page(SourceSpec(kind=kind), _ctx(fetcher, settings), None)
    openverse.page(SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings), None)
    wikimedia.page(SourceSpec(kind=SourceKind.WIKIMEDIA), _ctx(fetcher, settings), None)

    [grid] = web.hits_of("/images/async")
    assert grid.headers["User-Agent"] == settings.browser_user_agent  # as searxng and ddgs send
    assert grid.headers["Accept-Language"] == "en-US,en;q=0.9"
    assert grid.headers["Cookie"] == "_EDGE_CD=m=de-de&u=de; _EDGE_S=mkt=de-de&ui=de"  # searxng's market cookies
    [search_page] = web.hits_of("/ddg/")
    assert search_page.headers["Sec-Fetch-Mode"] == "navigate"
    [results] = web.hits_of("/ddg/i.js")
    # ddgs's fix of the June 2025 "403 Ratelimit" (deedy5/ddgs#309): Referer and Sec-Fetch-Mode on i.js.
    assert results.headers["Referer"] == web.url("/") and results.headers["Sec-Fetch-Mode"] == "cors"
    assert results.headers["User-Agent"] == settings.browser_user_agent
    # Open APIs get the crawler's own name and contact; Wikimedia requires the contact.
    for path in ("/v1/images/", "/w/api.php"):
        [hit] = web.hits_of(path)
        assert hit.headers["User-Agent"] == settings.full_user_agent
        assert "contact: ops@example.org" in hit.headers["User-Agent"]


def test_a_profile_cannot_redirect_a_request(fetcher: Fetcher, web: TestWeb) -> None:
    web.add("/x", "ok")
    with pytest.raises(ValueError, match="may not set 'Host'"):
        fetcher.get(web.url("/x"), purpose=Purpose.API, headers={"Host": "metadata.google.internal"})
    assert not web.hits_of("/x")


def test_wikimedia_without_a_contact_is_a_permanent_error_that_says_what_to_set(
    fetcher: Fetcher, crawler_settings: CrawlerSettings, web: TestWeb
) -> None:
    settings = crawler_settings.model_copy(update={"wikimedia_url": web.url("/w/api.php"), "contact": None})
    with pytest.raises(SourceError, match="IMGSIFT_CRAWLER_CONTACT") as caught:
        wikimedia.page(SourceSpec(kind=SourceKind.WIKIMEDIA), _ctx(fetcher, settings), None)
    assert not caught.value.transient and not web.hits_of("/w/api.php")  # never sent without one


def test_wikimedia_403_for_the_user_agent_is_permanent_and_names_the_agent(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/w/api.php", (FIXTURES / "wikimedia_403_user_agent.txt").read_bytes(), "text/plain", status=403)
    settings = crawler_settings.model_copy(update={"wikimedia_url": web.url("/w/api.php"), "contact": "ops@x.org"})
    with pytest.raises(SourceError, match="Wikimedia refused the User-Agent") as caught:
        wikimedia.page(SourceSpec(kind=SourceKind.WIKIMEDIA), _ctx(fetcher, settings), None)
    assert not caught.value.transient


def test_wikimedia_maxlag_is_transient_and_a_bare_answer_is_a_format_change() -> None:
    with pytest.raises(SourceError, match="maxlag") as caught:
        wikimedia.parse_page(_json("wikimedia_maxlag.json"))
    assert caught.value.transient
    assert wikimedia.parse_page({"batchcomplete": True}) == ([], None)  # a search with no hits
    with pytest.raises(FormatChanged, match="the source's format changed"):
        wikimedia.parse_page({"warnings": {}})


@pytest.mark.parametrize("kind", list(SOURCE_PATHS))
def test_every_keyword_source_hands_a_429_with_its_retry_after_to_the_stream(
    kind: SourceKind, web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    setting, path = SOURCE_PATHS[kind]
    # DuckDuckGo's search page answers; its i.js is what rate-limits.
    web.add("/", DDG_SEARCH_PAGE)
    web.add(path, THROTTLED, "application/json", status=429, headers={"Retry-After": "120"})
    settings = crawler_settings.model_copy(
        update={setting: web.url("/" if kind is SourceKind.DUCKDUCKGO else path), "contact": "ops@example.org"}
        | {"flickr_api_key": SecretStr("0123456789abcdef")}
    )
    with pytest.raises(SourceError, match="HTTP 429") as caught:
        SOURCES[kind](SourceSpec(kind=kind), _ctx(fetcher, settings), None)
    assert caught.value.transient and caught.value.retry_after == 120.0
    assert len(web.hits_of(path)) == 1  # longer than backoff_max: not retried inside the request


# ============================================================================ Openverse


def test_openverse_stops_at_its_pagination_depth_with_its_largest_anonymous_page(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/v1/images/", _openverse_page(250), "application/json")  # more pages than the API serves
    settings = crawler_settings.model_copy(update={"openverse_url": web.url("/v1/images/")})
    every_page(openverse.page, SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings))
    asked = _pages(web, "/v1/images/")
    assert [int(p["page"][0]) for p in asked] == list(range(1, 21))  # page 21 answers 400: never asked
    assert {p["page_size"][0] for p in asked} == {"20"}
    with pytest.raises(ValueError, match="openverse_page_size"):
        CrawlerSettings(storage="local", openverse_page_size=21)  # more answers 401 without OAuth


def test_openverse_requests_keep_to_its_rate_limit(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/v1/images/", _openverse_page(3), "application/json")
    settings = crawler_settings.model_copy(
        update={"openverse_url": web.url("/v1/images/"), "openverse_requests_per_minute": 300.0}  # one per 0.2 s
    )
    every_page(openverse.page, SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings))
    starts = [hit.started for hit in web.hits_of("/v1/images/")]
    assert len(starts) == 3
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(starts))  # never faster (slower: a busy host)
    assert CrawlerSettings.model_fields["openverse_requests_per_minute"].default == 20.0  # the anonymous limit


def test_openverse_400_past_its_last_page_ends_the_stream_without_an_error(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    pages = {"1": Route(_openverse_page(250), "application/json"), "2": Route(PAGE_DEPTH, "application/json", 400)}
    web.dynamic["/v1/images/"] = lambda q: pages[q["page"][0]]
    settings = crawler_settings.model_copy(update={"openverse_url": web.url("/v1/images/")})
    found = every_page(openverse.page, SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings))
    assert len(found) == 5 and len(web.hits_of("/v1/images/")) == 2
    # The same 400 on the first page is no "end of results": the request itself was refused.
    web.dynamic["/v1/images/"] = lambda q: pages["2"]
    with pytest.raises(SourceError, match="HTTP 400") as caught:
        openverse.page(SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings), None)
    assert not caught.value.transient


def test_openverse_empty_page_ends_and_a_changed_format_says_so(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    empty = _json("openverse_page1.json") | {"result_count": 0, "page_count": 0, "results": []}
    web.add("/v1/images/", json.dumps(empty), "application/json")
    settings = crawler_settings.model_copy(update={"openverse_url": web.url("/v1/images/")})
    result = openverse.page(SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings), None)
    assert (result.candidates, result.cursor) == ([], None)
    web.add("/v1/images/", json.dumps({"data": []}), "application/json")
    with pytest.raises(FormatChanged, match=r"openverse: .*the source's format changed"):
        openverse.page(SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings), None)


def test_openverse_429_is_transient_with_the_retry_after_it_sent(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/v1/images/", THROTTLED, "application/json", status=429, headers={"Retry-After": "58"})
    settings = crawler_settings.model_copy(update={"openverse_url": web.url("/v1/images/")})
    started = time.monotonic()
    with pytest.raises(SourceError, match="HTTP 429") as caught:
        openverse.page(SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings), None)
    # Longer than the fetcher's backoff_max (2 s here): not slept in the worker, handed to the stream.
    assert caught.value.transient and caught.value.retry_after == 58.0
    assert time.monotonic() - started < 2.0 and len(web.hits_of("/v1/images/")) == 1


# ============================================================================ Bing


def _bing_tiles(urls: list[str]) -> bytes:
    tiles = "".join(
        f"<li><a class=\"iusc\" m='{json.dumps({'murl': u, 'purl': 'https://example.org/'})}'></a></li>" for u in urls
    )
    return f'<div class="dgControl"><ul class="dgControl_list">{tiles}</ul></div>'.encode()


def test_bing_keeps_only_new_urls_and_ends_when_a_page_repeats_earlier_ones(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    # Tiles written here: the shape of the recorded grid's tiles (a.iusc with its m JSON).
    pages = {
        "1": _bing_tiles(["https://a.test/1.jpg", "https://a.test/2.jpg"]),
        "3": _bing_tiles(["https://a.test/2.jpg", "https://a.test/3.jpg"]),
        "5": _bing_tiles(["https://a.test/1.jpg", "https://a.test/3.jpg"]),  # past ~1,000: old results again
    }
    web.dynamic["/images/async"] = lambda q: Route(pages[q["first"][0]])
    settings = crawler_settings.model_copy(update={"bing_url": web.url("/images/async"), "bing_page_size": 2})
    found = every_page(bing.page, SourceSpec(kind=SourceKind.BING), _ctx(fetcher, settings))
    assert [c.image_url for c in found] == ["https://a.test/1.jpg", "https://a.test/2.jpg", "https://a.test/3.jpg"]
    assert [p["first"] for p in _pages(web, "/images/async")] == [["1"], ["3"], ["5"]]


def test_bing_429_is_transient(web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings) -> None:
    web.add("/images/async", "", status=429, headers={"Retry-After": "120"})
    settings = crawler_settings.model_copy(update={"bing_url": web.url("/images/async")})
    with pytest.raises(SourceError) as caught:
        bing.page(SourceSpec(kind=SourceKind.BING), _ctx(fetcher, settings), None)
    assert caught.value.transient and caught.value.retry_after == 120.0


# ============================================================================ DuckDuckGo


def test_duckduckgo_expired_token_on_a_resumed_stream_is_renewed_and_the_page_asked_again(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/", DDG_SEARCH_PAGE)
    refused = Route(b"If this error persists, please let us know: ops@duckduckgo.com", "text/plain", 403)
    web.add_sequence(
        "/i.js", [refused, Route(json.dumps(_json("duckduckgo_images_page1.json")).encode(), "application/json")]
    )
    settings = crawler_settings.model_copy(update={"duckduckgo_url": web.url("/")})
    saved = json.dumps({"vqd": "4-expired", "next": "i.js?q=minecraft&o=json&p=-1&s=100&u=bing&f=,,,,,&l=us-en"})
    result = duckduckgo.page(SourceSpec(kind=SourceKind.DUCKDUCKGO), _ctx(fetcher, settings, "minecraft"), saved)
    assert len(result.candidates) == 6 and json.loads(result.cursor or "")["vqd"] == DDG_VQD
    first, second = _pages(web, "/i.js")
    assert first["vqd"] == ["4-expired"] and second["vqd"] == [DDG_VQD]
    assert first["s"] == second["s"] == ["100"]  # the same page, from where the stream stopped


def test_duckduckgo_403_with_a_fresh_token_is_a_transient_rate_limit(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/", DDG_SEARCH_PAGE)
    web.add("/i.js", "If this error persists, please let us know: ops@duckduckgo.com", "text/plain", status=403)
    settings = crawler_settings.model_copy(update={"duckduckgo_url": web.url("/")})
    with pytest.raises(SourceError, match="rate-limits") as caught:
        duckduckgo.page(SourceSpec(kind=SourceKind.DUCKDUCKGO), _ctx(fetcher, settings), None)
    assert caught.value.transient


# ============================================================================ Flickr


def _flickr_licences() -> dict[str, tuple[str, str]]:
    root = ET.parse(FIXTURES / "flickr_licenses_getinfo.xml").getroot()
    return {e.attrib["id"]: (e.attrib["name"], e.attrib["url"]) for e in root.iter("license")}


# The table's own names for the two public-domain tools (Flickr writes "Public Domain
# Dedication (CC0)" and "Public Domain Mark"); every other name is Flickr's.
RENAMED = {"9": "CC0 1.0", "10": "Public Domain Mark 1.0"}


@pytest.mark.parametrize("code", [str(i) for i in range(17)])
def test_flickr_licence_id_matches_the_live_api(code: str) -> None:
    name, url = _flickr_licences()[code]
    assert flickr.license_of(code) == (RENAMED.get(code, name), url)


def test_flickr_licence_table_is_the_whole_live_table() -> None:
    assert set(flickr.LICENSES) == set(_flickr_licences()) == {str(i) for i in range(17)}


def test_flickr_service_unavailable_is_transient_and_a_bad_key_is_not() -> None:
    with pytest.raises(SourceError, match="not currently available") as caught:
        flickr.parse_page(_json("flickr_service_unavailable.json"))
    assert caught.value.transient
    with pytest.raises(SourceError, match="Invalid API Key") as caught:
        flickr.parse_page(_json("flickr_invalid_api_key.json"))
    assert not caught.value.transient
    empty = _json("flickr_photos_search.json")
    empty["photos"] |= {"photo": [], "pages": 0, "total": 0}
    assert flickr.parse_page(empty) == ([], 0)


# ============================================================================ in a job


def _job(job_id: str, *sources: SourceSpec) -> Job:
    return Job(id=job_id, spec=JobSpec(query="cat", sources=list(sources), target="cat"))


def _stream_states(state, job: Job, settings: CrawlerSettings):  # type: ignore[no-untyped-def]
    return [state.stream_state(job.id, s.id) for s in pipeline.job_streams(job, settings)]


def _on_host(web: TestWeb, host: str, path: str) -> str:
    """``path`` of the test web under its own host name, so per-host limits tell the services apart."""
    return f"http://{host}:{web.server.server_address[1]}{path}"


def _loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]  # every test host name is the test web (a resolver: no DNS is asked)


def test_a_throttled_stream_waits_out_its_retry_after_and_resumes_from_its_cursor_while_others_go_on(
    web: TestWeb, crawler_settings: CrawlerSettings, state_store, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    throttled = Route(THROTTLED, "application/json", 429, {"Retry-After": "58"})
    page = Route(_openverse_page(3), "application/json")
    web.add_sequence("/v1/images/", [page, throttled, page, page])
    pages = {"1": _bing_tiles(["https://a.test/1.jpg"]), "36": _bing_tiles(["https://a.test/2.jpg"])}
    web.dynamic["/images/async"] = lambda q: Route(pages.get(q["first"][0], b"<div class='dgControl'></div>"))
    settings = crawler_settings.model_copy(
        update={
            "openverse_url": _on_host(web, "api.openverse.test", "/v1/images/"),
            "bing_url": _on_host(web, "www.bing.test", "/images/async"),
        }
    )
    job = _job("job-throttled", SourceSpec(kind=SourceKind.OPENVERSE), SourceSpec(kind=SourceKind.BING))
    state_store.create_job(job)
    with Fetcher(settings, resolver=_loopback) as fetcher:
        pipeline.crawl_step(job, state_store, fetcher, settings)  # page 1 of each
        started = time.monotonic()
        step = pipeline.crawl_step(job, state_store, fetcher, settings)  # openverse page 2: 429
        # Bing's page 2 came at once: Openverse's Retry-After holds back its own host only.
        assert step.paged == 2 and time.monotonic() - started < 5 and not step.discovery_done
    ov, bing_stream = _stream_states(state_store, job, settings)
    assert (ov.cursor, ov.failures, ov.exhausted) == ("2", 1, False) and bing_stream.pages == 2
    assert ov.retry_at == pytest.approx(time.time() + 58, abs=5)
    [note] = state_store.notes(job.id)
    assert note.startswith("source openverse ('cat') failed (transient, 1 of 5 in a row)") and "in 58s" in note
    with Fetcher(settings, resolver=_loopback) as fetcher:  # another worker, as a resumed chain is
        # While it waits, the stream is left alone, and stays open (Bing ends meanwhile).
        step = pipeline.crawl_step(job, state_store, fetcher, settings)
        assert step.wait == pytest.approx(58, abs=5) and not step.discovery_done
        assert len(web.hits_of("/v1/images/")) == 2
        later = time.time() + 60
        monkeypatch.setattr(pipeline.time, "time", lambda: later)
        pipeline.crawl_step(job, state_store, fetcher, settings)
    assert _pages(web, "/v1/images/")[-1]["page"] == ["2"]  # the same page again, not page 3
    ov, _ = _stream_states(state_store, job, settings)
    assert (ov.cursor, ov.failures, ov.retry_at) == ("3", 0, None)


@pytest.mark.parametrize(
    ("route", "update", "why"),
    [
        # A Retry-After longer than the cap: waiting it out is not worth holding the stream.
        (
            Route(THROTTLED, "application/json", 429, {"Retry-After": "3600"}),
            {},
            "it asked to wait 3600s, longer than source_retry_after_max",
        ),
        # Transient again and again: the source is down, not busy.
        (Route(b"", "text/plain", 503), {"source_max_failures": 0, "max_retries": 0}, "1 transient failures in a row"),
        # Refused for good.
        (Route(PAGE_DEPTH, "application/json", 400), {}, "permanent failure"),
    ],
)
def test_a_stream_ends_only_when_waiting_cannot_help_and_the_note_says_why(
    route: Route, update: dict[str, Any], why: str, web: TestWeb, fetcher: Fetcher, crawler_settings, sqlite_state
) -> None:  # type: ignore[no-untyped-def]
    web.add_sequence("/v1/images/", [route])
    settings = crawler_settings.model_copy(update={"openverse_url": web.url("/v1/images/"), **update})
    job = _job("job-ends", SourceSpec(kind=SourceKind.OPENVERSE))
    sqlite_state.create_job(job)
    step = pipeline.crawl_step(job, sqlite_state, fetcher, settings)
    [stream] = _stream_states(sqlite_state, job, settings)
    assert stream.exhausted
    [note] = sqlite_state.notes(job.id)
    assert note.startswith(f"source openverse ('cat') failed and ended ({why}")
    assert pipeline.crawl_step(job, sqlite_state, fetcher, settings).discovery_done and step.paged == 1


def test_flickr_outage_in_a_job_is_retried_from_the_same_page(
    web: TestWeb, fetcher: Fetcher, crawler_settings, sqlite_state, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    unavailable = Route((FIXTURES / "flickr_service_unavailable.json").read_bytes(), "application/json")
    ok = Route(json.dumps(_json("flickr_photos_search.json")).encode(), "application/json")
    web.add_sequence("/services/rest/", [unavailable, ok])
    settings = crawler_settings.model_copy(
        update={"flickr_url": web.url("/services/rest/"), "flickr_api_key": SecretStr("0123456789abcdef")}
    )
    job = _job("job-flickr-outage", SourceSpec(kind=SourceKind.FLICKR))
    sqlite_state.create_job(job)
    pipeline.crawl_step(job, sqlite_state, fetcher, settings)
    [stream] = _stream_states(sqlite_state, job, settings)
    assert stream.failures == 1 and not stream.exhausted and stream.cursor is None
    assert "API error 201" in sqlite_state.notes(job.id)[0] and "transient" in sqlite_state.notes(job.id)[0]
    later = time.time() + settings.source_backoff + 1
    monkeypatch.setattr(pipeline.time, "time", lambda: later)
    step = pipeline.crawl_step(job, sqlite_state, fetcher, settings)
    assert len([c for b in step.batches for c in b]) == 5
    assert [p["page"] for p in _pages(web, "/services/rest/")] == [["1"], ["1"]]
