"""A list of image URLs: given inline, or a local file read a page at a time.

The file's extension says its format:

- ``.txt`` (also ``.lst``, ``.list``, ``.urls`` or no extension): one URL per line; blank
  lines and ``#`` comments are skipped.
- ``.csv`` and ``.tsv``: a header row names the columns. The image URL is in the column
  named ``url`` or ``image_url`` (also ``URL``, ``image``, ``img_url``); when no header
  names one, in the first column. A first row whose first cell is an http(s) URL is data,
  not a header: the file has no header and the URL is in the first column. Optional
  columns become the candidate's provenance: ``page_url``, ``title`` (or ``caption``, as
  img2dataset names it), ``license``, ``license_url``, ``author``.
- ``.parquet``: the same columns; only those are read, one row group at a time.

The cursor is the position reached: an index into the inline list, then a byte offset in
a text or CSV file, or a (row group, row) pair in a Parquet file, so a list of millions of
URLs is never read whole and a page starts exactly where the last one stopped.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from imgsift_common.messages import Candidate, SourceKind, SourceSpec
from imgsift_crawler.sources.base import SourceContext, SourceError, SourcePage

if TYPE_CHECKING:
    import pyarrow as pa

TEXT = {"", ".txt", ".lst", ".list", ".urls"}
DELIMITED = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
PARQUET = {".parquet", ".pq"}

URL_COLUMNS = ("url", "image_url", "image", "img_url", "imageurl")
# Candidate field -> the column names it is read from, first match wins.
EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {
    "page_url": ("page_url", "pageurl", "page"),
    "title": ("title", "caption", "alt", "text"),
    "license": ("license", "licence"),
    "license_url": ("license_url", "licence_url"),
    "author": ("author", "creator", "artist"),
}


def _text_candidate(line: str) -> Candidate | None:
    url = line.strip()
    return Candidate(image_url=url, source=SourceKind.URLS) if url and not url.startswith("#") else None


def _looks_like_url(value: str) -> bool:
    return value.strip().lower().startswith(("http://", "https://"))


def _columns(header: list[str]) -> tuple[int, dict[str, int]]:
    """Index of the URL column and of each optional column present, from a header row."""
    names = [h.strip().lstrip("\ufeff").lower() for h in header]
    url = next((names.index(n) for n in URL_COLUMNS if n in names), 0)
    extra: dict[str, int] = {}
    for field, choices in EXTRA_COLUMNS.items():
        at = next((names.index(n) for n in choices if n in names and names.index(n) != url), None)
        if at is not None:
            extra[field] = at
    return url, extra


def _row_candidate(values: list[Any], url_at: int, extra: dict[str, int]) -> Candidate | None:
    url = values[url_at] if url_at < len(values) else None
    if not isinstance(url, str) or not url.strip() or url.lstrip().startswith("#"):
        return None
    fields: dict[str, str] = {}
    for field, at in extra.items():
        value = values[at] if at < len(values) else None
        if value is not None and str(value).strip():
            fields[field] = str(value).strip()
    return Candidate(image_url=url.strip(), source=SourceKind.URLS, **fields)


# ---------------------------------------------------------------------------- text


def _text_page(handle: IO[bytes], position: dict[str, Any], size: int) -> tuple[list[Candidate], bool]:
    found: list[Candidate] = []
    handle.seek(position["offset"])
    for _ in range(size):
        raw = handle.readline()
        if not raw:
            return found, False
        if candidate := _text_candidate(raw.decode("utf-8", errors="replace")):
            found.append(candidate)
    position["offset"] = handle.tell()
    return found, bool(handle.read(1))


# ---------------------------------------------------------------------------- csv / tsv


def _lines(handle: IO[bytes], ends: list[int]) -> Iterator[str]:
    """Decoded lines of a binary file, noting in ``ends`` the byte offset after each.

    :mod:`csv` asks for one line at a time and only for more while inside a quoted field,
    so when it yields a record, ``ends[-1]`` is where that record ends in the file.
    """
    while raw := handle.readline():
        ends.append(handle.tell())
        yield raw.decode("utf-8", errors="replace")


def _delimited_page(
    handle: IO[bytes], position: dict[str, Any], size: int, delimiter: str
) -> tuple[list[Candidate], bool]:
    ends: list[int] = []
    handle.seek(0)
    header_rows = csv.reader(_lines(handle, ends), delimiter=delimiter)
    first = next(header_rows, None)
    if first is None:
        return [], False
    has_header = not (first and _looks_like_url(first[0]))
    url_at, extra = _columns(first) if has_header else (0, {})
    if position["offset"] == 0 and has_header:
        position["offset"] = ends[-1]
    found: list[Candidate] = []
    ends.clear()
    handle.seek(position["offset"])
    rows = csv.reader(_lines(handle, ends), delimiter=delimiter)
    for _ in range(size):
        row = next(rows, None)
        if row is None:
            return found, False
        position["offset"] = ends[-1]
        if candidate := _row_candidate(list(row), url_at, extra):
            found.append(candidate)
    return found, bool(handle.read(1))


# ---------------------------------------------------------------------------- parquet


@lru_cache(maxsize=2)
def _row_group(path: str, mtime_ns: int, group: int, columns: tuple[str, ...]) -> pa.Table:
    """One row group's wanted columns; cached, so paging through a group decodes it once per process."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=list(columns))


