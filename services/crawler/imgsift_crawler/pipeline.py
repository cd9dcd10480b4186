"""The crawler's stage functions, free of Celery: one discovery step, and a download batch.

Discovery is a series of small steps over state kept in the job store, so any worker can
take the next step and a killed one loses nothing:

- a job's sources are *streams*: a source with one query (keyword sources get the job's
  query first, then widened queries); each stream's cursor is saved after its page's URLs
  are in the frontier;
- the *frontier* holds every discovered URL that has no outcome yet; URLs are leased to
  download tasks and leased again when a lease runs out without an outcome (a killed
  worker), so no queued URL is lost;
- each URL's outcome is recorded once, so nothing stored is downloaded again.

"Give me N" (``want_accepted``) is the same loop with another reason to stop: a step pages
further only while the accepted crops, plus what the work in flight is expected to yield,
fall short of N.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from imgsift_common import keys
from imgsift_common.leases import Renewal
from imgsift_common.messages import (
    KEYWORD_SOURCES,
    Candidate,
    DiscoveryReason,
    DownloadOutcome,
    DownloadRecord,
    FailureReason,
    Job,
    SourceSpec,
    StoredImage,
    utcnow,
)
from imgsift_common.sqlstate import StateStore
from imgsift_common.state import BatchLocks, Counter, DownloadItem, Flag, StreamState, discovery_reason
from imgsift_common.storage import ObjectStore, put_json
from imgsift_crawler.dedup import query_for
from imgsift_crawler.fetch import Fetcher, FetchError, Purpose
from imgsift_crawler.related import load_terms, widened_queries
from imgsift_crawler.settings import CrawlerSettings
from imgsift_crawler.sources import SOURCES, SourceContext, SourceError
from imgsift_crawler.validate import ImageRejected, inspect_image

log = logging.getLogger(__name__)

# ============================================================================ streams


@dataclass(frozen=True)
class Stream:
    """One source with one query: the unit that is paged and whose cursor is saved."""

    spec: SourceSpec
    query: str | None
    tier: int  # 0: the job's own queries; 1, 2...: widened queries, tried in order

    @property
    def id(self) -> str:
        return hashlib.sha256(f"{self.spec.source_id}|{self.query or ''}".encode()).hexdigest()[:16]


def job_streams(job: Job, settings: CrawlerSettings) -> list[Stream]:
    """Every stream of the job, in the order they are tried."""
    spec = job.spec
    widen = spec.want_accepted is not None or spec.related_queries is not None or bool(spec.languages)
    extra = (
        widened_queries(
            spec.query, spec.target, spec.related_queries, spec.languages, load_terms(settings.related_terms)
        )
        if widen
        else []
    )
    streams = []
    for source in spec.sources:
        if source.kind in KEYWORD_SOURCES:
            streams.append(Stream(source, source.query or spec.query, 0))
            # A source with its own query keeps it; the others widen with the job.
            if not source.query:
                streams += [Stream(source, q, tier) for tier, q in enumerate(extra, start=1)]
        else:
            streams.append(Stream(source, None, 0))
    return sorted(streams, key=lambda s: s.tier)


# ============================================================================ one discovery step


@dataclass
class Step:
    """What one discovery step did and what the caller should do next."""

    batches: list[list[Candidate]] = field(default_factory=list)  # candidates to hand to downloads
    paged: int = 0  # source pages fetched
    wait: float | None = None  # seconds until a stream that waits out a failure may be asked again
    discovery_done: bool = False
    reason: DiscoveryReason | None = None
    frontier: int = 0  # URLs without an outcome yet, leased or not

    @property
    def finished(self) -> bool:
        """Discovery is over and every URL it found has an outcome: nothing left to supervise."""
        return self.discovery_done and self.frontier == 0


def crawl_step(job: Job, state: StateStore, fetcher: Fetcher, settings: CrawlerSettings) -> Step:
    """Advance discovery by at most one page per open stream, then lease out frontier URLs."""
    step = Step()
    if Flag.DISCOVERY_DONE not in state.flags(job.id):
        reason = _stop_reason(job, state)
        if reason is None and _wants_more(job, state, settings):
            step.paged, open_streams, step.wait = _advance(job, state, fetcher, settings)
            if open_streams == 0:
                reason = DiscoveryReason.SOURCES_EXHAUSTED
        if reason is not None:
            _finish_discovery(job, state, reason)
    step.discovery_done = Flag.DISCOVERY_DONE in state.flags(job.id)
    step.reason = discovery_reason(state.flags(job.id))
    leased = state.lease_candidates(job.id, settings.frontier_window, settings.lease_seconds)
    size = max(1, settings.download_batch_size)
    step.batches = [leased[i : i + size] for i in range(0, len(leased), size)]
    step.frontier = state.frontier_size(job.id)
    return step


def _stop_reason(job: Job, state: StateStore) -> DiscoveryReason | None:
    if state.counters(job.id).get(Counter.DOWNLOADED, 0) >= job.spec.limits.max_images:
        return DiscoveryReason.LIMIT_REACHED
    want = job.spec.want_accepted
    if want is not None and state.count_below(job.id, [job.spec.threshold])[0] >= want:
        return DiscoveryReason.TARGET_REACHED
    return None


def _wants_more(job: Job, state: StateStore, settings: CrawlerSettings) -> bool:
    """Whether to fetch more pages now, or let the work in flight come through first."""
    frontier = state.frontier_size(job.id)
    if frontier >= settings.frontier_window:
        return False
    want = job.spec.want_accepted
    if want is None:
        return True
    c = state.counters(job.id)
    accepted = state.count_below(job.id, [job.spec.threshold])[0]
    # Yields measured so far, optimistic (1) before there is anything to measure.
    per_image = accepted / c[Counter.DETECTED] if c.get(Counter.DETECTED) else 1.0
    per_crop = accepted / c[Counter.COMPARED] if c.get(Counter.COMPARED) else 1.0
    images_in_flight = frontier + max(0, c.get(Counter.DOWNLOADED, 0) - c.get(Counter.DETECTED, 0))
    crops_in_flight = max(0, c.get(Counter.CROPS, 0) - c.get(Counter.COMPARED, 0) - c.get(Counter.COMPARE_FAILED, 0))
    return accepted + per_image * images_in_flight + per_crop * crops_in_flight < want


def _advance(job: Job, state: StateStore, fetcher: Fetcher, settings: CrawlerSettings) -> tuple[int, int, float | None]:
    """Fetch one page of every open stream in the first tier that has one.

    Returns the pages fetched, the open streams (0: every source is exhausted), and the
    seconds until the first stream that waits out a transient failure may be asked again.
    A waiting stream stays open (its tier is not left for widened queries) and holds back
    nothing else: the other streams, and every other host, go on meanwhile.
    """
    open_streams: list[tuple[Stream, StreamState]] = []
    for stream in job_streams(job, settings):
        current = state.stream_state(job.id, stream.id) or StreamState()
        if current.exhausted:
            continue
        if open_streams and stream.tier != open_streams[0][0].tier:
            break
        open_streams.append((stream, current))
    now = time.time()
    paged = 0
    waits = []
    for stream, current in open_streams:
        if current.retry_at is not None and current.retry_at > now:
            waits.append(current.retry_at - now)
            continue
        _page(job, stream, current, state, fetcher, settings)
        paged += 1
    return paged, len(open_streams), min(waits) if waits else None


def _page(
    job: Job, stream: Stream, current: StreamState, state: StateStore, fetcher: Fetcher, settings: CrawlerSettings
) -> None:
    limit = min(stream.spec.limit or job.spec.limits.per_source, job.spec.limits.per_source)
    ctx = SourceContext(fetcher=fetcher, settings=settings, query=stream.query)
    name = stream.spec.kind.value + (f" ({stream.query!r})" if stream.query else "")
    try:
        page = SOURCES[stream.spec.kind](stream.spec, ctx, current.cursor)
    except SourceError as exc:
        _failed(job, stream, current, state, settings, name, exc)
        return
    distinct = list({c.image_url: c for c in page.candidates}.values())[: max(0, limit - current.taken)]
    new = state.enqueue_candidates(job.id, distinct)
    taken = current.taken + len(distinct)
    # The page's URLs are in the frontier before the cursor moves past them: a crash in
    # between fetches the page again, and the frontier drops what it already has.
    state.save_stream_state(
        job.id,
        stream.id,
        StreamState(
            cursor=page.cursor,
            pages=current.pages + 1,
            taken=taken,
            exhausted=page.cursor is None or taken >= limit,
        ),
    )
    log.info(
        "source page",
        extra={"job_id": job.id, "stage": "crawl", "source": name, "found": len(page.candidates), "new": len(new)},
    )


def _failed(
    job: Job,
    stream: Stream,
    current: StreamState,
    state: StateStore,
    settings: CrawlerSettings,
    name: str,
    exc: SourceError,
) -> None:
    """A source page failed: wait and try the same cursor again if it may pass later, else end the stream.

    The job's notes say which it was and why: a transient failure (429, 5xx, an outage, an
    expired token) with the wait, or the end of the stream (a permanent failure, too many
    transient ones in a row, or a Retry-After longer than ``source_retry_after_max``).
    """
    failures = current.failures + 1
    backoff = min(settings.source_backoff * 2 ** (failures - 1), settings.source_retry_after_max)
    wait = exc.retry_after if exc.retry_after is not None else backoff
    if exc.transient and failures <= settings.source_max_failures and wait <= settings.source_retry_after_max:
        note = (
            f"source {name} failed (transient, {failures} of {settings.source_max_failures} in a row): {exc}; "
            f"asked again in {wait:.0f}s from where it stopped"
        )
        update = {"failures": failures, "retry_at": time.time() + wait, "error": str(exc)}
    else:
        if not exc.transient:
            why = "permanent failure"
        elif failures > settings.source_max_failures:
            why = f"{failures} transient failures in a row"
        else:
            why = (
                f"it asked to wait {wait:.0f}s, longer than source_retry_after_max {settings.source_retry_after_max:g}s"
            )
        note = f"source {name} failed and ended ({why}): {exc}"
        update = {"failures": failures, "retry_at": None, "exhausted": True, "error": str(exc)}
    log.warning(
        "source failed",
        extra={
            "job_id": job.id,
            "stage": "crawl",
            "source": name,
            "transient": exc.transient,
            "ended": "exhausted" in update,
        },
    )
    state.add_note(job.id, note)
    state.save_stream_state(job.id, stream.id, current.model_copy(update=update))


def _finish_discovery(job: Job, state: StateStore, reason: DiscoveryReason) -> None:
    """Stop discovering; when the job has enough, what is still queued is recorded as skipped."""
    if reason in (DiscoveryReason.TARGET_REACHED, DiscoveryReason.LIMIT_REACHED):
        why = FailureReason.TARGET_REACHED if reason is DiscoveryReason.TARGET_REACHED else FailureReason.LIMIT_REACHED
        while left := state.lease_candidates(job.id, 1000, 0.0):
            for candidate in left:
                record = DownloadRecord(url=candidate.image_url, outcome=DownloadOutcome.SKIPPED, reason=why)
                state.record_downloads(job.id, [DownloadItem(record)], job.spec.limits.max_images)
    state.set_flag(job.id, Flag.DISCOVERY_REASON + reason.value)
    state.set_flag(job.id, Flag.DISCOVERY_DONE)
    log.info("discovery done", extra={"job_id": job.id, "stage": "crawl", "reason": reason.value})


# ============================================================================ supervision

WATCH_MARKER = "progress-watch"


def stalled_work(
    job: Job, state: StateStore, stall_seconds: float, now: float | None = None
) -> tuple[list[str], list[str]] | None:
    """Work to hand on again when the detect and Siamese stages have stopped moving.

    A worker killed after recording its results but before sending the next stage's message
    (or a message lost with a broker) leaves images that nobody detects and crops that nobody
    compares; the frontier cannot see them, because their URLs have outcomes. The discovery
    chain calls this while a job with an empty frontier is not complete: once the counters
    have not moved for ``stall_seconds``, it returns the stored images not yet detected and
    the crops not yet scored, and starts a new watch period. Stages are idempotent, so
    sending work that was only slow costs time, never a duplicate.
    """
    now = time.time() if now is None else now
    c = state.counters(job.id)
    signature = ",".join(
        str(c.get(n, 0)) for n in (Counter.DETECTED, Counter.CROPS, Counter.COMPARED, Counter.COMPARE_FAILED)
    )
    previous = state.get_marker(job.id, WATCH_MARKER)
    seen, _, since = (previous or "").partition("|")
    if seen != signature or not since:
        state.set_marker(job.id, WATCH_MARKER, f"{signature}|{now}")
        return None
    if now - float(since) < stall_seconds:
        return None
    state.set_marker(job.id, WATCH_MARKER, f"{signature}|{now}")
    images, crops = state.unfinished_work(job.id)
    if images or crops:
        log.warning(
            "stages stalled; handing unfinished work on again",
            extra={"job_id": job.id, "stage": "crawl", "images": len(images), "crops": len(crops)},
        )
    return images, crops


# ============================================================================ downloads


def freeze_imported() -> None:
    """Take what a worker process holds before it starts downloading (imported modules, settings,
    clients) out of the garbage collector's sight; called once, before a prefork worker forks.

    Otherwise each full collection in a download process walks those objects again, some hundred
    and fifty thousand of them, while a batch allocates enough to run such a collection every few
    hundred images (0.3-0.4 ms of CPU per image), and every walk writes to the objects' headers,
    copying the pages a forked child shares with its parent. What is garbage now is collected first.
    """
    gc.collect()
    gc.freeze()


def fetch_and_store(
    job: Job, candidate: Candidate, store: ObjectStore, state: StateStore, settings: CrawlerSettings, fetcher: Fetcher
) -> tuple[DownloadRecord, StoredImage | None]:
    """Download one candidate, decide by decoding whether it is an image, store it.

    ``state`` is not read: whether a stored image is new for the job is decided when its
    record is made (``record_downloads``), after which :func:`settle` keeps or removes it.
    """
    url = candidate.image_url
    try:
        fetched = fetcher.get(url, purpose=Purpose.IMAGE)
    except FetchError as exc:
        return DownloadRecord(url=url, outcome=DownloadOutcome.FAILED, reason=exc.reason, detail=exc.detail), None
    return store_image(job, candidate, fetched.content, store, settings)


def store_image(
    job: Job, candidate: Candidate, content: bytes, store: ObjectStore, settings: CrawlerSettings
) -> tuple[DownloadRecord, StoredImage | None]:
    """Decide by decoding whether ``content`` is an image, and store its bytes if it is.

    The bytes of a download, or of a local file (``imgsift verify``): the same checks either way.
    Returns the record to make (``record_download``) and the stored image, if any; once the
    record is made, :func:`settle` writes the image's provenance, or removes the bytes of an
    image the record did not keep (a duplicate, over the limit).
    """
    url = candidate.image_url
    try:
        info = inspect_image(
            content,
            max_pixels=settings.max_pixels,
            min_side=settings.min_side,
            phash=True,
            max_frames=settings.max_frames,
        )
    except ImageRejected as exc:
        return DownloadRecord(url=url, outcome=DownloadOutcome.FAILED, reason=exc.reason, detail=exc.detail), None
    key = keys.image_key(job.id, info.sha256, info.format)
    record = DownloadRecord(url=url, outcome=DownloadOutcome.STORED, sha256=info.sha256, image_key=key)
    image = StoredImage(
        job_id=job.id,
        key=key,
        sha256=info.sha256,
        width=info.width,
        height=info.height,
        format=info.format,
        bytes=len(content),
        fetched_at=utcnow(),
        provenance=candidate,
        phash=f"{info.phash:016x}" if info.phash is not None else None,
    )
    # Object first, record second: a crash in between leaves an object that the redelivered
    # task overwrites with the same bytes, never a record without its object. The key is the
    # content's hash, so the bytes of an exact duplicate land on its kept copy's object,
    # byte for byte the same.
    store.put(key, content, f"image/{info.format.lower()}")
    return record, image


def settle(job: Job, state: StateStore, store: ObjectStore, image: StoredImage, final: DownloadRecord) -> bool:
    """After the record of a stored image: write its provenance if it was kept, or remove its
    object if the record did not keep it; whether it was kept.

    The provenance (``image_meta_key``) is written by the URL whose record kept the image
    only, so a duplicate never overwrites its kept copy's provenance; a crash before it is
    written is mended when the URL is handed out again (:func:`download_batch` writes it again
    for a URL recorded before).
    """
    if final.outcome is DownloadOutcome.STORED and final.image_key == image.key:
        put_json(store, keys.image_meta_key(job.id, image.sha256), image.model_dump(mode="json"))
        return True
    _drop_unrecorded(job, state, store, image)
    return False


def fetch_claim(url: str) -> str:
    """The name of the lock a task holds while it fetches ``url`` (one fetch of a URL at a time)."""
    return "fetch:" + hashlib.sha256(url.encode()).hexdigest()[:32]


class FetchClaims:
    """The fetch claims one download task holds, renewed in the background while it works.

    A claim lives ``ttl`` seconds (the lease time), so a killed worker's claims run out and its
    URLs are fetched by the next task. A live task renews its claims every third of that, so a
    fetch that outlasts the lease (a long wait for the host's turn, a slow server) keeps its
    URL: without renewal a second task holding the same URL (its lease ran out) would claim it
    and fetch it again. A batch's claims are taken, renewed and freed together: in one round
    trip where the store can (:class:`~imgsift_common.state.BatchLocks`), else one by one.
    """

    def __init__(self, state: StateStore, job_id: str, owner: str, ttl: float) -> None:
        self.state, self.job_id, self.owner, self.ttl = state, job_id, owner, ttl
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._renewal = Renewal(self._renew, ttl / 3, "fetch-claims")

    def take(self, urls: list[str]) -> list[bool]:
        """Claim each URL for this task (again, if it held it before); False: another live task holds it."""
        claims = [fetch_claim(url) for url in urls]
        held = self._hold(claims)
        with self._lock:
            self._held.update(claim for claim, ok in zip(claims, held, strict=True) if ok)
        return held

    def release(self, urls: list[str]) -> None:
        claims = [fetch_claim(url) for url in urls]
        with self._lock:  # not while a renewal runs, which would take the claims back
            self._held.difference_update(claims)
            self._free(claims)

    def __enter__(self) -> FetchClaims:
        self._renewal.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._renewal.stop()
        with self._lock:
            try:  # claims of URLs not recorded (the batch failed): free them now
                self._free(sorted(self._held))
            except Exception:  # the state store is down: the claims run out with the lease
                log.warning("fetch claims not released", extra={"job_id": self.job_id}, exc_info=True)
            self._held.clear()

    def _hold(self, claims: list[str]) -> list[bool]:
        if isinstance(self.state, BatchLocks):
            return self.state.hold_locks(self.job_id, claims, self.owner, self.ttl)
        return [self.state.hold_lock(self.job_id, claim, self.owner, self.ttl) for claim in claims]

    def _free(self, claims: list[str]) -> None:
        if not claims:
            return
        if isinstance(self.state, BatchLocks):
            self.state.release_locks(self.job_id, claims, self.owner)
            return
        for claim in claims:
            self.state.release_lock(self.job_id, claim, self.owner)

    def _renew(self) -> None:
        with self._lock:
            claims = sorted(self._held)
            try:
                held = self._hold(claims)
            except Exception:  # the state store is down: the fetches fail on their own; try again
                log.warning("fetch claims not renewed", extra={"job_id": self.job_id}, exc_info=True)
                return
            for claim, ok in zip(claims, held, strict=True):
                if not ok:
                    log.warning("fetch claim lost", extra={"job_id": self.job_id, "claim": claim})


def download_batch(
    job: Job,
    candidates: list[Candidate],
    store: ObjectStore,
    state: StateStore,
    settings: CrawlerSettings,
    fetcher: Fetcher,
    owner: str | None = None,
) -> list[StoredImage]:
    """Handle a batch of candidates; return the stored images the detector should see.

    ``owner`` names who holds the URLs' fetch claims: the task's id, so that its retries and
    redeliveries hold them too (None: this call alone).

    Images of URLs recorded before (by an earlier, interrupted delivery of this batch, or by
    another task) are returned again, so a detect message that may have been lost is sent
    again (the detector is idempotent). The state is asked per batch, not per URL: one claim
    of the batch's URLs, one read of their records (under the claims), one read of the
    counters, the fetches, one write of the outcomes, one release of the claims.
    """
    stored: list[StoredImage] = []
    claims = FetchClaims(state, job.id, owner or uuid.uuid4().hex, settings.lease_seconds)
    near_distance = job.spec.dedup.near_distance
    near_distance = settings.near_dup_distance if near_distance is None else near_distance
    with claims, ThreadPoolExecutor(max_workers=max(1, settings.download_concurrency)) as pool:
        # A lease that ran out while this batch waited its turn (a busy worker, a long queue)
        # hands a URL to a second task; the fetch claim lets only one of them fetch at a time
        # (a URL another live task holds is left to it: it records it). A killed worker's
        # claims expire with the lease time, and the URLs are leased again.
        held = claims.take([c.image_url for c in candidates])
        mine = [c for c, ok in zip(candidates, held, strict=True) if ok]
        # Read under the claims: a task that held one before has recorded its URL by now.
        previous = state.url_records(job.id, [c.image_url for c in mine])
        for candidate in mine:
            record = previous.get(candidate.image_url)
            if record is not None and record.outcome is DownloadOutcome.STORED and record.image_key:
                # Stored before (by an interrupted delivery of this batch, or by that other task):
                # its image goes to the detector again, which is idempotent, so a lost detect
                # message is sent again; its provenance is written again, in case that delivery
                # stopped before it did.
                image = state.get_images(job.id, [record.image_key]).get(record.image_key)
                if image is not None and image.provenance.image_url == record.url:
                    put_json(store, keys.image_meta_key(job.id, image.sha256), image.model_dump(mode="json"))
                if image is not None:
                    stored.append(image)
        claims.release(list(previous))
        new = [c for c in mine if c.image_url not in previous]
        # A cheap early exit for the whole batch; record_downloads below enforces the limit exactly.
        full = bool(new) and state.counters(job.id).get(Counter.DOWNLOADED, 0) >= job.spec.limits.max_images

        def work(candidate: Candidate) -> tuple[DownloadRecord, StoredImage | None]:
            if full:
                why = FailureReason.LIMIT_REACHED
                return DownloadRecord(url=candidate.image_url, outcome=DownloadOutcome.SKIPPED, reason=why), None
            return fetch_and_store(job, candidate, store, state, settings, fetcher)

        fetched: list[DownloadItem] = []
        for record, image in pool.map(work, new):
            near = query_for(int(image.phash, 16), near_distance) if image and image.phash else None
            fetched.append(DownloadItem(record, image, near))
        # The batch's outcomes in one write, in the batch's order (as one call per URL would decide them).
        finals = state.record_downloads(
            job.id, fetched, job.spec.limits.max_images, across_jobs=job.spec.dedup.across_jobs
        )
        images = [(item.image, final) for item, final in zip(fetched, finals, strict=True) if item.image is not None]
        kept = list(pool.map(lambda pair: settle(job, state, store, *pair), images))
        stored += [image for (image, _), ok in zip(images, kept, strict=True) if ok]
        # Released once recorded, never before: a task that claims a URL next finds its record.
        claims.release([item.record.url for item in fetched])
        for item, final in zip(fetched, finals, strict=True):
            log.debug(
                "download",
                extra={"job_id": job.id, "stage": "crawl", "url": item.record.url, "outcome": final.outcome.value},
            )
    return stored


def _drop_unrecorded(job: Job, state: StateStore, store: ObjectStore, image: StoredImage) -> None:
    """Remove an object stored for a URL whose record lost the race (duplicate or over the limit)."""
    if state.get_images(job.id, [image.key]).get(image.key) is None:
        store.delete(image.key)
        store.delete(keys.image_meta_key(job.id, image.sha256))
