"""Sources of candidate image URLs: one module per source behind one interface (see base.py).

Adding a source is one module with a ``page`` function plus one line in :data:`SOURCES`.
"""

from __future__ import annotations

from collections.abc import Callable

from imgsift_common.messages import SourceKind, SourceSpec
from imgsift_crawler.sources import bing, duckduckgo, flickr, openverse, site, urls, wikimedia
from imgsift_crawler.sources.base import SourceContext, SourceError, SourcePage

PageFn = Callable[[SourceSpec, SourceContext, str | None], SourcePage]

SOURCES: dict[SourceKind, PageFn] = {
    SourceKind.URLS: urls.page,
    SourceKind.SITE: site.page,
    SourceKind.OPENVERSE: openverse.page,
    SourceKind.WIKIMEDIA: wikimedia.page,
    SourceKind.BING: bing.page,
    SourceKind.DUCKDUCKGO: duckduckgo.page,
    SourceKind.FLICKR: flickr.page,
}

__all__ = ["SOURCES", "SourceContext", "SourceError", "SourcePage"]
