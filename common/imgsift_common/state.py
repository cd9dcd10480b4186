"""Job state: the job record, counters, per-URL outcomes, crops and distances.

Two implementations of one interface: :class:`RedisStateStore` here, for the services, and
:class:`~imgsift_common.sqlstate.SqlStateStore`, in SQL on SQLite (the embedded ``imgsift``
command) or PostgreSQL. Every write that moves a
counter is "record once": it is keyed by what it records (a URL, an image key, a crop key)
and a second delivery of the same work changes nothing, so counters cannot drift when a
task is redelivered. Distances are stored raw; accepted = distance <= threshold is decided
when read.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel

from imgsift_common.messages import (
    Candidate,
    Crop,
    DiscoveryReason,
    DownloadOutcome,
    DownloadRecord,
    Job,
    JobState,
    StoredImage,
    utcnow,
)
from imgsift_common.neardup import NearDupQuery


class Counter(StrEnum):
    DISCOVERED = "discovered"
    DOWNLOADED = "downloaded"
    DUPLICATES = "duplicates"
    FAILED = "failed"
    SKIPPED = "skipped"
    DETECTED = "detected"
    CROPS = "crops"
    COMPARED = "compared"
    COMPARE_FAILED = "compare_failed"  # crops lost or undecodable: counted so the job can finish


class Flag(StrEnum):
    DISCOVERY_DONE = "discovery_done"
    DISCOVERY_REASON = "discovery_reason:"  # followed by a DiscoveryReason


def discovery_reason(flags: set[str]) -> DiscoveryReason | None:
    """Why discovery stopped, from a job's flags (None while it goes on)."""
    for flag in flags:
        if flag.startswith(Flag.DISCOVERY_REASON):
            return DiscoveryReason(flag.removeprefix(Flag.DISCOVERY_REASON))
    return None


OUTCOME_COUNTER = {
    DownloadOutcome.STORED: Counter.DOWNLOADED,
    DownloadOutcome.DUPLICATE: Counter.DUPLICATES,
    DownloadOutcome.FAILED: Counter.FAILED,
    DownloadOutcome.SKIPPED: Counter.SKIPPED,
}


def reason_counter(record: DownloadRecord) -> str | None:
    if record.reason is None or record.outcome not in (DownloadOutcome.FAILED, DownloadOutcome.SKIPPED):
        return None
    return f"{record.outcome.value}:{record.reason.value}"


class StreamState(BaseModel):
    """Where one source stream (a source, with one query) stands: resumable by any worker."""

    cursor: str | None = None
    pages: int = 0
    taken: int = 0  # distinct candidate URLs it has given
    exhausted: bool = False
    error: str | None = None


@dataclass(frozen=True)
class DistancePage:
    items: list[tuple[str, float]]
    next_after: tuple[float, str] | None


class JobNotFound(KeyError):
    pass


