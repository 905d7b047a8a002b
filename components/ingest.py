"""Ingest stage: collect the source tables into the raw zone, unchanged in content.

The core, :func:`ingest_sources`, writes ``events.parquet``, ``catalog.parquet`` and,
when there is one, ``users.parquet`` into a folder. Tables keep raw ids and every
value, readable or not (see :func:`shopml.datasets.read_table_file`), plus their origin
(``_source_file``, ``_source_row``) so the clean stage can say where a quarantined row
came from. Sources:

* ``movielens-100k``: the public dataset (:func:`shopml.datasets.fetch_movielens_100k`);
* ``files``: a user's CSV, JSONL or Parquet files (events and catalog required).

The KFP component :func:`ingest` wraps the core; URIs may be local paths or ``s3://``.
"""

import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from kfp import dsl

from components.common import stage_component
from shopml.assets import AssetStore
from shopml.clean_events import PARQUET_OPTIONS
from shopml.datasets import fetch_movielens_100k, iter_table_file
from shopml.lineage import LineageDataset, parquet_dataset, start_run
from shopml.processing import prefetch
from shopml.schemas import SOURCE_FILE, SOURCE_ROW, classify_columns, coerce_table

logger = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("movielens-100k", "files")


@dataclass(frozen=True)
class IngestResult:
    """What the ingest stage wrote.

    Attributes:
        source: ``movielens-100k`` or ``files``.
        files: table kind -> Parquet file in the output folder.
        rows: table kind -> row count.
        inputs: lineage of the sources, ``["name@version", ...]`` (a dataset and its
            release, or a file name and the first 16 hex of its sha256).
    """

    source: str
    files: dict[str, Path]
    rows: dict[str, int]
    inputs: list[str] = field(default_factory=list)


def ingest_sources(
    source: str,
    out_dir: Path,
    *,
    events_path: str = "",
    catalog_path: str = "",
    users_path: str = "",
    cache_dir: Path | None = None,
) -> IngestResult:
    """Collect the source tables into ``out_dir`` as raw Parquet files.

    Args:
        source: ``movielens-100k`` or ``files``.
        out_dir: output folder (created).
        events_path: events file, required when ``source`` is ``files``.
        catalog_path: catalog file, required when ``source`` is ``files``.
        users_path: optional users file when ``source`` is ``files``.
        cache_dir: where a downloaded dataset is kept between runs; None downloads
            into a temporary folder removed afterwards.

    Returns:
        The files written, their row counts and the lineage of the sources.

    Raises:
        ValueError: unknown source, a missing required path, or paths given for a
            public dataset.
    """
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    if source == "movielens-100k":
        if events_path or catalog_path or users_path:
            raise ValueError(
                "source 'movielens-100k' takes no file paths; use source 'files' to "
                "ingest your own events/catalog/users"
            )
        rows: dict[str, int] = {}
        tables: dict[str, pa.Table]
        if cache_dir is not None:
            tables, inputs = _movielens_tables(cache_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="shopml-movielens-") as tmp:
                tables, inputs = _movielens_tables(Path(tmp))
    elif source == "files":
        tables = {}
        rows, inputs = _stream_files(events_path, catalog_path, users_path, out_dir)
    else:
        raise ValueError(f"source {source!r} is unknown; use one of {list(SOURCES)}")

    files = {kind: out_dir / f"{kind}.parquet" for kind in rows}
    for kind, table in tables.items():
        files[kind] = out_dir / f"{kind}.parquet"
        pq.write_table(table, files[kind], **PARQUET_OPTIONS)
        rows[kind] = table.num_rows
    run = start_run("ingest", [LineageDataset(name=i) for i in inputs])
    run.complete([parquet_dataset(path) for path in files.values()])
    logger.info(
        "ingest source=%s rows=%s inputs=%s in %.1f s",
        source,
        rows,
        inputs,
        time.monotonic() - started,
    )
    return IngestResult(source=source, files=files, rows=rows, inputs=inputs)


def _movielens_tables(cache_dir: Path) -> tuple[dict[str, pa.Table], list[str]]:
    dataset = fetch_movielens_100k(cache_dir)
    tables = {}
    for kind in ("events", "catalog", "users"):
        table = coerce_table(pq.read_table(getattr(dataset, kind)), kind)
        tables[kind] = _with_origin(table, dataset.source_files[kind])
    return tables, [f"movielens-100k@{dataset.source}"]


def _with_origin(table: pa.Table, source_file: str) -> pa.Table:
    """Name the origin of every row: the source file and its 1-based record number."""
    table = table.append_column(
        SOURCE_FILE, pa.array([source_file] * table.num_rows, pa.string())
    )
    return table.append_column(
        SOURCE_ROW, pa.array(range(1, table.num_rows + 1), pa.int64())
    )


def _stream_files(
    events_path: str, catalog_path: str, users_path: str, out_dir: Path
) -> tuple[dict[str, int], list[str]]:
    """Stream each file into ``out_dir/<kind>.parquet`` chunk by chunk."""
    required = {"events": events_path, "catalog": catalog_path}
    missing = [kind for kind, path in required.items() if not path]
    if missing:
        raise ValueError(
            f"source 'files' needs a path for {missing}; events and catalog are "
            "required"
        )
    paths = dict(required, users=users_path) if users_path else required

    rows, inputs = {}, []
    for kind, path_text in paths.items():
        path = Path(path_text)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} file {path_text!r} does not exist")
        try:
            rows[kind] = _write_chunks(
                iter_table_file(path, kind), out_dir / f"{kind}.parquet"
            )
        except pa.ArrowInvalid as err:
            raise ValueError(
                f"{kind} file {path_text!r} cannot be read: {err}"
            ) from err
        if rows[kind] == 0:
            raise ValueError(
                f"{kind} file {path_text!r} holds no rows (empty, or a header only)"
            )
        inputs.append(f"{path.name}@{file_digest(path)[:16]}")
    return rows, inputs


