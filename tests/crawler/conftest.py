from __future__ import annotations

from collections.abc import Iterator

import pytest

from imgsift_common.messages import Candidate, SourceSpec
from imgsift_crawler.fetch import Fetcher
from imgsift_crawler.settings import CrawlerSettings
from imgsift_crawler.sources import PageFn, SourceContext


@pytest.fixture
def crawler_settings() -> CrawlerSettings:
    return CrawlerSettings(
        storage="local",
        total_timeout=5.0,
        read_timeout=2.0,
        connect_timeout=2.0,
        min_side=32,
        network_allowlist=["127.0.0.1/32"],  # the test web; everything else private stays refused
        per_host_interval=0.0,  # politeness is tested on its own (test_politeness.py); fast elsewhere
        openverse_requests_per_minute=0.0,  # its pacing is tested on its own (test_source_failures.py)
        backoff_base=0.01,
        backoff_max=2.0,
    )


@pytest.fixture
def fetcher(crawler_settings: CrawlerSettings) -> Iterator[Fetcher]:
    with Fetcher(crawler_settings) as f:
        yield f


def every_page(page: PageFn, spec: SourceSpec, ctx: SourceContext, max_pages: int = 100) -> list[Candidate]:
    """Page a source from its first page until it says it is exhausted."""
    found: list[Candidate] = []
    cursor = None
    for _ in range(max_pages):
        result = page(spec, ctx, cursor)
        found += result.candidates
        cursor = result.cursor
        if cursor is None:
            return found
    raise AssertionError(f"still paging after {max_pages} pages")
