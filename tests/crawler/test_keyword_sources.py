"""Openverse and Wikimedia Commons parsers on real recorded responses (see fixtures/SOURCES.md),
and their pagination against a local server standing in for the API."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from imgsift_common.messages import SourceKind, SourceSpec
from imgsift_crawler.fetch import Fetcher
from imgsift_crawler.settings import CrawlerSettings
from imgsift_crawler.sources import SourceContext, SourceError, openverse, wikimedia
from tests.support.web import TestWeb

FIXTURES = Path(__file__).parent / "fixtures"


def _load(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((FIXTURES / name).read_text())


def test_openverse_page_gives_urls_licences_authors_and_landing_pages() -> None:
    found, page_count = openverse.parse_page(_load("openverse_page1.json"))
    assert page_count == 12
    assert len(found) == 5
    first = found[0]
    assert first.image_url == "https://live.staticflickr.com/8280/8711378816_39cc228e5c_b.jpg"
    assert first.page_url == "https://www.flickr.com/photos/21644167@N04/8711378816"
    assert (first.license, first.license_url) == ("CC BY 2.0", "https://creativecommons.org/licenses/by/2.0/")
    assert first.author == "Bahman Farzad" and first.title == "CAT"
    assert first.source is SourceKind.OPENVERSE
    assert "Public Domain Mark 1.0" in {c.license for c in found}


@pytest.mark.parametrize("body", [{"detail": "throttled"}, [], {"results": "nope"}])
def test_openverse_format_change_is_a_clear_source_error(body: object) -> None:
    with pytest.raises(SourceError, match="openverse"):
        openverse.parse_page(body)


def test_wikimedia_search_page_orders_by_rank_and_continues() -> None:
    found, cont = wikimedia.parse_page(_load("wikimedia_search.json"))
    data = _load("wikimedia_search.json")["query"]["pages"]
    ranked = sorted(data.values(), key=lambda p: p["index"])
    assert [c.image_url for c in found] == [p["imageinfo"][0]["url"] for p in ranked]
    assert [c.page_url for c in found] == [p["imageinfo"][0]["descriptionurl"] for p in ranked]
    assert cont == {"gsroffset": "40", "continue": "gsroffset||"}


def test_wikimedia_extmetadata_gives_licence_and_plain_text_author() -> None:
    [found], cont = wikimedia.parse_page(_load("wikimedia_file_extmetadata.json"))
    assert cont is None
    assert found.license == "CC BY 2.0 fr"
    assert found.license_url == "https://creativecommons.org/licenses/by/2.0/fr/deed.en"
    assert found.author == "Dimitri “Diti” Torterat"  # the HTML link reduced to its text
    assert found.title == "Tired 20-year-old cat"
    assert found.image_url == "https://upload.wikimedia.org/wikipedia/commons/3/32/Tired_20-year-old_cat.jpg"


def test_wikimedia_api_error_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="badvalue"):
        wikimedia.parse_page({"error": {"code": "badvalue", "info": "Unrecognized value"}})


def _ctx(fetcher: Fetcher, settings: CrawlerSettings, query: str = "cat") -> SourceContext:
    return SourceContext(fetcher=fetcher, settings=settings, query=query)


def _params(web: TestWeb, path: str) -> list[dict[str, list[str]]]:
    return [parse_qs(urlsplit(r).query) for r in web.requests if r.startswith(path)]


def test_openverse_pages_by_number(web: TestWeb, fetcher: Fetcher, crawler_settings) -> None:  # type: ignore[no-untyped-def]
    web.add("/v1/images/", json.dumps(_load("openverse_page1.json")), "application/json")
    settings = crawler_settings.model_copy(update={"openverse_url": web.url("/v1/images/")})
    spec = SourceSpec(kind=SourceKind.OPENVERSE)
    first = openverse.page(spec, _ctx(fetcher, settings), None)
    second = openverse.page(spec, _ctx(fetcher, settings), first.cursor)
    assert len(first.candidates) == len(second.candidates) == 5
    assert (first.cursor, second.cursor) == ("2", "3")
    assert openverse.page(spec, _ctx(fetcher, settings), "12").cursor is None  # page_count is 12
    params = _params(web, "/v1/images/")
    assert [p["page"] for p in params] == [["1"], ["2"], ["12"]]
    assert params[0]["q"] == ["cat"] and params[0]["page_size"] == ["20"]


def test_wikimedia_sends_continue_parameters(web: TestWeb, fetcher: Fetcher, crawler_settings) -> None:  # type: ignore[no-untyped-def]
    web.add("/w/api.php", json.dumps(_load("wikimedia_search.json")), "application/json")
    settings = crawler_settings.model_copy(
        update={"wikimedia_url": web.url("/w/api.php"), "contact": "ops@example.org"}
    )
    spec = SourceSpec(kind=SourceKind.WIKIMEDIA)
    first = wikimedia.page(spec, _ctx(fetcher, settings, "tabby cat"), None)
    second = wikimedia.page(spec, _ctx(fetcher, settings, "tabby cat"), first.cursor)
    assert len(first.candidates) == len(second.candidates) == 3
    first_params, second_params = _params(web, "/w/api.php")
    assert "gsroffset" not in first_params and second_params["gsroffset"] == ["40"]
    assert first_params["gsrsearch"] == ["filetype:bitmap tabby cat"] and first_params["gsrnamespace"] == ["6"]
    assert "extmetadata" in first_params["iiprop"][0]


def test_unreachable_api_or_no_query_is_a_source_error(fetcher: Fetcher, crawler_settings) -> None:  # type: ignore[no-untyped-def]
    settings = crawler_settings.model_copy(update={"openverse_url": "http://127.0.0.1:9/v1/images/"})
    with pytest.raises(SourceError, match="openverse: request"):
        openverse.page(SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings), None)
    with pytest.raises(SourceError, match="no query"):
        openverse.page(SourceSpec(kind=SourceKind.OPENVERSE), _ctx(fetcher, settings, ""), None)
