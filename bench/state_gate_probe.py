"""What a running state bench's writers wait on, and what its near-duplicate band lookup costs now.

    .venv/bin/python bench/state_bench.py --store sql --images 1000000 --no-export --progress 60 &
    .venv/bin/python bench/state_gate_probe.py --database-url postgresql://postgres@127.0.0.1:<its port>/<its db>

Meant to run beside a long ``state_bench`` (its PostgreSQL's port is in ``ps``: ``postgres -D
/tmp/imgsift-pg-.../data -p PORT``; the job's database is the one named ``t_...``). Samples
``pg_stat_activity`` every 2 seconds for ``--seconds`` (the writers' wait events, state and the
start of their statements, counted), then runs the crawler's band lookup the way a 16-image
download batch does (the store's own statement: ``UNION ALL`` of one index-only lookup per band,
at the default distance 6's band radii) with ``--lookups`` sets of random hashes, and prints the
candidates returned and the time to execute, fetch and check them. Read-only.
"""

from __future__ import annotations

import argparse
import collections
import random
import time

import sqlalchemy as sa

from imgsift_common import schema as t
from imgsift_common.neardup import band_radii, within
from imgsift_common.sqldialect import make_engine
from imgsift_common.sqlstate import band_candidates

ACTIVITY = sa.text(
    "SELECT coalesce(wait_event_type, '-') || ':' || coalesce(wait_event, '-') || ' ' || state || ' ' || "
    "left(regexp_replace(query, '\\s+', ' ', 'g'), 48) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = current_database()"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="the running state bench's job database")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to sample pg_stat_activity")
    parser.add_argument("--lookups", type=int, default=4, help="band lookups of 16 random hashes to time")
    parser.add_argument("--distance", type=int, default=6, help="near-duplicate distance (the crawler's default)")
    args = parser.parse_args()
    engine = make_engine(args.database_url)
    seen: collections.Counter[str] = collections.Counter()
    with engine.connect() as conn:
        samples = 0
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            seen.update(conn.execute(ACTIVITY).scalars())
            conn.rollback()  # a new snapshot of the activity per sample
            samples += 1
            time.sleep(2)
        print(f"pg_stat_activity, {samples} samples (wait event, state, statement):")
        for line, count in seen.most_common():
            print(f"  {count:4d}  {line}")
        job = conn.execute(sa.select(t.job_numbers.c.num).limit(1)).scalar_one()
        kept = conn.execute(sa.select(sa.func.count()).where(t.kept_images.c.job == job)).scalar_one()
        print(f"\nband lookups against job {job}'s {kept:,} kept images, 16 random hashes each:")
        lookup = band_candidates(conn, tuple(range(t.PHASH_BANDS)))  # the store's own statement
        radii = band_radii(args.distance, t.PHASH_BANDS)
        mask = (1 << t.PHASH_BAND_BITS) - 1
        rng = random.Random(0)
        for _ in range(args.lookups):
            hashes = [rng.getrandbits(64) for _ in range(16)]
            params: dict[str, object] = {"job": job}
            for band, radius in enumerate(radii):
                values = {(h >> (t.PHASH_BAND_BITS * band)) & mask for h in hashes}
                flips = within(0, t.PHASH_BAND_BITS, radius) if radius >= 0 else []  # -1: the band is not probed
                params[f"v{band}"] = sorted({v ^ f for v in values for f in flips})
            started = time.perf_counter()
            result = conn.execute(lookup, params)
            executed = time.perf_counter()
            rows = result.all()
            fetched = time.perf_counter()
            near = [v for v, _ in rows if any(((v & (1 << 64) - 1) ^ h).bit_count() <= args.distance for h in hashes)]
            checked = time.perf_counter()
            print(
                f"  {len(rows):,} candidates ({len(near)} within {args.distance} bits): execute "
                f"{(executed - started) * 1e3:.1f} ms, fetch {(fetched - executed) * 1e3:.1f} ms, check "
                f"{(checked - fetched) * 1e3:.1f} ms"
            )
            conn.rollback()
    engine.dispose()


if __name__ == "__main__":
    main()