class StateStore(Protocol):
    # jobs
    def create_job(self, job: Job) -> bool: ...
    def get_job(self, job_id: str) -> Job | None: ...
    def save_job(self, job: Job) -> None: ...
    def update_job(self, job_id: str, **changes: object) -> Job: ...
    def list_jobs(self, limit: int = 100, owner: str | None = None) -> list[Job]:
        """The newest jobs first; with ``owner``, only the jobs that API key created."""
        ...

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None) -> Job: ...
    def add_note(self, job_id: str, note: str) -> None: ...
    def notes(self, job_id: str) -> list[str]: ...
    def counters(self, job_id: str) -> dict[str, int]: ...
    def set_flag(self, job_id: str, flag: str) -> None: ...
    def raise_progress(self, job_id: str, fraction: float) -> float: ...
    def hold_lock(self, job_id: str, name: str, owner: str, ttl: float) -> bool: ...
    def set_marker(self, job_id: str, name: str, value: str) -> None: ...
    def get_marker(self, job_id: str, name: str) -> str | None: ...
    def claim_idempotency_key(self, key: str, job_id: str, ttl: float) -> str:
        """Bind ``key`` to ``job_id`` unless it is bound already; the job id it is bound to."""
        ...

    def markers(self, job_id: str, prefix: str) -> dict[str, str]:
        """Every marker of the job whose name starts with ``prefix``."""
        ...

    def release_lock(self, job_id: str, name: str, owner: str) -> None: ...
    def flags(self, job_id: str) -> set[str]: ...
    # crawl
    def enqueue_candidates(self, job_id: str, candidates: Iterable[Candidate]) -> list[Candidate]: ...
    def lease_candidates(self, job_id: str, limit: int, lease_seconds: float) -> list[Candidate]: ...
    def frontier_size(self, job_id: str) -> int: ...
    def stream_state(self, job_id: str, stream_id: str) -> StreamState | None: ...
    def save_stream_state(self, job_id: str, stream_id: str, stream: StreamState) -> None: ...
    def url_record(self, job_id: str, url: str) -> DownloadRecord | None: ...
    def sha_owner(self, job_id: str, sha256: str) -> str | None: ...
    def record_download(
        self,
        job_id: str,
        record: DownloadRecord,
        image: StoredImage | None,
        max_images: int,
        *,
        near: NearDupQuery | None = None,
        across_jobs: bool = False,
    ) -> DownloadRecord: ...
    def get_image(self, job_id: str, key: str) -> StoredImage | None: ...
    def image_keys(self, job_id: str) -> list[str]: ...
    # detect
    def is_detected(self, job_id: str, image_key: str) -> bool: ...
    def detected_count(self, job_id: str, image_key: str) -> int | None: ...
    def record_detection(self, job_id: str, image_key: str, crops: list[Crop]) -> bool: ...
    def get_crops(self, job_id: str, crop_keys: Iterable[str]) -> list[Crop]: ...
    def crop_keys(self, job_id: str) -> list[str]: ...
    # siamese
    def has_distance(self, job_id: str, crop_key: str) -> bool: ...
    def record_distance(self, job_id: str, crop_key: str, distance: float) -> bool: ...
    def record_compare_failure(self, job_id: str, crop_key: str) -> bool: ...
    def count_accepted(self, job_id: str, threshold: float) -> int: ...
    def count_below(self, job_id: str, thresholds: list[float]) -> list[int]:
        """For each threshold, how many crops have a distance <= it (one round trip)."""
        ...

    def distances_of(self, job_id: str, crop_keys: list[str]) -> dict[str, float]: ...
    def distances(self, job_id: str) -> list[tuple[str, float]]: ...
    def distance_page(
        self,
        job_id: str,
        *,
        max_distance: float | None = None,
        min_distance_exclusive: float | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> DistancePage: ...
    # reset (embedded re-runs with another detector or scorer)
    def unfinished_work(self, job_id: str) -> tuple[list[str], list[str]]:
        """Stored images not yet detected, and crops with neither a distance nor a failure."""
        ...

    def set_feedback(self, job_id: str, crop_key: str, correct: bool | None) -> None:
        """A user's mark on a crop: right (True), wrong (False), or no mark (None)."""
        ...

    def feedback(self, job_id: str) -> dict[str, bool]: ...

    def reset_detections(self, job_id: str) -> None: ...
    def reset_distances(self, job_id: str) -> None: ...


def updated_job(job: Job, changes: dict[str, object]) -> Job:
    # The state has its own rules (set_job_state); an update never rewrites it.
    if "state" in changes or "id" in changes:
        raise ValueError("update_job changes neither the state nor the id; use set_job_state")
    return job.model_copy(update={**changes, "updated_at": utcnow()})


def finalised_job(job: Job, state: JobState, error: str | None) -> Job:
    # A final state is final: a late task cannot turn "cancelled" back into "completed".
    if job.state.is_final and state is not job.state:
        return job
    return job.model_copy(update={"state": state, "error": error or job.error, "updated_at": utcnow()})


# ============================================================================ Redis


_ENQUEUE = """
-- KEYS: seen, frontier, leases, counters ; ARGV: url1, candidate1, url2, candidate2, ...
-- A URL enters the frontier once per job; its lease starts expired, so it is handed out.
local new = {}
for i = 1, #ARGV, 2 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[3], 0, ARGV[i])
    redis.call('HINCRBY', KEYS[4], 'discovered', 1)
    table.insert(new, ARGV[i])
  end
end
return new
"""

_LEASE = """
-- KEYS: frontier, leases ; ARGV: now, lease_until, limit
local urls = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, url in ipairs(urls) do
  local candidate = redis.call('HGET', KEYS[1], url)
  if candidate then
    redis.call('ZADD', KEYS[2], ARGV[2], url)
    table.insert(out, candidate)
  else
    redis.call('ZREM', KEYS[2], url)
  end
end
return out
"""

_RECORD_DOWNLOAD = """
-- Record what became of one URL, once. Exact duplicates (same SHA-256) within the job, and
-- across jobs when asked, are recorded as duplicates of the first copy. A near-duplicate
-- (perceptual hash within max distance) that is not larger than the copy kept is recorded as
-- its duplicate; one that is larger is kept instead, and the smaller copy becomes the
-- duplicate: its detections and distances are taken back as if it never went downstream.
-- KEYS: 1 urls, 2 sha, 3 counters, 4 images, 5 frontier, 6 leases, 7 phash, 8 superseded,
--       9 detected, 10 dist, 11 compare_failed, 12 global sha
-- ARGV: 1 url, 2 record, 3 sha, 4 image_key, 5 image, 6 max_images, 7 reason counter,
--       8 outcome counter, 9 across jobs, 10 job id, 11 bucket key prefix, 12 crop key prefix,
--       13 near (1/0), 14 hi, 15 lo, 16 pixels, 17 max distance, 18 n own, own buckets..., n probe, probe buckets...
--       ARGV[19 + n own + 1 + n probe]: key prefix of the sets of duplicates, per URL kept
-- Every duplicate is filed under the URL kept, so when a larger copy replaces it, all of
-- them are pointed at the new copy: one keeper per group, never a chain.
local url = ARGV[1]
local existing = redis.call('HGET', KEYS[1], url)
redis.call('HDEL', KEYS[5], url)
redis.call('ZREM', KEYS[6], url)
if existing then return existing end

local function popcount(x)
  local c = 0
  while x ~= 0 do x = bit.band(x, x - 1); c = c + 1 end
  return c
end
local function incr(name, by) redis.call('HINCRBY', KEYS[3], name, by or 1) end
local function as(outcome, fields)
  local r = cjson.decode(ARGV[2])
  r['outcome'] = outcome
  for k, v in pairs(fields) do r[k] = v end
  return cjson.encode(r)
end

local record = ARGV[2]
local sha = ARGV[3]
local n_own = tonumber(ARGV[18] or '0')
local dupes = ARGV[#ARGV]
if sha == '' then
  if ARGV[7] ~= '' then incr(ARGV[7]) end
  incr(ARGV[8])
  redis.call('HSET', KEYS[1], url, record)
  return record
end

local owner = redis.call('HGET', KEYS[2], sha)
local elsewhere = false
if ARGV[9] == '1' then
  local g = redis.call('HGET', KEYS[12], sha)
  if g and string.sub(g, 1, #ARGV[10] + 1) ~= ARGV[10] .. ' ' then elsewhere = g end
end
if owner and owner ~= url then
  record = as('duplicate', {duplicate_of = owner})
  redis.call('SADD', dupes .. owner, url)
  incr('duplicates')
elseif elsewhere then
  record = as('duplicate', {duplicate_of = 'job ' .. elsewhere})
  incr('duplicates')
elseif tonumber(redis.call('HGET', KEYS[3], 'downloaded') or '0') >= tonumber(ARGV[6]) then
  record = as('skipped', {reason = 'limit_reached', image_key = cjson.null})
  incr('skipped')
  incr('skipped:limit_reached')
else
  local keep = true
  if ARGV[13] == '1' then
    local hi, lo, pixels, maxd = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
    local best, best_d = nil, maxd + 1
    local seen = {}
    local n_probe = tonumber(ARGV[19 + n_own])
    for i = 1, n_probe do
      for _, other in ipairs(redis.call('SMEMBERS', ARGV[11] .. ARGV[19 + n_own + i])) do
        if not seen[other] and other ~= sha then
          seen[other] = true
          local entry = redis.call('HGET', KEYS[7], other)
          if entry then
            local f = cjson.decode(entry)
            local d = popcount(bit.bxor(hi, f['hi'])) + popcount(bit.bxor(lo, f['lo']))
            if d < best_d then best, best_d = f, d end
          end
        end
      end
    end
    if best and pixels <= best['pixels'] then
      keep = false
      record = as('duplicate', {duplicate_of = best['url'], hamming = best_d})
      redis.call('SADD', dupes .. best['url'], url)
      incr('duplicates')
    elseif best then
      -- The new copy is larger: the kept one becomes its duplicate, downstream included.
      local old = cjson.decode(redis.call('HGET', KEYS[1], best['url']))
      old['outcome'] = 'duplicate'
      old['duplicate_of'] = url
      old['hamming'] = best_d
      redis.call('HSET', KEYS[1], best['url'], cjson.encode(old))
      for _, other in ipairs(redis.call('SMEMBERS', dupes .. best['url'])) do
        local r = cjson.decode(redis.call('HGET', KEYS[1], other))
        r['duplicate_of'] = url
        redis.call('HSET', KEYS[1], other, cjson.encode(r))
        redis.call('SADD', dupes .. url, other)
      end
      redis.call('DEL', dupes .. best['url'])
      redis.call('SADD', dupes .. url, best['url'])
      redis.call('HSET', KEYS[2], best['sha'], url)
      redis.call('HDEL', KEYS[4], best['key'])
      for _, b in ipairs(best['buckets']) do redis.call('SREM', ARGV[11] .. b, best['sha']) end
      redis.call('HDEL', KEYS[7], best['sha'])
      incr('downloaded', -1)
      incr('duplicates')
      local sha24 = string.sub(best['sha'], 1, 24)
      redis.call('SADD', KEYS[8], sha24)
      local n = redis.call('HGET', KEYS[9], best['key'])
      if n then
        incr('detected', -1)
        incr('crops', -tonumber(n))
        for i = 0, tonumber(n) - 1 do
          local crop = ARGV[12] .. sha24 .. string.format('-%03d.jpg', i)
          if redis.call('ZREM', KEYS[10], crop) == 1 then incr('compared', -1) end
          if redis.call('SREM', KEYS[11], crop) == 1 then incr('compare_failed', -1) end
        end
      end
    end
  end
  if keep then
    redis.call('HSET', KEYS[2], sha, url)
    redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])
    redis.call('HSET', KEYS[12], sha, ARGV[10] .. ' ' .. url)
    if ARGV[13] == '1' then
      local buckets = {}
      for i = 1, n_own do
        buckets[i] = ARGV[18 + i]
        redis.call('SADD', ARGV[11] .. ARGV[18 + i], sha)
      end
      redis.call('HSET', KEYS[7], sha, cjson.encode({
        hi = tonumber(ARGV[14]), lo = tonumber(ARGV[15]), pixels = tonumber(ARGV[16]),
        sha = sha, key = ARGV[4], url = url, buckets = buckets}))
    end
    incr('downloaded')
  end
end
redis.call('HSET', KEYS[1], url, record)
return record
"""

_RECORD_DETECTION = """
-- KEYS: detected, crops, counters, superseded ; ARGV: image_key, n, sha24, crop_key1, crop_json1, ...
if redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 1 then
  redis.call('HSETNX', KEYS[1], ARGV[1], 0)  -- a larger copy replaced this image: nothing downstream
  return 0
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', KEYS[3], 'detected', 1)
redis.call('HINCRBY', KEYS[3], 'crops', tonumber(ARGV[2]))
return 1
"""

_RECORD_DISTANCE = """
-- KEYS: dist, counters, superseded ; ARGV: crop_key, distance, sha24
if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then return 0 end  -- its image was replaced
local added = redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
if added == 1 then redis.call('HINCRBY', KEYS[2], 'compared', 1) end
return added
"""

_RECORD_COMPARE_FAILURE = """
-- KEYS: failed set, counters ; ARGV: crop_key
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'compare_failed', 1)
  return 1
end
return 0
"""

_RAISE_PROGRESS = """
-- KEYS: job progress ; ARGV: fraction ; keeps the highest value ever reported
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local new = tonumber(ARGV[1])
if new > cur then redis.call('SET', KEYS[1], ARGV[1]); return ARGV[1] end
return tostring(cur)
"""

_HOLD_LOCK = """
-- KEYS: lock ; ARGV: owner, ttl_ms ; take a free lock, or keep one we hold
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

_SET_STATE = """
-- KEYS: job ; ARGV: new_job_json, expected_state ; compare-and-set on the stored state
local cur = redis.call('GET', KEYS[1])
if not cur then return -1 end
if cjson.decode(cur)['state'] ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


class RedisStateStore:
    """Job state in Redis hashes, sets and sorted sets under ``imgsift:job:{id}:*``."""

    def __init__(self, client: object, prefix: str = "imgsift") -> None:
        import redis

        assert isinstance(client, redis.Redis)
        # Any: redis-py's hints do not know that decode_responses=True returns str.
        self.r: Any = client
        self.prefix = prefix
        self._record_download = self.r.register_script(_RECORD_DOWNLOAD)
        self._enqueue = self.r.register_script(_ENQUEUE)
        self._lease = self.r.register_script(_LEASE)
        self._record_detection = self.r.register_script(_RECORD_DETECTION)
        self._record_distance = self.r.register_script(_RECORD_DISTANCE)
        self._record_compare_failure = self.r.register_script(_RECORD_COMPARE_FAILURE)
        self._set_state = self.r.register_script(_SET_STATE)
        self._raise_progress = self.r.register_script(_RAISE_PROGRESS)
        self._hold_lock = self.r.register_script(_HOLD_LOCK)
        self._release_lock = self.r.register_script(_RELEASE_LOCK)

    @classmethod
    def from_url(cls, url: str) -> RedisStateStore:
        import redis

        return cls(redis.Redis.from_url(url, decode_responses=True))

    def _k(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:job:{job_id}" + (f":{part}" if part else "")

    # ------------------------------------------------------------------ jobs
    def create_job(self, job: Job) -> bool:
        created = bool(self.r.set(self._k(job.id), job.model_dump_json(), nx=True))
        if created:
            self.r.zadd(f"{self.prefix}:jobs", {job.id: job.created_at.timestamp()})
            if job.owner is not None:
                self.r.zadd(self._owner_jobs(job.owner), {job.id: job.created_at.timestamp()})
        return created

    def _owner_jobs(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:jobs"

    def get_job(self, job_id: str) -> Job | None:
        raw = self.r.get(self._k(job_id))
        return Job.model_validate_json(raw) if raw else None

    def _require(self, job_id: str) -> Job:
        job = self.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def save_job(self, job: Job) -> None:
        self.r.set(self._k(job.id), job.model_copy(update={"updated_at": utcnow()}).model_dump_json())

    def update_job(self, job_id: str, **changes: object) -> Job:
        """Change fields of the stored job atomically (optimistic lock), keeping its current state."""
        import redis

        key = self._k(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    new = updated_job(Job.model_validate_json(raw), changes)
                    pipe.multi()
                    pipe.set(key, new.model_dump_json())
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def list_jobs(self, limit: int = 100, owner: str | None = None) -> list[Job]:
        index = f"{self.prefix}:jobs" if owner is None else self._owner_jobs(owner)
        ids = self.r.zrevrange(index, 0, limit - 1)
        jobs = [self.get_job(i) for i in ids]
        return [j for j in jobs if j is not None]

    def set_job_state(self, job_id: str, state: JobState, error: str | None = None) -> Job:
        while True:
            job = self._require(job_id)
            new = finalised_job(job, state, error)
            if new is job:
                return job
            if self._set_state(keys=[self._k(job_id)], args=[new.model_dump_json(), job.state.value]) == 1:
                return new

    def add_note(self, job_id: str, note: str) -> None:
        self.r.hsetnx(self._k(job_id, "notes"), note, utcnow().isoformat())

    def notes(self, job_id: str) -> list[str]:
        raw = self.r.hgetall(self._k(job_id, "notes"))
        return [n for n, _ in sorted(raw.items(), key=lambda kv: kv[1])]

    def counters(self, job_id: str) -> dict[str, int]:
        return {k: int(v) for k, v in self.r.hgetall(self._k(job_id, "counters")).items() if int(v) != 0}

    def set_flag(self, job_id: str, flag: str) -> None:
        self.r.sadd(self._k(job_id, "flags"), flag)

    def flags(self, job_id: str) -> set[str]:
        return set(self.r.smembers(self._k(job_id, "flags")))

    def hold_lock(self, job_id: str, name: str, owner: str, ttl: float) -> bool:
        return self._hold_lock(keys=[self._k(job_id, f"lock:{name}")], args=[owner, int(ttl * 1000)]) == 1

    def release_lock(self, job_id: str, name: str, owner: str) -> None:
        self._release_lock(keys=[self._k(job_id, f"lock:{name}")], args=[owner])

    def set_marker(self, job_id: str, name: str, value: str) -> None:
        self.r.hset(self._k(job_id, "markers"), name, value)

    def markers(self, job_id: str, prefix: str) -> dict[str, str]:
        found = self.r.hscan_iter(self._k(job_id, "markers"), match=prefix.replace("*", "\\*") + "*")
        return dict(found)

    def claim_idempotency_key(self, key: str, job_id: str, ttl: float) -> str:
        name = f"{self.prefix}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"
        if self.r.set(name, job_id, nx=True, px=max(1, int(ttl * 1000))):
            return job_id
        return str(self.r.get(name) or job_id)

    def get_marker(self, job_id: str, name: str) -> str | None:
        return self.r.hget(self._k(job_id, "markers"), name)

    def raise_progress(self, job_id: str, fraction: float) -> float:
        return float(self._raise_progress(keys=[self._k(job_id, "progress")], args=[repr(float(fraction))]))

    # ------------------------------------------------------------------ crawl
    def enqueue_candidates(self, job_id: str, candidates: Iterable[Candidate]) -> list[Candidate]:
        by_url = {c.image_url: c for c in candidates}
        if not by_url:
            return []
        args: list[str] = []
        for url, candidate in by_url.items():
            args += [url, candidate.model_dump_json()]
        keys = [self._k(job_id, p) for p in ("seen", "frontier", "leases", "counters")]
        return [by_url[url] for url in self._enqueue(keys=keys, args=args)]

    def lease_candidates(self, job_id: str, limit: int, lease_seconds: float) -> list[Candidate]:
        now = time.time()
        keys = [self._k(job_id, "frontier"), self._k(job_id, "leases")]
        raws = self._lease(keys=keys, args=[repr(now), repr(now + lease_seconds), limit])
        return [Candidate.model_validate_json(raw) for raw in raws]

    def frontier_size(self, job_id: str) -> int:
        return int(self.r.hlen(self._k(job_id, "frontier")))

    def stream_state(self, job_id: str, stream_id: str) -> StreamState | None:
        raw = self.r.hget(self._k(job_id, "streams"), stream_id)
        return StreamState.model_validate_json(raw) if raw else None

    def save_stream_state(self, job_id: str, stream_id: str, stream: StreamState) -> None:
        self.r.hset(self._k(job_id, "streams"), stream_id, stream.model_dump_json())

    def url_record(self, job_id: str, url: str) -> DownloadRecord | None:
        raw = self.r.hget(self._k(job_id, "urls"), url)
        return DownloadRecord.model_validate_json(raw) if raw else None

    def sha_owner(self, job_id: str, sha256: str) -> str | None:
        return self.r.hget(self._k(job_id, "sha"), sha256)

    def record_download(
        self,
        job_id: str,
        record: DownloadRecord,
        image: StoredImage | None,
        max_images: int,
        *,
        near: NearDupQuery | None = None,
        across_jobs: bool = False,
    ) -> DownloadRecord:
        """Record a URL's outcome once; dedupe a stored image exactly, across jobs if asked, and by near hash."""
        keep = image is not None and record.sha256 is not None
        args: list[str | int] = [
            record.url,
            record.model_dump_json(),
            record.sha256 if keep and record.sha256 else "",
            image.key if image else "",
            image.model_dump_json() if image else "",
            max_images,
            reason_counter(record) or "",
            OUTCOME_COUNTER[record.outcome].value,
            "1" if across_jobs else "0",
            job_id,
            self._k(job_id, "phash:"),
            f"jobs/{job_id}/crops/",
        ]
        if near is not None and image is not None:
            args += ["1", near.hi, near.lo, image.width * image.height, near.max_distance, len(near.own_buckets)]
            args += [*near.own_buckets, len(near.probe_buckets), *near.probe_buckets]
        else:
            args += ["0", 0, 0, 0, 0, 0, 0]
        args.append(self._k(job_id, "dupes:"))
        names = [*("urls", "sha", "counters", "images", "frontier", "leases", "phash", "superseded")]
        names += ["detected", "dist", "compare_failed"]
        keys = [self._k(job_id, n) for n in names] + [f"{self.prefix}:global:sha"]
        return DownloadRecord.model_validate_json(self._record_download(keys=keys, args=args))

    def get_image(self, job_id: str, key: str) -> StoredImage | None:
        raw = self.r.hget(self._k(job_id, "images"), key)
        return StoredImage.model_validate_json(raw) if raw else None

    def image_keys(self, job_id: str) -> list[str]:
        return sorted(self.r.hkeys(self._k(job_id, "images")))

    # ------------------------------------------------------------------ detect
    def is_detected(self, job_id: str, image_key: str) -> bool:
        return bool(self.r.hexists(self._k(job_id, "detected"), image_key))

    def detected_count(self, job_id: str, image_key: str) -> int | None:
        raw = self.r.hget(self._k(job_id, "detected"), image_key)
        return int(raw) if raw is not None else None

    def record_detection(self, job_id: str, image_key: str, crops: list[Crop]) -> bool:
        args: list[str | int] = [image_key, len(crops), sha24_of(image_key)]
        for crop in crops:
            args += [crop.key, crop.model_dump_json()]
        keys = [self._k(job_id, n) for n in ("detected", "crops", "counters", "superseded")]
        return self._record_detection(keys=keys, args=args) == 1

    def get_crops(self, job_id: str, crop_keys: Iterable[str]) -> list[Crop]:
        keys = list(crop_keys)
        if not keys:
            return []
        raws = self.r.hmget(self._k(job_id, "crops"), keys)
        return [Crop.model_validate_json(raw) for raw in raws if raw]

    def crop_keys(self, job_id: str) -> list[str]:
        return sorted(self.r.hkeys(self._k(job_id, "crops")))

    # ------------------------------------------------------------------ siamese
    def has_distance(self, job_id: str, crop_key: str) -> bool:
        return self.r.zscore(self._k(job_id, "dist"), crop_key) is not None

    def record_distance(self, job_id: str, crop_key: str, distance: float) -> bool:
        keys = [self._k(job_id, "dist"), self._k(job_id, "counters"), self._k(job_id, "superseded")]
        return self._record_distance(keys=keys, args=[crop_key, repr(float(distance)), sha24_of(crop_key)]) == 1

    def record_compare_failure(self, job_id: str, crop_key: str) -> bool:
        keys = [self._k(job_id, "compare_failed"), self._k(job_id, "counters")]
        return self._record_compare_failure(keys=keys, args=[crop_key]) == 1

    def count_accepted(self, job_id: str, threshold: float) -> int:
        return int(self.r.zcount(self._k(job_id, "dist"), "-inf", repr(float(threshold))))

    def count_below(self, job_id: str, thresholds: list[float]) -> list[int]:
        pipe = self.r.pipeline(transaction=False)
        for t in thresholds:
            pipe.zcount(self._k(job_id, "dist"), "-inf", repr(float(t)))
        return [int(n) for n in pipe.execute()]

    def distances_of(self, job_id: str, crop_keys: list[str]) -> dict[str, float]:
        if not crop_keys:
            return {}
        scores = self.r.zmscore(self._k(job_id, "dist"), crop_keys)
        return {k: float(v) for k, v in zip(crop_keys, scores, strict=True) if v is not None}

    def distances(self, job_id: str) -> list[tuple[str, float]]:
        return [(k, float(v)) for k, v in self.r.zrange(self._k(job_id, "dist"), 0, -1, withscores=True)]

    def distance_page(
        self,
        job_id: str,
        *,
        max_distance: float | None = None,
        min_distance_exclusive: float | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 100,
        descending: bool = False,
    ) -> DistancePage:
        low = "-inf" if min_distance_exclusive is None else f"({min_distance_exclusive!r}"
        high = "+inf" if max_distance is None else repr(float(max_distance))
        if after is not None:
            # Inclusive on the cursor's score: ties are resolved by the member order below.
            if descending:
                high = repr(after[0]) if max_distance is None or after[0] < max_distance else high
            else:
                low = repr(after[0]) if min_distance_exclusive is None or after[0] > min_distance_exclusive else low
        items: list[tuple[str, float]] = []
        offset = 0
        key = self._k(job_id, "dist")
        while len(items) <= limit:
            if descending:  # equal scores come by member, descending: the reverse of ascending order
                chunk = self.r.zrevrangebyscore(key, high, low, start=offset, num=limit + 1, withscores=True)
            else:
                chunk = self.r.zrangebyscore(key, low, high, start=offset, num=limit + 1, withscores=True)
            if not chunk:
                break
            offset += len(chunk)
            for member, score in chunk:
                if after is not None:
                    seen = (score, member) >= after if descending else (score, member) <= after
                    if seen:
                        continue
                items.append((member, float(score)))
        return page_of(items, limit, descending)

    # ------------------------------------------------------------------ resets
    def set_feedback(self, job_id: str, crop_key: str, correct: bool | None) -> None:
        if correct is None:
            self.r.hdel(self._k(job_id, "feedback"), crop_key)
        else:
            self.r.hset(self._k(job_id, "feedback"), crop_key, "1" if correct else "0")

    def feedback(self, job_id: str) -> dict[str, bool]:
        return {k: v == "1" for k, v in self.r.hgetall(self._k(job_id, "feedback")).items()}

    def unfinished_work(self, job_id: str) -> tuple[list[str], list[str]]:
        pipe = self.r.pipeline(transaction=False)
        pipe.hkeys(self._k(job_id, "images"))
        pipe.hkeys(self._k(job_id, "detected"))
        pipe.hkeys(self._k(job_id, "crops"))
        pipe.zrange(self._k(job_id, "dist"), 0, -1)
        pipe.smembers(self._k(job_id, "compare_failed"))
        images, detected, crops, scored, failed = pipe.execute()
        return sorted(set(images) - set(detected)), sorted(set(crops) - set(scored) - set(failed))

    def reset_detections(self, job_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(self._k(job_id, "detected"), self._k(job_id, "crops"))
        pipe.hdel(self._k(job_id, "counters"), Counter.DETECTED, Counter.CROPS)
        pipe.execute()
        self.reset_distances(job_id)

    def reset_distances(self, job_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(self._k(job_id, "dist"), self._k(job_id, "compare_failed"))
        pipe.hdel(self._k(job_id, "counters"), Counter.COMPARED, Counter.COMPARE_FAILED)
        pipe.execute()


def sha24_of(key: str) -> str:
    """The image hash prefix an image or crop key starts its file name with (see keys.py)."""
    return key.rsplit("/", 1)[-1][:24]


def page_of(items: list[tuple[str, float]], limit: int, descending: bool = False) -> DistancePage:
    items.sort(key=lambda kv: (kv[1], kv[0]), reverse=descending)
    page = items[:limit]
    more = len(items) > limit
    return DistancePage(page, (page[-1][1], page[-1][0]) if more and page else None)
