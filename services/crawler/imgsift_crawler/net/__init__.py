"""The crawler's network rules, each in its own module and testable alone.

- :mod:`.safety`: which addresses the crawler may connect to, checked after DNS resolution;
- :mod:`.pinning`: an httpx transport that connects only to the address that was checked;
- :mod:`.robots`: robots.txt (cached per origin) and ``X-Robots-Tag`` / ``<meta name=robots>`` opt-outs;
- :mod:`.limits`: per-host concurrency and request spacing, in one process or across workers via Redis;
- :mod:`.retry`: backoff with full jitter and ``Retry-After``.

:class:`imgsift_crawler.fetch.Fetcher` puts them together; nothing else in the crawler
opens a connection.
"""
