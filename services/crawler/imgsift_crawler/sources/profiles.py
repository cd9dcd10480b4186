"""Request profiles: the headers each source sends, in one place (docs/crawler.md, "Request profiles").

Two kinds:

- **identified**: the crawler's own User-Agent (``IMGSIFT_CRAWLER_USER_AGENT`` plus
  ``contact: IMGSIFT_CRAWLER_CONTACT``). Open APIs (Openverse, Flickr, Wikimedia Commons) and
  every page and image the crawler downloads get it, so their operators know who asks.
  Wikimedia answers 403 to a User-Agent without contact details, so it requires the contact.
- **browser**: the scraped result pages of Bing and DuckDuckGo, which have no API and serve
  a cut-down or refused answer to an unknown agent. Every maintained scraper of both sends a
  browser's request: searxng (``searx/engines/bing_images.py`` with its market cookies,
  ``duckduckgo_extra.py``) and the ``ddgs`` package (``ddgs/engines/duckduckgo_images.py``:
  ``Referer: https://duckduckgo.com/`` and ``Sec-Fetch-Mode: cors`` on ``i.js``, the fix of its
  June 2025 "403 Ratelimit", deedy5/ddgs#309). The profile copies that: a browser
  User-Agent, ``Accept-Language``, and the fetch metadata a browser sends for that request.

A profile only changes what a request says: it still goes through the Fetcher's address
checks, limits and byte caps, and the images found are fetched under the identified profile
and robots.txt.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from imgsift_crawler.settings import CrawlerSettings


def identified(settings: CrawlerSettings) -> dict[str, str]:
    """The crawler's own name and contact: for open APIs, which ask clients to identify themselves."""
    return {"User-Agent": settings.full_user_agent}


def browser(settings: CrawlerSettings, *, navigate: bool) -> dict[str, str]:
    """What a browser sends for a page it navigates to (``navigate``) or for a script's request from it."""
    headers = {"User-Agent": settings.browser_user_agent, "Accept-Language": settings.accept_language}
    if navigate:
        headers |= {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document", "Sec-Fetch-Site": "none"}
    else:
        headers |= {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty", "Sec-Fetch-Site": "same-origin"}
    return headers


def site_root(url: str) -> str:
    """``https://duckduckgo.com/`` from any URL of that site: the Referer a same-site request carries."""
    split = urlsplit(url)
    return f"{split.scheme}://{split.netloc}/"


def bing(settings: CrawlerSettings) -> dict[str, str]:
    """Bing's grid as its own page loads it: a browser, with the market searxng sets in cookies."""
    market = settings.bing_market.lower()
    language = market.split("-", 1)[0]
    return browser(settings, navigate=False) | {
        "Referer": site_root(settings.bing_url) + "images/search",
        # searxng's set_bing_cookies: market (m/mkt) and UI language (u/ui).
        "Cookie": f"_EDGE_CD=m={market}&u={language}; _EDGE_S=mkt={market}&ui={language}",
    }


def duckduckgo_page(settings: CrawlerSettings) -> dict[str, str]:
    """DuckDuckGo's search page (where the vqd token is): a browser navigating to it."""
    return browser(settings, navigate=True)


def duckduckgo_images(settings: CrawlerSettings) -> dict[str, str]:
    """DuckDuckGo's ``i.js``: the results page's own script request (ddgs: Referer and Sec-Fetch-Mode: cors)."""
    return browser(settings, navigate=False) | {"Referer": site_root(settings.duckduckgo_url)}


def wikimedia(settings: CrawlerSettings) -> dict[str, str]:
    """Wikimedia's User-Agent policy: the client's name and a way to reach its operator."""
    return identified(settings)
