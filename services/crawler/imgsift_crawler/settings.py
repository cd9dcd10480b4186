"""Crawler settings, read from IMGSIFT_CRAWLER_* (plus the shared IMGSIFT_* fields)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from imgsift_common.settings import ImgsiftSettings


class CrawlerSettings(ImgsiftSettings):
    model_config = SettingsConfigDict(env_prefix="IMGSIFT_CRAWLER_", extra="ignore", populate_by_name=True)

    user_agent: str = Field(
        "imgsift/0.1 (+https://github.com/imgsift/imgsift)", description="User-Agent sent with every request"
    )
    contact: str | None = Field(
        None,
        description="contact (mail or URL) appended to the User-Agent so site owners can reach you; the wikimedia "
        "source requires it (give the API the same value)",
    )
    connect_timeout: float = Field(10.0, description="seconds to open a connection")
    read_timeout: float = Field(20.0, description="seconds between two received chunks")
    total_timeout: float = Field(60.0, description="seconds for a whole download, however fast bytes trickle in")
    max_redirects: int = Field(5, description="redirects followed per request")
    max_image_bytes: int = Field(20 * 1024 * 1024, description="bytes an image may have; enforced while streaming")
    max_page_bytes: int = Field(5 * 1024 * 1024, description="bytes an HTML page or API response may have")
    max_pixels: int = Field(
        64_000_000, description="pixels an image may decode to (guards against decompression bombs)"
    )
    min_side: int = Field(32, description="pixels the shorter side of an image must have")
    max_frames: int = Field(1000, ge=1, description="frames an animated image (GIF, WebP) may have")
    download_concurrency: int = Field(8, description="downloads in flight inside one download task")
    download_batch_size: int = Field(16, description="candidate URLs per download task")
    near_dup_distance: int = Field(
        6, description="perceptual-hash bits within which two images are near-duplicates; -1 turns it off"
    )
    related_terms: str | None = Field(
        None, description="JSON file of related terms and translations to widen queries (default: built in)"
    )
    frontier_window: int = Field(512, description="candidate URLs leased to download tasks at once, per job")
    lease_seconds: float = Field(600.0, description="seconds before a leased URL without an outcome is sent again")
    step_interval: float = Field(2.0, description="seconds between two discovery steps of a job that waits")
    webhook_backoff: float = Field(2.0, description="seconds before the first webhook retry; doubled each time")
    stall_seconds: float = Field(
        120.0,
        description="seconds without detect or Siamese progress after which unfinished images and crops are "
        "handed to those stages again (a worker killed between recording and handing on)",
    )
    url_list_page_size: int = Field(1000, description="URLs read from a URL list per discovery step")
    site_pages_per_step: int = Field(10, description="pages a site crawl fetches per discovery step")
    openverse_url: str = Field("https://api.openverse.org/v1/images/", description="Openverse image search endpoint")
    openverse_page_size: int = Field(
        20, ge=1, le=20, description="results per Openverse page (20 is the anonymous maximum; more answers 401)"
    )
    openverse_max_pages: int = Field(
        20, ge=1, description="last Openverse page asked for (its MAX_PAGINATION_DEPTH: page 21 answers 400)"
    )
    openverse_requests_per_minute: float = Field(
        20.0,
        ge=0.0,
        description="requests a minute to Openverse, across all workers (its anonymous rate limit); 0: no pacing",
    )
    wikimedia_url: str = Field(
        "https://commons.wikimedia.org/w/api.php", description="MediaWiki API of Wikimedia Commons"
    )
    wikimedia_page_size: int = Field(50, description="files per Wikimedia Commons search page")
    bing_url: str = Field("https://www.bing.com/images/async", description="Bing image search (HTML results) endpoint")
    bing_page_size: int = Field(35, ge=1, le=150, description="results asked of Bing per page (its own pages hold 35)")
    bing_safe_search: str = Field("strict", description="Bing adult filter: strict, moderate or off")
    bing_market: str = Field("en-US", description="Bing market and UI language (its _EDGE_CD/_EDGE_S cookies)")
    duckduckgo_url: str = Field(
        "https://duckduckgo.com/", description="DuckDuckGo: the search page (for the vqd token) and i.js beside it"
    )
    duckduckgo_region: str = Field("us-en", description="DuckDuckGo region (l= and kl=), e.g. us-en, de-de, wt-wt")
    duckduckgo_safe_search: int = Field(1, description="DuckDuckGo safe search (p=): 1 strict, -1 moderate, -2 off")
    flickr_url: str = Field("https://api.flickr.com/services/rest/", description="Flickr REST API endpoint")
    flickr_api_key: SecretStr | None = Field(
        None,
        description="Flickr API key for the flickr source (https://www.flickr.com/services/apps/create/); "
        "without it the flickr source fails and says so",
    )
    flickr_page_size: int = Field(100, ge=1, le=500, description="photos per Flickr search page (500 at most)")
    flickr_licenses: str | None = Field(
        None,
        description="Flickr licence ids to search, comma-separated (e.g. 4,5,9,10 for CC BY, CC BY-SA, CC0, PDM); "
        "empty: every licence",
    )
    # Request profiles of the scraped search engines (docs/crawler.md, "Request profiles").
    browser_user_agent: str = Field(
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        description="User-Agent of the browser-like profile Bing and DuckDuckGo get (as searxng and ddgs send); "
        "every other request carries IMGSIFT_CRAWLER_USER_AGENT",
    )
    accept_language: str = Field(
        "en-US,en;q=0.9", description="Accept-Language of the browser-like profile (Bing, DuckDuckGo)"
    )
    # Source streams: transient failures and the services' rate limits (docs/crawler.md).
    source_max_failures: int = Field(
        5, ge=0, description="transient failures in a row after which a source stream ends (each one noted)"
    )
    source_backoff: float = Field(
        30.0, ge=0.0, description="seconds before a failed source stream is tried again; doubled each failure"
    )
    source_retry_after_max: float = Field(
        900.0,
        ge=0.0,
        description="longest Retry-After (or backoff) a source stream waits for; a longer one ends the stream",
    )
    # Network safety and politeness (docs/crawler.md).
    network_allowlist: list[str] = Field(
        default_factory=list,
        description="networks (10.0.0.0/8, 127.0.0.1/32) or host names the crawler may reach although they are "
        'private; JSON list, e.g. ["127.0.0.1/32"]. Empty: only public addresses (cloud metadata: never)',
    )
    per_host_concurrency: int = Field(2, ge=1, description="requests in flight to one host, across all workers")
    per_host_interval: float = Field(
        0.25, ge=0.0, description="seconds between two requests to one host (robots.txt Crawl-delay raises it)"
    )
    host_wait_timeout: float = Field(
        300.0, gt=0.0, description="seconds a request may wait for its host's turn before it fails as timeout"
    )
    max_retries: int = Field(3, ge=0, description="retries of a request answered 429, 408 or 5xx, or not connected")
    backoff_base: float = Field(0.5, ge=0.0, description="seconds of the first retry's backoff (doubled each retry)")
    backoff_max: float = Field(
        30.0, ge=0.0, description="longest wait before a retry; a longer Retry-After fails the request"
    )
    robots_ttl: float = Field(86400.0, ge=0.0, description="seconds a host's robots.txt is cached (RFC 9309: 24 h)")
    robots_error_ttl: float = Field(
        600.0, ge=0.0, description="seconds a host whose robots.txt fails (5xx, unreachable) is left alone"
    )
    robots_max_bytes: int = Field(512 * 1024, description="bytes of a robots.txt that are read (the rest is ignored)")

    @field_validator("network_allowlist")
    @classmethod
    def _allowlist_entries(cls, entries: list[str]) -> list[str]:
        from imgsift_crawler.net.safety import parse_allowlist_entry

        for entry in entries:
            parse_allowlist_entry(entry)  # raises with what a valid entry looks like
        return entries

    @property
    def robots_token(self) -> str:
        """The product token robots.txt groups and X-Robots-Tag scopes are matched against."""
        return self.user_agent.split("/", 1)[0].split()[0].lower()

    @property
    def full_user_agent(self) -> str:
        return f"{self.user_agent} contact: {self.contact}" if self.contact else self.user_agent
