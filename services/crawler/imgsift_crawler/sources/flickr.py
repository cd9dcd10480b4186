"""Flickr photo search (``flickr.photos.search``) with the operator's API key.

``GET /services/rest/?method=flickr.photos.search&api_key=...&text=...&format=json
&nojsoncallback=1&extras=license,owner_name,url_o,...&page=N&per_page=M`` returns
``{"photos": {"page", "pages", "perpage", "total", "photo": [...]}, "stat": "ok"}``; each
photo has ``id``, ``owner``, ``title``, and the extras asked for: ``license`` (an id, see
:data:`LICENSES`), ``ownername`` and one ``url_<size>`` per size the photo has. A failure
is HTTP 200 with ``{"stat": "fail", "code": 100, "message": "Invalid API Key (...)"}``.
Some failures are transient: code 201 (and, seen by the Flickr Foundation's own client, code
0) with "Sorry, the Flickr API service is not currently available.", and 105 "Service
currently unavailable"; the pipeline tries those again later from the same page.

The key comes from ``IMGSIFT_CRAWLER_FLICKR_API_KEY``, never from the job, so it is never
stored with a job nor shown in its status; error messages have it masked.
"""

from __future__ import annotations

from typing import Any

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.sources import profiles
from imgsift_crawler.sources.base import FormatChanged, SourceContext, SourceError, SourcePage, get_json, query_of

# flickr.photos.licenses.getInfo as the live API answered it on 2025-06-19, after Flickr added
# the CC 4.0 licences (11-16): tests/crawler/fixtures/flickr_licenses_getinfo.xml, SOURCES.md.
# id -> (short name, URL). Names are Flickr's, except 9 and 10, written as CC names them.
LICENSES: dict[str, tuple[str, str | None]] = {
    "0": (
        "All Rights Reserved",
        "https://www.flickrhelp.com/hc/en-us/articles/10710266545556-Using-Flickr-images-shared-by-other-members",
    ),
    "1": ("CC BY-NC-SA 2.0", "https://creativecommons.org/licenses/by-nc-sa/2.0/"),
    "2": ("CC BY-NC 2.0", "https://creativecommons.org/licenses/by-nc/2.0/"),
    "3": ("CC BY-NC-ND 2.0", "https://creativecommons.org/licenses/by-nc-nd/2.0/"),
    "4": ("CC BY 2.0", "https://creativecommons.org/licenses/by/2.0/"),
    "5": ("CC BY-SA 2.0", "https://creativecommons.org/licenses/by-sa/2.0/"),
    "6": ("CC BY-ND 2.0", "https://creativecommons.org/licenses/by-nd/2.0/"),
    "7": ("No known copyright restrictions", "https://www.flickr.com/commons/usage/"),
    "8": ("United States Government Work", "https://www.usa.gov/government-copyright"),
    "9": ("CC0 1.0", "https://creativecommons.org/publicdomain/zero/1.0/"),
    "10": ("Public Domain Mark 1.0", "https://creativecommons.org/publicdomain/mark/1.0/"),
    "11": ("CC BY 4.0", "https://creativecommons.org/licenses/by/4.0/"),
    "12": ("CC BY-SA 4.0", "https://creativecommons.org/licenses/by-sa/4.0/"),
    "13": ("CC BY-ND 4.0", "https://creativecommons.org/licenses/by-nd/4.0/"),
    "14": ("CC BY-NC 4.0", "https://creativecommons.org/licenses/by-nc/4.0/"),
    "15": ("CC BY-NC-SA 4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/"),
    "16": ("CC BY-NC-ND 4.0", "https://creativecommons.org/licenses/by-nc-nd/4.0/"),
}

# Error codes Flickr answers for an outage rather than a bad request (its API docs: 105
# "Service currently unavailable"; flickr-photos-api's retrying.py: 201 and 0, "Sorry, the
# Flickr API service is not currently available.").
TRANSIENT_CODES = frozenset({"0", "105", "201"})
UNAVAILABLE = "not currently available"