#: Chunks read ahead of the writer (each up to ``shopml.datasets.CHUNK_ROWS`` rows).
PREFETCH_CHUNKS = 1


def _write_chunks(chunks: Iterator[pa.Table], target: Path) -> int:
    """Write chunks of one schema to a Parquet file; returns the row count.

    The next chunk is read (and coerced) in a thread while this one is written, so
    reading and writing use a core each; at most :data:`PREFETCH_CHUNKS` + 2 chunks
    are held, so memory does not grow with the file.
    """
    total = 0
    writer: pq.ParquetWriter | None = None
    try:
        for chunk in prefetch(chunks, PREFETCH_CHUNKS):
            if writer is None:
                writer = pq.ParquetWriter(target, chunk.schema, **PARQUET_OPTIONS)
            writer.write_table(chunk.cast(writer.schema))
            total += chunk.num_rows
    finally:
        if writer is not None:
            writer.close()
    return total


def file_digest(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


RAW_PREFIX = "raw_"


def register_raw_tables(
    raw_dir: Path, assets: AssetStore, inputs: list[str], *, producer: str
) -> list[str]:
    """Store the ingested tables as ``raw_<kind>`` assets in zone ``raw``.

    Lineage then starts at the source file: each raw asset's inputs are the sources
    (``file@sha256``), and later stages name the raw assets as their inputs.

    Args:
        raw_dir: the folder :func:`ingest_sources` wrote.
        assets: the asset store.
        inputs: lineage of the sources.
        producer: the stage or run that writes.

    Returns:
        The raw assets' refs (``raw_events@<version>``, ...).
    """
    refs = []
    for kind in ("events", "catalog", "users"):
        path = raw_dir / f"{kind}.parquet"
        if not path.is_file():
            continue
        asset = assets.put_table_file(
            RAW_PREFIX + kind,
            "raw",
            path,
            owner="shopml-data",
            classification=classify_columns(kind, pq.read_schema(path).names),
            producer=producer,
            inputs=list(inputs),
            quality={"rows": pq.read_metadata(path).num_rows},
        )
        refs.append(asset.ref)
    return refs


def raw_refs_by_kind(refs: list[str]) -> dict[str, str]:
    """``["raw_events@v", ...]`` as ``{"events": "raw_events@v", ...}``."""
    return {ref.split("@", 1)[0].removeprefix(RAW_PREFIX): ref for ref in refs}


def fetch_raw_tables(refs: dict[str, str], assets: AssetStore, dest: Path) -> Path:
    """Download the raw tables an ingest run stored into ``dest/<kind>.parquet``.

    Args:
        refs: table kind -> raw asset ref, as the ingest stage wrote them.
        assets: the asset store.
        dest: folder to fill (created); keep it in scratch space, it holds raw rows.

    Returns:
        ``dest``, laid out as :func:`ingest_sources` writes a raw folder.
    """
    from shopml.assets import fetch_table_file

    dest.mkdir(parents=True, exist_ok=True)
    for kind, ref in refs.items():
        fetch_table_file(assets, ref, dest / f"{kind}.parquet")
    return dest


@stage_component
def ingest(
    source: str,
    events_uri: str,
    catalog_uri: str,
    users_uri: str,
    raw: dsl.Output[dsl.Dataset],
) -> None:
    """Collect the source tables (a public dataset or your files) into the raw zone.

    The raw tables hold personal data, so they are stored only as `raw_<table>` assets
    in the restricted raw zone; `raw` (the KFP artifact) holds their refs.
    """
    import tempfile
    from pathlib import Path

    from components.ingest import (
        ingest_sources,
        raw_refs_by_kind,
        register_raw_tables,
    )
    from shopml.assets import asset_store_from_settings, write_refs
    from shopml.config import load_settings
    from shopml.logs import configure_logging
    from shopml.storage import download_uri

    configure_logging()
    settings = load_settings()
    assets = asset_store_from_settings(settings)
    # Raw tables hold personal data: they go to the restricted raw zone only, and
    # the KFP artifact carries their refs (versions.json), never the rows.
    with tempfile.TemporaryDirectory(prefix="shopml-ingest-") as tmp:
        local = {
            name: str(download_uri(uri, Path(tmp) / name, settings)) if uri else ""
            for name, uri in (
                ("events", events_uri),
                ("catalog", catalog_uri),
                ("users", users_uri),
            )
        }
        staged = Path(tmp) / "raw"
        result = ingest_sources(
            source,
            staged,
            events_path=local["events"],
            catalog_path=local["catalog"],
            users_path=local["users"],
            cache_dir=settings.home / "datasets" / "movielens-100k",
        )
        refs = register_raw_tables(staged, assets, result.inputs, producer="kfp:ingest")
    write_refs(Path(raw.path), raw_refs_by_kind(refs))
    raw.metadata.update({f"{kind}_rows": n for kind, n in result.rows.items()})
    raw.metadata["source"] = source
    raw.metadata["sources"] = result.inputs
    raw.metadata["inputs"] = refs
