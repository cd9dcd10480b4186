"""Everything that differs between SQLite and PostgreSQL, in one small module.

The job-state store (:mod:`imgsift_common.sqlstate`) is one SQL code path over SQLAlchemy
Core; the two databases differ only in what is here: which ``INSERT`` construct has
``ON CONFLICT``, how a URL names its driver, how text keys compare, and how SQLite is told to
take its write lock at the start of a write transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

# Keys (job ids, object keys, names) compare byte by byte on both databases, as Redis and
# Python's sorted() compare them; PostgreSQL's default collation would sort by locale instead.
Key = sa.Text().with_variant(postgresql.TEXT(collation="C"), "postgresql")

# Execution option of a write transaction: SQLite takes the database's write lock at BEGIN
# (BEGIN IMMEDIATE) rather than at the first write, so two writers that both read first wait
# for each other instead of one failing with "database is locked" when it tries to upgrade.
WRITE = {"imgsift_write": True}

SQLITE_BUSY_SECONDS = 60.0  # how long a SQLite writer waits for another one before it fails


def insert(conn: Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """``INSERT`` with ``ON CONFLICT`` clauses, for the database ``conn`` speaks to."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_rows(dialect: str, table: sa.Table, names: Sequence[str]) -> postgresql.Insert | sqlite.Insert:
    """``INSERT`` of rows with the columns ``names`` on the database ``dialect`` names, the first
    the same in every row (the job's); add ``ON CONFLICT`` and ``RETURNING``, then execute it with
    :func:`rows_params` of the rows.

    PostgreSQL: one statement for any number of rows, ``INSERT ... SELECT :rows_col1, * FROM
    unnest(:rows_col2, ...)``, a parameter per column (the first column's value, an array of the
    rows' values of each other), so its text is the same for every batch and psycopg parses and
    prepares it once (a multi-row ``VALUES`` list is a new statement for each row count, and psycopg
    parses one of more than 50 parameters anew on every execution). SQLite: the rows as an
    executemany (SQLAlchemy's multi-row VALUES pages).
    """
    if dialect != "postgresql":
        return sqlite.insert(table)
    first, rest = names[0], names[1:]
    arrays = [sa.cast(sa.bindparam(f"rows_{name}"), postgresql.ARRAY(_element(table.c[name].type))) for name in rest]
    source = sa.func.unnest(*arrays).table_valued(*rest).render_derived()
    columns = [sa.bindparam(f"rows_{first}", type_=table.c[first].type), *(source.c[name] for name in rest)]
    return postgresql.insert(table).from_select(list(names), sa.select(*columns))


def rows_params(dialect: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | dict[str, Any]:
    """The parameters of :func:`insert_rows` for ``rows`` (each with the same columns)."""
    if dialect != "postgresql":
        return list(rows)
    first, *rest = rows[0]
    return {f"rows_{first}": rows[0][first]} | {f"rows_{name}": [row[name] for row in rows] for name in rest}


def _element(column_type: sa.types.TypeEngine[Any]) -> sa.types.TypeEngine[Any]:
    # Keys are compared under the "C" collation by their columns; the array that carries them is plain text.
    return sa.Text() if isinstance(column_type, sa.String) else column_type


def one_of(conn: Connection, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
    """``column IN :name`` (a list given with the statement's parameters); on PostgreSQL ``column =
    ANY(:name)``, one array parameter, so the statement reads the same for any number of values and
    psycopg's prepared statements are reused (an ``IN`` list is a new statement for each length).
    Both use the column's index."""
    if conn.dialect.name == "postgresql":
        return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(sa.bindparam(name, expanding=True))


def snapshot(conn: Connection) -> None:
    """Make the next transaction on ``conn`` read one state of the database throughout.

    A SQLite read transaction does so already (WAL); PostgreSQL's default, READ COMMITTED,
    takes a new snapshot per statement.
    """
    if conn.dialect.name == "postgresql":
        conn.execution_options(isolation_level="REPEATABLE READ")


# Any 64-bit number of our own: the advisory lock that serialises concurrent migrations.
MIGRATION_LOCK = 0x696D67736966  # "imgsif"


def migration_lock(conn: Connection) -> None:
    """Make concurrent migrations of one database take turns, until the transaction ends.

    Kubernetes starts one migration per pod (an initContainer), so several may run at once;
    PostgreSQL serialises them with a transaction-scoped advisory lock, SQLite with its write
    lock, which the migration's transaction holds from BEGIN (:data:`WRITE`).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


def make_engine(url: str | sa.URL, **kwargs: Any) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql://...``), set up for the store."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):  # psycopg 3 (SQLAlchemy's default is psycopg2)
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        engine = sa.create_engine(parsed, pool_pre_ping=True, **kwargs)
        sa.event.listen(engine, "connect", _postgres_connect)
        return engine
    engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_SECONDS}, **kwargs)
    sa.event.listen(engine, "connect", _sqlite_connect)
    sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _postgres_connect(dbapi_connection: Any, _record: object) -> None:
    # Lists (insert_rows' and one_of's arrays) go to the server in binary: psycopg's text form
    # escapes every element with a regular expression, most of a batch's client CPU.
    from psycopg.types.array import ListBinaryDumper

    dbapi_connection.adapters.register_dumper(list, ListBinaryDumper)


def _sqlite_connect(dbapi_connection: Any, _record: object) -> None:
    # pysqlite's own transaction handling starts transactions late and never for SELECTs;
    # switched off here, the "begin" hook below starts every transaction itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; safe with WAL
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("imgsift_write") else "BEGIN")