# Largest first: original, 2048, 1600, 1024, 800, 640, 500 px on the long side.
SIZES = ("url_o", "url_k", "url_h", "url_l", "url_c", "url_z", "url_m")
EXTRAS = ",".join(("license", "owner_name", *SIZES))
# flickr.photos.search returns at most this many distinct results for one query.
MAX_RESULTS = 4000


def license_of(code: Any) -> tuple[str | None, str | None]:
    if code is None or str(code) == "":
        return None, None
    return LICENSES.get(str(code), (f"Flickr licence {code}", None))


def parse_page(data: Any) -> tuple[list[Candidate], int | None]:
    """Candidates of one response page, and the number of pages Flickr reports."""
    if not isinstance(data, dict):
        raise FormatChanged("flickr: response is not a JSON object; the source's format changed")
    if data.get("stat") == "fail":
        code, message = str(data.get("code")), str(data.get("message"))
        hint = "; check IMGSIFT_CRAWLER_FLICKR_API_KEY" if code == "100" else ""
        transient = code in TRANSIENT_CODES or UNAVAILABLE in message
        raise SourceError(f"flickr: API error {code}: {message}{hint}", transient=transient)
    photos = data.get("photos")
    if data.get("stat") != "ok" or not isinstance(photos, dict) or not isinstance(photos.get("photo"), list):
        raise FormatChanged("flickr: response has no 'photos.photo' list; the source's format changed")
    out = []
    for photo in photos["photo"]:
        if not isinstance(photo, dict):
            continue
        url = next((photo[size] for size in SIZES if isinstance(photo.get(size), str) and photo[size]), None)
        if not url:
            continue  # the photo offers none of the sizes asked for (a video, or sizes restricted)
        name, license_url = license_of(photo.get("license"))
        owner, photo_id = photo.get("owner"), photo.get("id")
        out.append(
            Candidate(
                image_url=url,
                page_url=f"https://www.flickr.com/photos/{owner}/{photo_id}" if owner and photo_id else None,
                source=SourceKind.FLICKR,
                title=str(photo.get("title") or "").strip() or None,
                license=name,
                license_url=license_url,
                author=str(photo.get("ownername") or "").strip() or None,
            )
        )
    pages: Any = photos.get("pages")  # JSON: a number, a numeric string, or missing
    try:
        return out, int(pages)
    except (TypeError, ValueError):
        return out, None


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    settings = ctx.settings
    if settings.flickr_api_key is None or not settings.flickr_api_key.get_secret_value():
        raise SourceError(
            "flickr: no API key; set IMGSIFT_CRAWLER_FLICKR_API_KEY "
            "(get one at https://www.flickr.com/services/apps/create/)"
        )
    key = settings.flickr_api_key.get_secret_value()
    number = int(cursor) if cursor else 1
    params: dict[str, str | int] = {
        "method": "flickr.photos.search",
        "api_key": key,
        "text": query_of(ctx, "flickr"),
        "extras": EXTRAS,
        "media": "photos",
        "content_type": 1,  # photos only, no screenshots or drawings
        "safe_search": 1,
        "sort": "relevance",
        "page": number,
        "per_page": settings.flickr_page_size,
        "format": "json",
        "nojsoncallback": 1,
    }
    if settings.flickr_licenses:
        params["license"] = settings.flickr_licenses
    try:
        found, pages = parse_page(get_json(ctx, settings.flickr_url, params, "flickr", profiles.identified(settings)))
    except SourceError as exc:
        masked = type(exc)(str(exc).replace(key, "***"), transient=exc.transient, retry_after=exc.retry_after)
        raise masked from exc.__cause__
    last = pages is not None and number >= pages
    if not found or last or number * settings.flickr_page_size >= MAX_RESULTS:
        return SourcePage(found, None)
    return SourcePage(found, str(number + 1))
