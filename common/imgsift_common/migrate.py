"""``python -m imgsift_common.migrate``: the services' one-shot migration step.

Reads ``IMGSIFT_DATABASE_URL``; waits (logging each try) while PostgreSQL cannot be reached,
up to ``--wait`` seconds, then brings the database to this code's schema revision and checks
it. Compose runs it as the ``migrate`` service the others wait for; Kubernetes as each pod's
initContainer (concurrent runs take turns: :func:`~imgsift_common.sqldialect.migration_lock`).
Exit status 0: migrated; 1: a schema this code cannot migrate, or PostgreSQL unreachable; 2: no URL.
"""

from __future__ import annotations

import argparse
import logging
import os

from imgsift_common.celery_app import DATABASE_ERRORS
from imgsift_common.schema import SchemaMismatch, check_schema, head_revision, migrate
from imgsift_common.servicestate import DATABASE_RETRY_SECONDS, wait_for_database
from imgsift_common.sqldialect import make_engine

log = logging.getLogger("imgsift_common.migrate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgsift_common.migrate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the revision; change nothing")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for PostgreSQL (default 120)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = os.environ.get("IMGSIFT_DATABASE_URL")
    if not url:
        log.error("IMGSIFT_DATABASE_URL is not set: the PostgreSQL to migrate (see .env.example)")
        return 2
    engine = make_engine(url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        try:
            wait_for_database(engine, attempts=1 + int(args.wait / DATABASE_RETRY_SECONDS))
        except SchemaMismatch:
            if args.check:
                raise
            migrate(engine)
            check_schema(engine)
        log.info("%s is at schema revision %s", where, head_revision())
        return 0
    except SchemaMismatch as exc:
        log.error("%s", exc)
    except DATABASE_ERRORS as exc:
        log.error("PostgreSQL at %s is unreachable after %.0f s: %s", where, args.wait, exc)
    finally:
        engine.dispose()
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
