"""A PostgreSQL 15 server of our own, in a temp dir on a loopback port (never the machine's own).

One place for the tests (``postgres_server`` in tests/conftest.py) and the benchmarks that
need the services' store: :func:`running_postgres` starts the server with a template database
migrated by :func:`imgsift_common.schema.migrate`, and :meth:`PostgresServer.create_database`
copies it into a throwaway database (or makes an empty one, for a migrate step to fill).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_BIN = Path(os.environ.get("IMGSIFT_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PostgresUnavailable(RuntimeError):
    """PostgreSQL 15's binaries are not installed (the tests skip; a benchmark stops with this)."""


class PostgresServer:
    """A PostgreSQL server of our own: one throwaway database per test, copied from a migrated template."""

    TEMPLATE = "imgsift_template"

    def __init__(self, port: int, pg_ctl: list[str] | None = None) -> None:
        self.port = port
        self._pg_ctl = pg_ctl or []  # the pg_ctl command line, up to its action

    def stop(self) -> None:
        """Stop the server as an operator's restart does: ``pg_ctl stop -m fast`` (open sessions end)."""
        subprocess.run([*self._pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        subprocess.run([*self._pg_ctl, "-w", "-t", "60", "start"], check=True, capture_output=True, timeout=120)

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, *, migrated: bool = True) -> str:
        """A new database (with the job-state schema, or empty); its URL."""
        name = f"t_{os.urandom(6).hex()}"
        template = self.TEMPLATE if migrated else "template0"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]


@contextmanager
def running_postgres(port: int) -> Iterator[PostgresServer]:
    """A PostgreSQL 15 on 127.0.0.1:``port`` in a temp dir, with the migrated template; removed after.

    Raises :class:`PostgresUnavailable` where PostgreSQL 15 is not installed.
    """
    from imgsift_common.schema import migrate

    if not (PG_BIN / "initdb").is_file():
        raise PostgresUnavailable(
            f"PostgreSQL 15 is not installed ({PG_BIN / 'initdb'} is missing; scripts/install.sh installs "
            "Debian's postgresql package when run as root, or set IMGSIFT_TEST_PG_BIN)"
        )
    # Not under pytest's tmp dir: that is private to this user, and the server may run as another.
    root = Path(tempfile.mkdtemp(prefix="imgsift-pg-"))
    as_server: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres user
        shutil.chown(root, "postgres")
        as_server = ["runuser", "-u", "postgres", "--"]
    data, sockets, log = root / "data", root / "sockets", root / "server.log"

    def run(*args: object) -> None:
        subprocess.run([*as_server, *map(str, args)], check=True, capture_output=True, timeout=120)

    try:
        # A language collation, as servers usually have: a key compared by locale, not bytes, shows.
        icu = ["--locale-provider=icu", "--icu-locale=en-US", "--locale=C.UTF-8"]
        run(PG_BIN / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", *icu)
        run("mkdir", sockets)
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        run(PG_BIN / "pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace')}") from exc
    server = PostgresServer(port, [*as_server, *map(str, (PG_BIN / "pg_ctl", "-D", data, "-o", options, "-l", log))])
    try:
        server._admin(f'CREATE DATABASE "{PostgresServer.TEMPLATE}"')
        migrate(server.url(PostgresServer.TEMPLATE))
        yield server
    finally:
        run(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
