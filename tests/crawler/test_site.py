"""The site crawl: what it takes from a page, how far it goes, and where it refuses to go."""

from __future__ import annotations

import pytest

from imgsift_common.messages import SourceKind, SourceSpec
from imgsift_crawler.fetch import Fetcher
from imgsift_crawler.settings import CrawlerSettings
from imgsift_crawler.sources import SourceContext, SourceError, site, urls
from tests.crawler.conftest import every_page
from tests.support.web import TestWeb

PAGE = """<!doctype html><html><head>
<base href="http://example.test/sub/">
<meta property="og:image" content="/og.jpg">
</head><body>
<img src="a.jpg" alt="first">
<img src="small.jpg" srcset="small.jpg 320w, large.jpg 1280w, medium.jpg 640w">
<img src="data:image/png;base64,AAAA">
<picture><source srcset="pic-1x.webp 1x, pic-2x.webp 2x"><img src="pic.jpg"></picture>
<a href="/files/b.PNG">download</a>
<a href="next.html#frag">next</a>
<a href="mailto:someone@example.test">mail</a>
</body></html>"""


def test_extract_finds_every_kind_of_image_reference() -> None:
    found, links = site.extract(PAGE, "http://example.test/page.html")
    urls_found = {c.image_url for c in found}
    assert urls_found == {
        "http://example.test/og.jpg",
        "http://example.test/sub/a.jpg",
        "http://example.test/sub/large.jpg",
        "http://example.test/sub/small.jpg",
        "http://example.test/sub/pic-2x.webp",
        "http://example.test/sub/pic.jpg",
        "http://example.test/files/b.PNG",
    }
    assert links == ["http://example.test/sub/next.html"]
    by_url = {c.image_url: c for c in found}
    assert by_url["http://example.test/sub/a.jpg"].title == "first"
    assert all(c.page_url == "http://example.test/page.html" and c.source is SourceKind.SITE for c in found)


@pytest.mark.parametrize(
    ("srcset", "expected"),
    [("a.jpg 1x, b.jpg 2x", "b.jpg"), ("a.jpg 800w, b.jpg 400w", "a.jpg"), ("only.jpg", "only.jpg"), ("", None)],
)
def test_parse_srcset_picks_the_largest(srcset: str, expected: str | None) -> None:
    assert site.parse_srcset(srcset) == expected


def _ctx(fetcher: Fetcher, settings: CrawlerSettings) -> SourceContext:
    return SourceContext(fetcher=fetcher, settings=settings)


def test_crawl_respects_depth_and_host(web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings) -> None:
    web.add("/", '<a href="/d1.html">1</a><a href="http://localhost:1/elsewhere.html">x</a><img src="/i0.jpg">')
    web.add("/d1.html", '<a href="/d2.html">2</a><img src="/i1.jpg">')
    web.add("/d2.html", '<img src="/i2.jpg">')
    spec = SourceSpec(kind=SourceKind.SITE, start_urls=[web.url("/")], max_depth=1)
    found = [c.image_url for c in every_page(site.page, spec, _ctx(fetcher, crawler_settings))]
    assert found == [web.url("/i0.jpg"), web.url("/i1.jpg")]
    assert "/d2.html" not in web.requests  # depth 2 is beyond max_depth=1
    deeper = SourceSpec(kind=SourceKind.SITE, start_urls=[web.url("/")], max_depth=2, max_pages=2)
    assert len(every_page(site.page, deeper, _ctx(fetcher, crawler_settings))) == 2  # max_pages stops it


def test_crawl_that_reaches_no_page_is_a_source_error(fetcher: Fetcher, crawler_settings: CrawlerSettings) -> None:
    spec = SourceSpec(kind=SourceKind.SITE, start_urls=["http://127.0.0.1:9/nothing-listens-here"])
    with pytest.raises(SourceError, match="no start page"):
        every_page(site.page, spec, _ctx(fetcher, crawler_settings))


def test_url_list_from_file_skips_blanks_and_comments(tmp_path, fetcher, crawler_settings) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "urls.txt"
    path.write_text("# my list\nhttp://a.test/1.jpg\n\n  http://a.test/2.jpg  \n")
    spec = SourceSpec(kind=SourceKind.URLS, path=str(path), urls=["http://a.test/0.jpg"])
    found = [c.image_url for c in every_page(urls.page, spec, _ctx(fetcher, crawler_settings))]
    assert found == ["http://a.test/0.jpg", "http://a.test/1.jpg", "http://a.test/2.jpg"]
    # A page at a time: two lines per page still reads every URL once.
    small = crawler_settings.model_copy(update={"url_list_page_size": 2})
    assert [c.image_url for c in every_page(urls.page, spec, _ctx(fetcher, small))] == found
    missing = SourceSpec(kind=SourceKind.URLS, path=str(tmp_path / "nope.txt"))
    with pytest.raises(SourceError, match="cannot read"):
        every_page(urls.page, missing, _ctx(fetcher, crawler_settings))
