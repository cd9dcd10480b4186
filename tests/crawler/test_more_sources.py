"""Bing, DuckDuckGo and Flickr: parsers on real recorded responses (see fixtures/SOURCES.md),
pagination against a local server standing in for each engine, clear errors when an engine
answers with something else, and the job going on when one of them fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from imgsift_common.messages import Candidate, Job, JobSpec, SourceKind, SourceSpec
from imgsift_crawler import pipeline
from imgsift_crawler.fetch import Fetcher
from imgsift_crawler.settings import CrawlerSettings
from imgsift_crawler.sources import SOURCES, SourceContext, SourceError, bing, duckduckgo, flickr
from tests.crawler.conftest import every_page
from tests.support.web import Route, TestWeb

FIXTURES = Path(__file__).parent / "fixtures"
BING_PAGE = (FIXTURES / "bing_images_search.html").read_bytes()
DDG_SEARCH_PAGE = (FIXTURES / "duckduckgo_search_vqd.html").read_bytes()
DDG_VQD = "3-320068370671196460038575011587633753929-199869977846294510399902480995708132308"


def _json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _ctx(fetcher: Fetcher, settings: CrawlerSettings, query: str = "golang gopher") -> SourceContext:
    return SourceContext(fetcher=fetcher, settings=settings, query=query)


def _params(web: TestWeb, path: str) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(r).query, keep_blank_values=True) for r in web.requests if urlsplit(r).path == path]


def test_every_new_kind_is_a_registered_keyword_source() -> None:
    from imgsift_common.messages import KEYWORD_SOURCES

    for kind in (SourceKind.BING, SourceKind.DUCKDUCKGO, SourceKind.FLICKR):
        assert kind in KEYWORD_SOURCES and kind in SOURCES
    with pytest.raises(ValueError, match="searches by keyword"):
        JobSpec(sources=[SourceSpec(kind=SourceKind.BING)], target="dog")


# ============================================================================ Bing


def test_bing_page_gives_image_and_page_urls_and_titles_in_rank_order() -> None:
    found = bing.parse_page(BING_PAGE)
    # Six result tiles; the "Related Products" tile between them is not a result.
    assert [c.image_url for c in found] == [
        "https://vectorseek.com/wp-content/uploads/2023/03/Golang-Gopher-Logo-Vector.jpg",
        "https://ih1.redbubble.net/image.2875804682.2853/flat,750x,075,f-pad,750x1000,f8f8f8.jpg",
        "https://gopher.golangmarket.com/cdn/shop/products/blue_angle.jpg?v=1557053976&width=1445",
        "https://i.pinimg.com/originals/61/6d/a6/616da63705b8a1cd58aec985f533fc22.jpg",
        "https://your.merch.google/media/catalog/product/g/g/ggl1923_ggl1923_001_5503.png"
        "?optimize=medium&bg-color=255,255,255&fit=bounds&height=700&width=700&canvas=700:700&format=jpeg",
        "https://ih1.redbubble.net/image.2875804696.2853/bg,f8f8f8-flat,750x,075,f-pad,750x1000,f8f8f8.jpg",
    ]
    first = found[0]
    assert first.page_url == "https://vectorseek.com/vector_logo/golang-gopher-logo-vector/"
    assert first.title == "Golang Gopher Logo PNG (Transparent) SVG AI – Free Download"
    assert first.source is SourceKind.BING
    # Escaped quotes inside the escaped JSON come out as plain quotes.
    assert found[1].title == '"Gopher - Golang Mascot in a black hoodie" Photographic Print for Sale ...'
    # Bing knows no licence or author: none is invented.
    assert all(c.license is None and c.author is None for c in found)


@pytest.mark.parametrize(
    "html",
    [
        # Bing's grid, but its tiles renamed: the markup changed.
        BING_PAGE.replace(b'class="iusc"', b'class="iusc2"'),
        # Something that is not a result page at all (a captcha or consent page).
        b"<html><head><title>Bing</title></head><body><form id='challenge'>Verify you are human</form></body></html>",
    ],
)
def test_bing_page_without_result_tiles_is_a_clear_source_error(html: bytes) -> None:
    with pytest.raises(SourceError, match=r"^bing: .*the source's format changed"):
        bing.parse_page(html)


def test_bing_tiles_whose_json_changed_are_a_clear_source_error() -> None:
    changed = BING_PAGE.replace(b"&quot;murl&quot;", b"&quot;mediaurl&quot;")
    with pytest.raises(
        SourceError, match=r"none with a JSON 'm' attribute holding 'murl'.*the source's format changed"
    ):
        bing.parse_page(changed)


def test_bing_empty_result_grid_means_no_more_results() -> None:
    grid = b'<div class="dg_b"><div id="mmComponent_images_2" class="dgControl dtl hover"></div></div>'
    assert bing.parse_page(grid) == [] and bing.parse_page(b"  ") == []


def test_bing_pages_by_first_offset_and_stops_when_the_page_repeats(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/images/async", BING_PAGE)
    settings = crawler_settings.model_copy(update={"bing_url": web.url("/images/async")})
    spec = SourceSpec(kind=SourceKind.BING)
    first = bing.page(spec, _ctx(fetcher, settings), None)
    assert len(first.candidates) == 6 and first.cursor is not None
    # Bing serves its last page again past the end: nothing new, and the source is done.
    second = bing.page(spec, _ctx(fetcher, settings), first.cursor)
    assert (second.candidates, second.cursor) == ([], None)
    page1, page2 = _params(web, "/images/async")
    assert page1["q"] == ["golang gopher"] and page1["first"] == ["1"] and page1["count"] == ["35"]
    assert page1["mmasync"] == ["1"] and page1["adlt"] == ["strict"]
    assert page2["first"] == ["36"]


def test_bing_unreachable_is_a_source_error(fetcher: Fetcher, crawler_settings: CrawlerSettings) -> None:
    settings = crawler_settings.model_copy(update={"bing_url": "http://127.0.0.1:9/images/async"})
    with pytest.raises(SourceError, match="bing: request to"):
        bing.page(SourceSpec(kind=SourceKind.BING), _ctx(fetcher, settings), None)


# ============================================================================ DuckDuckGo


def test_duckduckgo_vqd_token_is_read_from_the_real_search_page() -> None:
    assert duckduckgo.find_vqd(DDG_SEARCH_PAGE) == DDG_VQD
    # Other spellings seen over the years.
    assert duckduckgo.find_vqd('vqd="4-2233"') == "4-2233"
    assert duckduckgo.find_vqd("/i.js?q=x&vqd=4-11-22&p=1") == "4-11-22"
    assert duckduckgo.find_vqd("<html>no token</html>") is None


def test_duckduckgo_page_gives_image_and_page_urls_titles_and_next() -> None:
    found, following = duckduckgo.parse_page(_json("duckduckgo_images_page1.json"))
    assert len(found) == 6
    first = found[0]
    assert first.image_url == "https://www.gamepur.com/files/images/2019-11/minecraft-earth-how-to-craft-and-smelt.jpg"
    assert first.page_url == "https://www.gamepur.com/guide/44494-minecraft-earth-how-craft-smelt.html"
    assert first.title == "Minecraft Earth - How to Craft and Smelt"
    assert found[3].title == 'Minecraft, "thicc" Steve, and mobs hit Tamriel with this ...'
    assert found[5].title == "Minecraft Unblocked | Free | UnblockedGames7766 \U0001f60b"
    assert all(c.source is SourceKind.DUCKDUCKGO and c.license is None for c in found)
    assert following == "i.js?q=minecraft&o=json&p=-1&s=100&u=bing&f=,,,,,&l=us-en"
    assert duckduckgo.parse_page(_json("duckduckgo_images_no_results.json"))[0] == []


@pytest.mark.parametrize("body", [{"error": "blocked"}, [], {"results": None}])
def test_duckduckgo_format_change_is_a_clear_source_error(body: object) -> None:
    with pytest.raises(SourceError, match=r"duckduckgo: .*the source's format changed"):
        duckduckgo.parse_page(body)


def _ddg_web(web: TestWeb) -> None:
    web.add("/", DDG_SEARCH_PAGE)
    pages = {
        "0": json.dumps(_json("duckduckgo_images_page1.json")),
        "100": json.dumps(_json("duckduckgo_images_no_results.json")),
    }
    web.dynamic["/i.js"] = lambda q: Route(pages[q.get("s", ["0"])[0]].encode(), "application/json")


def test_duckduckgo_pages_with_the_token_and_next(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    _ddg_web(web)
    settings = crawler_settings.model_copy(update={"duckduckgo_url": web.url("/")})
    spec = SourceSpec(kind=SourceKind.DUCKDUCKGO)
    first = duckduckgo.page(spec, _ctx(fetcher, settings, "minecraft"), None)
    assert len(first.candidates) == 6
    assert json.loads(first.cursor or "") == {"vqd": DDG_VQD, "next": _json("duckduckgo_images_page1.json")["next"]}
    # The cursor carries the token: the next page, even in another process, needs no search page.
    second = duckduckgo.page(spec, _ctx(fetcher, settings, "minecraft"), first.cursor)
    assert (second.candidates, second.cursor) == ([], None)
    assert [urlsplit(r).path for r in web.requests] == ["/", "/i.js", "/i.js"]
    [search] = _params(web, "/")
    assert search["q"] == ["minecraft"]
    page1, page2 = _params(web, "/i.js")
    assert page1 == {"l": ["us-en"], "o": ["json"], "q": ["minecraft"], "vqd": [DDG_VQD], "f": [",,,"], "p": ["1"]}
    assert page2["s"] == ["100"] and page2["vqd"] == [DDG_VQD] and page2["q"] == ["minecraft"]
    assert page2["u"] == ["bing"] and page2["l"] == ["us-en"]


def test_duckduckgo_page_without_token_is_a_clear_source_error(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/", "<html><head><title>DuckDuckGo</title></head><body>Unexpected error.</body></html>")
    settings = crawler_settings.model_copy(update={"duckduckgo_url": web.url("/")})
    with pytest.raises(SourceError, match="duckduckgo: no vqd token"):
        duckduckgo.page(SourceSpec(kind=SourceKind.DUCKDUCKGO), _ctx(fetcher, settings), None)
    assert not _params(web, "/i.js")


def test_duckduckgo_refused_page_is_a_source_error(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    web.add("/", DDG_SEARCH_PAGE)
    web.add("/i.js", "If this error persists, please let us know: ops@duckduckgo.com", "text/plain", status=403)
    settings = crawler_settings.model_copy(update={"duckduckgo_url": web.url("/")})
    with pytest.raises(SourceError, match=r"duckduckgo: request to .*/i.js failed \(http_error: HTTP 403\)"):
        duckduckgo.page(SourceSpec(kind=SourceKind.DUCKDUCKGO), _ctx(fetcher, settings), None)


# ============================================================================ Flickr


def test_flickr_page_gives_largest_url_photo_page_licence_and_author() -> None:
    found, pages = flickr.parse_page(_json("flickr_photos_search.json"))
    assert pages == 1 and len(found) == 5
    first = found[0]
    assert first.image_url == "https://live.staticflickr.com/65535/49514337848_bbdbb5f761_b.jpg"  # url_l
    assert first.page_url == "https://www.flickr.com/photos/7478087@N06/49514337848"
    assert first.title == "Warsy (église) • 7433"
    assert first.author == "markustrois"
    assert (first.license, first.license_url) == (
        "CC BY-NC-SA 2.0",
        "https://creativecommons.org/licenses/by-nc-sa/2.0/",
    )
    assert first.source is SourceKind.FLICKR
    # A photo whose largest size is 500 px has no url_l: its url_m is taken.
    assert found[3].image_url == "https://live.staticflickr.com/65535/49514301123_11ff9b347b.jpg"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (4, ("CC BY 2.0", "https://creativecommons.org/licenses/by/2.0/")),  # a number, as JSON may give it
        ("99", ("Flickr licence 99", None)),  # a licence added after this table: kept, not dropped
        ("", (None, None)),
    ],
)
def test_flickr_licence_ids(code: object, expected: tuple[str | None, str | None]) -> None:
    assert flickr.license_of(code) == expected


def test_flickr_invalid_key_is_a_source_error_that_says_which_variable() -> None:
    with pytest.raises(SourceError, match=r"flickr: API error 100: Invalid API Key.*IMGSIFT_CRAWLER_FLICKR_API_KEY"):
        flickr.parse_page(_json("flickr_invalid_api_key.json"))


@pytest.mark.parametrize("body", [{"stat": "ok"}, [], {"photos": {"photo": "x"}, "stat": "ok"}])
def test_flickr_format_change_is_a_clear_source_error(body: object) -> None:
    with pytest.raises(SourceError, match=r"flickr: .*the source's format changed"):
        flickr.parse_page(body)


def test_flickr_without_a_key_says_which_variable_to_set(fetcher: Fetcher, crawler_settings: CrawlerSettings) -> None:
    with pytest.raises(SourceError, match="flickr: no API key; set IMGSIFT_CRAWLER_FLICKR_API_KEY"):
        flickr.page(SourceSpec(kind=SourceKind.FLICKR), _ctx(fetcher, crawler_settings), None)


def test_flickr_pages_by_number_with_the_key_and_extras(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    recorded = _json("flickr_photos_search.json")
    recorded["photos"]["pages"] = 2  # the recording has one page; here the API reports two
    web.add("/services/rest/", json.dumps(recorded), "application/json")
    settings = crawler_settings.model_copy(
        update={
            "flickr_url": web.url("/services/rest/"),
            "flickr_api_key": SecretStr("0123456789abcdef"),
            "flickr_page_size": 5,
            "flickr_licenses": "4,5,9,10",
        }
    )
    found = every_page(flickr.page, SourceSpec(kind=SourceKind.FLICKR), _ctx(fetcher, settings, "church"))
    assert len(found) == 10
    page1, page2 = _params(web, "/services/rest/")
    assert [page1["page"], page2["page"]] == [["1"], ["2"]]
    assert page1["method"] == ["flickr.photos.search"] and page1["api_key"] == ["0123456789abcdef"]
    assert page1["text"] == ["church"] and page1["per_page"] == ["5"] and page1["license"] == ["4,5,9,10"]
    assert page1["format"] == ["json"] and page1["nojsoncallback"] == ["1"]
    assert {"license", "owner_name", "url_o", "url_l", "url_m"} <= set(page1["extras"][0].split(","))


def test_flickr_errors_never_show_the_key(
    monkeypatch: pytest.MonkeyPatch, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    def failing(ctx: SourceContext, url: str, params: dict[str, Any], source: str, headers: Any = None) -> Any:
        raise SourceError(f"flickr: request to {url}?api_key={params['api_key']} failed (timeout)")

    monkeypatch.setattr(flickr, "get_json", failing)
    settings = crawler_settings.model_copy(update={"flickr_api_key": SecretStr("s3cr3t-key")})
    with pytest.raises(SourceError) as caught:
        flickr.page(SourceSpec(kind=SourceKind.FLICKR), _ctx(fetcher, settings), None)
    assert "s3cr3t-key" not in str(caught.value) and "api_key=***" in str(caught.value)


# ============================================================================ in a job


def _discover(job: Job, state, fetcher: Fetcher, settings: CrawlerSettings) -> list[Candidate]:  # type: ignore[no-untyped-def]
    """Discovery steps until discovery is done; the candidates it handed out, in order."""
    state.create_job(job)
    leased: list[Candidate] = []
    for _ in range(50):
        step = pipeline.crawl_step(job, state, fetcher, settings)
        leased += [c for batch in step.batches for c in batch]
        if step.discovery_done:
            return leased
    raise AssertionError("discovery never finished")


def test_per_source_limit_caps_a_search_engine(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings, sqlite_state
) -> None:  # type: ignore[no-untyped-def]
    web.add("/images/async", BING_PAGE)
    settings = crawler_settings.model_copy(update={"bing_url": web.url("/images/async")})
    job = Job(
        id="job-bing-limit",
        spec=JobSpec(query="golang gopher", sources=[SourceSpec(kind=SourceKind.BING, limit=4)], target="dog"),
    )
    leased = _discover(job, sqlite_state, fetcher, settings)
    assert [c.image_url for c in leased] == [c.image_url for c in bing.parse_page(BING_PAGE)[:4]]
    assert len(_params(web, "/images/async")) == 1  # the limit is reached on page one: no page two


def test_failing_engines_are_noted_and_the_others_go_on(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings, sqlite_state
) -> None:  # type: ignore[no-untyped-def]
    _ddg_web(web)
    web.add("/images/async", "<html><head><title>Bing</title></head><body>Verify you are human</body></html>")
    settings = crawler_settings.model_copy(
        update={"duckduckgo_url": web.url("/"), "bing_url": web.url("/images/async"), "flickr_api_key": None}
    )
    job = Job(
        id="job-engines",
        spec=JobSpec(
            query="minecraft",
            sources=[
                SourceSpec(kind=SourceKind.FLICKR),
                SourceSpec(kind=SourceKind.BING),
                SourceSpec(kind=SourceKind.DUCKDUCKGO),
            ],
            target="dog",
        ),
    )
    leased = _discover(job, sqlite_state, fetcher, settings)
    assert [c.image_url for c in leased] == [r["image"] for r in _json("duckduckgo_images_page1.json")["results"]]
    assert all(c.source is SourceKind.DUCKDUCKGO for c in leased)
    notes = sqlite_state.notes(job.id)
    assert any("flickr ('minecraft') failed" in n and "IMGSIFT_CRAWLER_FLICKR_API_KEY" in n for n in notes)
    assert any("bing ('minecraft') failed" in n and "the source's format changed" in n for n in notes)
