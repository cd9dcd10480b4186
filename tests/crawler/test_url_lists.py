"""URL lists in CSV, TSV and Parquet: columns become provenance, and paging a page at a
time reads every row exactly once, wherever the page boundaries fall."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.fetch import Fetcher
from imgsift_crawler.settings import CrawlerSettings
from imgsift_crawler.sources import SourceContext, SourceError, urls
from tests.crawler.conftest import every_page

ROWS = [
    {
        "url": f"http://img.test/{i}.jpg",
        "page_url": f"http://site.test/post/{i}",
        "title": f"photo {i}",
        "license": "CC BY 4.0" if i % 2 else "",
        "author": f"author {i}",
    }
    for i in range(7)
]
# Quoting that a naive line reader would get wrong: a comma and a line break inside fields.
ROWS[2]["title"] = 'a "tabby", on\ntwo lines'


def _ctx(fetcher: Fetcher, settings: CrawlerSettings, page_size: int) -> SourceContext:
    return SourceContext(fetcher=fetcher, settings=settings.model_copy(update={"url_list_page_size": page_size}))


def _expected(rows: list[dict[str, str]] = ROWS) -> list[Candidate]:
    return [
        Candidate(source=SourceKind.URLS, image_url=r["url"], **{k: v for k, v in r.items() if k != "url" and v})
        for r in rows
    ]


def _write_delimited(path: Path, rows: list[dict[str, str]], delimiter: str, fields: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, delimiter=delimiter, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("page_size", [1, 2, 3, 100])
def test_csv_columns_become_provenance_and_every_row_is_read_once(
    tmp_path: Path, fetcher: Fetcher, crawler_settings: CrawlerSettings, page_size: int
) -> None:
    path = tmp_path / "list.csv"
    _write_delimited(path, ROWS, ",", ["title", "url", "page_url", "license", "author"])
    found = every_page(
        urls.page, SourceSpec(kind=SourceKind.URLS, path=str(path)), _ctx(fetcher, crawler_settings, page_size)
    )
    assert found == _expected()


def test_tsv_with_image_url_and_caption_columns(
    tmp_path: Path, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    path = tmp_path / "list.tsv"
    path.write_text(
        "caption\timage_url\tlicence\na cat\thttp://img.test/cat.jpg\tCC0\n\na dog\thttp://img.test/dog.jpg\t\n"
    )
    found = every_page(urls.page, SourceSpec(kind=SourceKind.URLS, path=str(path)), _ctx(fetcher, crawler_settings, 1))
    assert [(c.image_url, c.title, c.license) for c in found] == [
        ("http://img.test/cat.jpg", "a cat", "CC0"),
        ("http://img.test/dog.jpg", "a dog", None),
    ]


def test_csv_without_header_or_known_columns_uses_the_first_column(
    tmp_path: Path, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    headerless = tmp_path / "plain.csv"
    headerless.write_text("http://img.test/a.jpg,first\nhttp://img.test/b.jpg,second\n")
    unknown = tmp_path / "named.csv"
    unknown.write_text("link,note\nhttp://img.test/c.jpg,x\n")
    for path, expected in ((headerless, ["a", "b"]), (unknown, ["c"])):
        spec = SourceSpec(kind=SourceKind.URLS, path=str(path))
        found = every_page(urls.page, spec, _ctx(fetcher, crawler_settings, 1))
        assert [c.image_url for c in found] == [f"http://img.test/{n}.jpg" for n in expected]


def test_inline_urls_come_first_then_the_file(
    tmp_path: Path, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    path = tmp_path / "list.csv"
    _write_delimited(path, ROWS[:2], ",", ["url"])
    spec = SourceSpec(kind=SourceKind.URLS, path=str(path), urls=["http://img.test/inline.jpg"])
    found = every_page(urls.page, spec, _ctx(fetcher, crawler_settings, 1))
    assert [c.image_url for c in found] == ["http://img.test/inline.jpg", ROWS[0]["url"], ROWS[1]["url"]]


def _write_parquet(path: Path, rows: list[dict[str, str]], row_group_size: int) -> None:
    table = pa.table(
        {
            "url": [r["url"] for r in rows],
            "width": list(range(len(rows))),  # a column the source does not read
            "title": [r["title"] for r in rows],
            "page_url": [r["page_url"] for r in rows],
            "license": [r["license"] or None for r in rows],
            "author": [r["author"] for r in rows],
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.mark.parametrize(("row_group_size", "page_size"), [(3, 2), (3, 4), (2, 100), (100, 1)])
def test_parquet_pages_across_row_groups_without_losing_or_repeating_a_row(
    tmp_path: Path, fetcher: Fetcher, crawler_settings: CrawlerSettings, row_group_size: int, page_size: int
) -> None:
    path = tmp_path / "list.parquet"
    _write_parquet(path, ROWS, row_group_size)
    found = every_page(
        urls.page, SourceSpec(kind=SourceKind.URLS, path=str(path)), _ctx(fetcher, crawler_settings, page_size)
    )
    assert found == _expected()


def test_parquet_cursor_resumes_in_a_fresh_process(
    tmp_path: Path, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    path = tmp_path / "list.parquet"
    _write_parquet(path, ROWS, 3)
    spec = SourceSpec(kind=SourceKind.URLS, path=str(path))
    ctx = _ctx(fetcher, crawler_settings, 4)
    first = urls.page(spec, ctx, None)
    assert json.loads(first.cursor or "") == {"inline": 0, "offset": 0, "group": 1, "row": 1}
    urls._row_group.cache_clear()  # what another worker process starts with
    second = urls.page(spec, ctx, first.cursor)
    assert first.candidates + second.candidates == _expected() and second.cursor is None


def test_parquet_without_a_text_url_column_is_a_source_error(
    tmp_path: Path, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"id": [1, 2]}), path)
    with pytest.raises(SourceError, match="no text column of image URLs"):
        urls.page(SourceSpec(kind=SourceKind.URLS, path=str(path)), _ctx(fetcher, crawler_settings, 10), None)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        urls.page(SourceSpec(kind=SourceKind.URLS, path=str(broken)), _ctx(fetcher, crawler_settings, 10), None)


def test_unknown_extension_is_a_source_error(
    tmp_path: Path, fetcher: Fetcher, crawler_settings: CrawlerSettings
) -> None:
    path = tmp_path / "list.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(SourceError, match=r"unknown list format '\.xlsx'.*use \.txt.*\.csv, \.tsv or \.parquet"):
        urls.page(SourceSpec(kind=SourceKind.URLS, path=str(path)), _ctx(fetcher, crawler_settings, 10), None)
