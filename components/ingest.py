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
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from kfp import dsl

from components.common import stage_component
from shopml.datasets import fetch_movielens_100k, read_table_file
from shopml.schemas import SOURCE_FILE, SOURCE_ROW, coerce_table

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
        if cache_dir is not None:
            tables, inputs = _movielens_tables(cache_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="shopml-movielens-") as tmp:
                tables, inputs = _movielens_tables(Path(tmp))
    elif source == "files":
        tables, inputs = _file_tables(events_path, catalog_path, users_path)
    else:
        raise ValueError(f"source {source!r} is unknown; use one of {list(SOURCES)}")

    files, rows = {}, {}
    for kind, table in tables.items():
        files[kind] = out_dir / f"{kind}.parquet"
        pq.write_table(table, files[kind])
        rows[kind] = table.num_rows
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


def _file_tables(
    events_path: str, catalog_path: str, users_path: str
) -> tuple[dict[str, pa.Table], list[str]]:
    required = {"events": events_path, "catalog": catalog_path}
    missing = [kind for kind, path in required.items() if not path]
    if missing:
        raise ValueError(
            f"source 'files' needs a path for {missing}; events and catalog are "
            "required"
        )
    paths = dict(required, users=users_path) if users_path else required

    tables, inputs = {}, []
    for kind, path_text in paths.items():
        path = Path(path_text)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} file {path_text!r} does not exist")
        tables[kind] = read_table_file(path, kind)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        inputs.append(f"{path.name}@{digest}")
    return tables, inputs


@stage_component
def ingest(
    source: str,
    events_uri: str,
    catalog_uri: str,
    users_uri: str,
    raw: dsl.Output[dsl.Dataset],
) -> None:
    """Collect the source tables (a public dataset or your files) into a raw dataset."""
    import os
    import tempfile
    from pathlib import Path

    from components.ingest import ingest_sources
    from shopml.config import load_settings
    from shopml.logs import configure_logging
    from shopml.storage import download_uri

    configure_logging()
    settings = load_settings()
    os.makedirs(raw.path, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shopml-ingest-") as tmp:
        local = {
            name: str(download_uri(uri, Path(tmp) / name, settings)) if uri else ""
            for name, uri in (
                ("events", events_uri),
                ("catalog", catalog_uri),
                ("users", users_uri),
            )
        }
        result = ingest_sources(
            source,
            Path(raw.path),
            events_path=local["events"],
            catalog_path=local["catalog"],
            users_path=local["users"],
            cache_dir=settings.home / "datasets" / "movielens-100k",
        )
    raw.metadata.update({f"{kind}_rows": n for kind, n in result.rows.items()})
    raw.metadata["source"] = source
    raw.metadata["inputs"] = result.inputs
