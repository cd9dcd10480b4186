"""The site crawl: what it takes from a page, how far it goes, and where it refuses to go."""

from __future__ import annotations

from pathlib import Path

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


# ============================================================================ real page markup

SITE_FIXTURES = Path(__file__).parent / "fixtures" / "site"


def _fixture(name: str) -> str:
    return (SITE_FIXTURES / name).read_text()


KINJA = "https://i.kinja-img.com/gawker-media/image/upload/c_fill,f_auto,fl_progressive,g_center,"


def test_lazy_srcset_with_commas_in_cdn_urls_and_twitter_image_on_a_real_kinja_page() -> None:
    found, _ = site.extract(_fixture("kinja_lazy_srcset.html"), "https://lifehacker.com/")
    urls_found = [c.image_url for c in found]
    # og:image and twitter:image name the same picture; each lazy <img> gives its largest data-srcset URL.
    assert urls_found == [
        KINJA + "h_675,pg_1,q_80,w_1200/18zu12g5xzyxojpg.jpg",
        KINJA + "h_264,q_80,w_470/ecojdjwftxntdhnbgdu0.jpg",
        KINJA + "h_264,q_80,w_470/m282rxfjd2sdgpvusqco.jpg",
        KINJA + "h_264,q_80,w_470/gpf2pi3edjf1zumpctbg.jpg",
    ]
    # The 1x1 GIF placeholder in src is never a candidate.
    assert not any(u.startswith("data:") for u in urls_found)
    assert found[1].title == (
        "Trump Shocked to Learn 3M Selling Masks Overseas After He Failed to Invoke Defense Production Act"
    )


def test_picture_sources_with_lazy_data_srcset_on_a_real_citylab_page() -> None:
    found, _ = site.extract(_fixture("citylab_picture_lazy.html"), "https://www.citylab.com/x/")
    urls_found = {c.image_url for c in found}
    cdn = "https://cdn.citylab.com/media/img/citylab/2019/04/"
    assert {
        cdn + "mr1/facebook.jpg?1556645448",  # og:image and twitter:image
        cdn + "mr1/940.jpg?mod=1556645448",  # <picture><source srcset>
        cdn + "mr1/lead_large.jpg?mod=1556645448",
        cdn + "mr1/300.jpg?mod=1556645448",  # <img srcset> without src
        cdn + "RTS28UAK/thumb.jpg?mod=1556565008",  # <source data-srcset>
        cdn + "RTS28UAK/144x144.jpg?mod=1556565008",  # <img data-srcset> (lazysizes)
    } == urls_found


def test_inline_background_images_on_a_real_cnet_page() -> None:
    found, _ = site.extract(_fixture("cnet_inline_background.html"), "https://www.cnet.com/news/x/")
    assert [c.image_url for c in found] == [
        "https://images.taboola.com/taboola/image/fetch/f_jpg%2Cq_auto%2Ch_255%2Cw_340%2Cc_fill%2Cg_faces:auto"
        "%2Ce_sharpen/http%3A//dailylifetech.com/banners/trackr/v2dt/3.jpg",
        "https://images.taboola.com/taboola/image/fetch/f_jpg%2Cq_auto%2Ch_255%2Cw_340%2Cc_fill%2Cg_faces:auto"
        "%2Ce_sharpen/http%3A//dailylifetech.com/banners/lumify/v1dt/5.jpg",
        "https://images.taboola.com/taboola/image/fetch/f_jpg%2Cq_auto%2Ch_255%2Cw_340%2Cc_fill%2Cg_faces:auto"
        "%2Ce_sharpen/http%3A//cdn.taboolasyndication.com/libtrc/static/thumbnails/"
        "9bd19f7534f9917dea78978e5989cdd0.png",
    ]


@pytest.mark.parametrize(
    ("srcset", "expected"),
    [
        # The HTML standard: a URL runs to whitespace, so commas inside it stay.
        (
            "https://cdn.test/w_320,c_fill/a.jpg 320w, https://cdn.test/w_900,c_fill/a.jpg 900w",
            [
                ("https://cdn.test/w_320,c_fill/a.jpg", 320.0, None),
                ("https://cdn.test/w_900,c_fill/a.jpg", 900.0, None),
            ],
        ),
        # A URL with a trailing comma has no descriptor; a comma with no space after it is in the URL.
        ("a.jpg, b.jpg 2x", [("a.jpg", None, None), ("b.jpg", None, 2.0)]),
        ("a.jpg,b.jpg 2x", [("a.jpg,b.jpg", None, 2.0)]),
        ("a.jpg 1x,b.jpg 2x", [("a.jpg", None, 1.0), ("b.jpg", None, 2.0)]),
        # Invalid descriptors drop their candidate, as browsers do; a height hint is allowed.
        ("bad.jpg 2q, also-bad.jpg 100w 2x, ok.jpg 100w 50h", [("ok.jpg", 100.0, None)]),
        # Parentheses keep their commas (a future descriptor syntax) and fail as unknown.
        ("odd.jpg (a, b), fine.jpg 1.5x", [("fine.jpg", None, 1.5)]),
        ("", []),
    ],
)
def test_srcset_is_parsed_by_the_html_standard(
    srcset: str, expected: list[tuple[str, float | None, float | None]]
) -> None:
    assert site.srcset_candidates(srcset) == expected


def test_same_site_stylesheets_are_read_for_background_images_once(
    web: TestWeb, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    css = "/sites/default/files/advagg_css/site.css"
    web.add(css, _fixture("aclu_style.css"), "text/css")
    other = "http://localhost:1/elsewhere.css"  # another host: never fetched
    page = f'<html><head><link rel="stylesheet" href="{css}"><link rel="stylesheet" href="{other}"></head></html>'
    web.add("/", page + '<a href="/two.html">2</a>')
    web.add("/two.html", page)
    spec = SourceSpec(kind=SourceKind.SITE, start_urls=[web.url("/")], max_depth=1)
    found = [c.image_url for c in every_page(site.page, spec, _ctx(fetcher, crawler_settings))]
    # Resolved against the stylesheet's own URL (../images/...); data: URIs skipped.
    assert web.url("/sites/default/files/images/sprites/icons-s48fdd0f329.png") in found
    assert web.url("/sites/default/files/images/logos/logo-large.png?1512413232") in found
    assert len(found) == len(set(found)) == 11
    assert len(web.hits_of(css)) == 1  # read once for both pages


def test_a_start_url_that_redirects_to_www_is_the_same_site(web: TestWeb, crawler_settings: CrawlerSettings) -> None:
    port = web.server.server_address[1]
    web.add("/", "", status=301, headers={"Location": f"http://www.example.test:{port}/home.html"})
    web.add("/home.html", '<img src="/a.jpg"><a href="/gallery.html">gallery</a>')
    web.add("/gallery.html", '<img src="/b.jpg">')
    spec = SourceSpec(kind=SourceKind.SITE, start_urls=[f"http://example.test:{port}/"], max_depth=2)
    with Fetcher(crawler_settings, resolver=lambda host, p: ["127.0.0.1"]) as fetcher:
        found = [c.image_url for c in every_page(site.page, spec, _ctx(fetcher, crawler_settings))]
    assert found == [f"http://www.example.test:{port}/a.jpg", f"http://www.example.test:{port}/b.jpg"]
    assert site.site_of("https://www.Example.test/x") == site.site_of("http://example.test/y") == "example.test"