def _parquet_page(path: Path, position: dict[str, Any], size: int) -> tuple[list[Candidate], bool]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"urls: {path} is not a readable Parquet file ({exc})") from exc
    names = meta.schema_arrow.names
    url_at, extra = _columns(names)
    url_column = names[url_at]
    url_type = meta.schema_arrow.field(url_column).type
    if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type)):
        raise SourceError(f"urls: no text column of image URLs in {path}; name it one of {', '.join(URL_COLUMNS)}")
    wanted = (url_column, *(names[at] for at in extra.values()))
    slot = {names[at]: i for i, at in enumerate((url_at, *extra.values()))}
    fields = {field: slot[names[at]] for field, at in extra.items()}
    group, row = position.get("group", 0), position.get("row", 0)
    groups = meta.metadata.num_row_groups
    mtime = path.stat().st_mtime_ns
    found: list[Candidate] = []
    taken = 0
    while taken < size and group < groups:
        table = _row_group(str(path), mtime, group, wanted)
        chunk = table.slice(row, size - taken)
        columns = [chunk.column(i).to_pylist() for i in range(len(wanted))]
        for values in zip(*columns, strict=True):
            if candidate := _row_candidate(list(values), 0, fields):
                found.append(candidate)
        taken += chunk.num_rows
        row += chunk.num_rows
        if row >= table.num_rows:
            group, row = group + 1, 0
    position["group"], position["row"] = group, row
    return found, group < groups


# ---------------------------------------------------------------------------- the source


def page(spec: SourceSpec, ctx: SourceContext, cursor: str | None) -> SourcePage:
    position = json.loads(cursor) if cursor else {"inline": 0, "offset": 0}
    size = ctx.settings.url_list_page_size
    inline = spec.urls or []
    if position["inline"] < len(inline):
        chunk = inline[position["inline"] : position["inline"] + size]
        found = [c for c in map(_text_candidate, chunk) if c]
        position["inline"] += len(chunk)
        more = position["inline"] < len(inline) or bool(spec.path)
        return SourcePage(found, json.dumps(position) if more else None)
    if not spec.path:
        return SourcePage([], None)
    path = Path(spec.path)
    suffix = path.suffix.lower()
    if suffix not in TEXT and suffix not in DELIMITED and suffix not in PARQUET:
        raise SourceError(
            f"urls: unknown list format {suffix!r} of {spec.path}; use .txt (one URL per line), .csv, .tsv or .parquet"
        )
    try:
        if suffix in PARQUET:
            found, more = _parquet_page(path, position, size)
        else:
            with path.open("rb") as handle:
                if suffix in DELIMITED:
                    found, more = _delimited_page(handle, position, size, DELIMITED[suffix])
                else:
                    found, more = _text_page(handle, position, size)
    except OSError as exc:
        raise SourceError(f"urls: cannot read {spec.path}: {exc.strerror or exc}") from exc
    except csv.Error as exc:
        raise SourceError(f"urls: {spec.path} is not valid {suffix[1:].upper()}: {exc}") from exc
    return SourcePage(found, json.dumps(position) if more else None)
