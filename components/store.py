"""Store stage: publish curated tables and the quarantine as versioned assets.

The core, :func:`store_tables`, puts curated ``events``, ``catalog`` and ``users`` in
zone ``curated`` and the quarantine tables (raw ids, restricted) in zone ``raw`` as
``quarantine_<table>``, with column classes from :mod:`shopml.schemas` and owner
``shopml-data``. Versions are content hashes, so storing the same tables again writes
nothing new. Files are never loaded whole:
:meth:`~shopml.assets.AssetStore.put_table_file` hashes a Parquet file in blocks,
reads rows and schema from its footer and uploads it as it is (the clean stage writes
it deterministically). The KFP component :func:`store` hands the curated tables on to
later stages with ``versions.json`` naming what was stored.
"""

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
from kfp import dsl

from components.common import stage_component
from shopml.assets import AssetStore, AssetVersion, read_refs
from shopml.lineage import asset_dataset, parquet_dataset, start_run
from shopml.schemas import classify_columns

logger = logging.getLogger(__name__)

OWNER = "shopml-data"
TABLES: tuple[str, ...] = ("events", "catalog", "users")
QUARANTINE_PREFIX = "quarantine_"
RAW_PREFIX = "raw_"


def store_tables(
    curated_dir: Path,
    quarantine_dir: Path,
    assets: AssetStore,
    *,
    producer: str,
    inputs: list[str],
    transforms: dict[str, object] | None = None,
) -> dict[str, AssetVersion]:
    """Store every curated and quarantine table present as an asset version.

    Args:
        curated_dir: ``events.parquet``, ``catalog.parquet`` and optionally
            ``users.parquet`` from the clean stage.
        quarantine_dir: the matching quarantine tables, or the ``versions.json`` of
            quarantine versions the clean stage stored itself (then only linked).
        assets: the asset store.
        producer: the stage or run that writes, recorded in each manifest.
        inputs: lineage of the sources (``["name@version", ...]``).
        transforms: what cleaning did to sensitive columns (pseudonymization key id,
            masked or dropped columns), recorded with every curated version.

    Returns:
        Asset name -> version: ``events``, ``catalog``, ``users`` and
        ``quarantine_<table>`` for the tables present.

    Raises:
        FileNotFoundError: curated events or catalog are missing.
    """
    stored: dict[str, AssetVersion] = {}
    run = start_run(
        "store", [parquet_dataset(p) for p in sorted(curated_dir.glob("*.parquet"))]
    )
    checks = _checks(curated_dir / "quality.json")
    # Quarantine first, so a curated version's lineage can name it.
    refs = read_refs(quarantine_dir)
    if refs is None:
        stored |= store_quarantine(
            quarantine_dir, assets, producer=producer, inputs=inputs
        )
    else:  # the clean stage stored it already, in the restricted raw zone
        stored |= {name: assets.get(*ref.split("@")) for name, ref in refs.items()}
    for kind in TABLES:
        path = curated_dir / f"{kind}.parquet"
        if not path.is_file():
            if kind == "users":
                continue
            raise FileNotFoundError(
                f"curated table {kind} is missing: {path} does not exist"
            )

        quarantine_name = QUARANTINE_PREFIX + kind
        names = pq.read_schema(path).names
        stored[kind] = assets.put_table_file(
            kind,
            "curated",
            path,
            owner=OWNER,
            classification=classify_columns(kind, names, curated=True),
            producer=producer,
            inputs=table_inputs(kind, inputs),
            quality=_quality(
                pq.read_metadata(path).num_rows, stored.get(quarantine_name)
            )
            | (transforms or {})
            | ({"checks": checks[kind]} if kind in checks else {}),
        )
    logger.info("stored %s", ", ".join(v.ref for v in stored.values()))
    run.complete([asset_dataset(v) for v in stored.values()])
    return stored


def table_inputs(kind: str, inputs: list[str]) -> list[str]:
    """The inputs a table of ``kind`` really comes from, for its lineage.

    Raw tables are matched by name: ``events`` come from ``raw_events`` and, through
    the referential check, ``raw_catalog``; ``catalog`` and ``users`` from their own raw
    table. Inputs that are not raw tables (source files) are kept.
    """
    own = {"events": {"events", "catalog"}}.get(kind, {kind})
    kept = []
    for ref in inputs:
        name = ref.split("@", 1)[0]
        if not name.startswith(RAW_PREFIX) or name[len(RAW_PREFIX) :] in own:
            kept.append(ref)
    return kept


def store_quarantine(
    quarantine_dir: Path, assets: AssetStore, *, producer: str, inputs: list[str]
) -> dict[str, AssetVersion]:
    """Store each quarantine table present as ``quarantine_<table>`` in zone ``raw``.

    Quarantined rows keep their raw fields (ids, free text), so they live only in the
    restricted raw zone.

    Returns:
        Asset name -> version for the tables present.
    """
    stored = {}
    for kind in TABLES:
        path = quarantine_dir / f"{kind}.parquet"
        if not path.is_file():
            continue
        stored[QUARANTINE_PREFIX + kind] = assets.put_table_file(
            QUARANTINE_PREFIX + kind,
            "raw",
            path,
            owner=OWNER,
            classification=quarantine_classes(kind, pq.read_schema(path).names),
            producer=producer,
            inputs=table_inputs(kind, inputs),
            quality={"rows": pq.read_metadata(path).num_rows},
        )
    return stored


def _checks(path: Path) -> dict[str, object]:
    """Per-table quality checks from the clean stage's ``quality.json``, if any."""
    if not path.is_file():
        return {}
    tables: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))["tables"]
    return tables


def quarantine_classes(kind: str, names: list[str]) -> dict[str, str]:
    """Data classes of a quarantine table: raw columns as in the raw zone.

    ``raw_record`` holds whole unparsed records, possibly with raw ids, so it is
    ``pii``; the bookkeeping columns are ``internal``.
    """
    classes = classify_columns(kind, names)
    for name in names:
        if name == "raw_record":
            classes[name] = "pii"
        elif name in _QUARANTINE_BOOKKEEPING:
            classes[name] = "internal"
    return classes


_QUARANTINE_BOOKKEEPING = frozenset({"reason", "source_file", "source_row"})


def _quality(rows_kept: int, quarantine: AssetVersion | None) -> dict[str, object]:
    quality: dict[str, object] = {"rows_kept": rows_kept}
    if quarantine is not None:
        quality["rows_quarantined"] = quarantine.rows
        quality["quarantine"] = quarantine.ref
    return quality


@stage_component
def store(
    curated: dsl.Input[dsl.Dataset],
    quarantine: dsl.Input[dsl.Dataset],
    stored: dsl.Output[dsl.Dataset],
) -> None:
    """Version curated tables and the quarantine in the asset store; pass tables on."""
    import json
    import os
    import shutil
    from pathlib import Path

    from components.store import TABLES, store_tables
    from shopml.assets import asset_store_from_settings
    from shopml.config import load_settings
    from shopml.logs import configure_logging

    configure_logging()
    assets = asset_store_from_settings(load_settings())
    transforms = {
        key: curated.metadata[key]
        for key in ("key_id", "column_transforms")
        if key in curated.metadata
    }
    versions = store_tables(
        Path(curated.path),
        Path(quarantine.path),
        assets,
        producer="kfp:store",
        inputs=list(curated.metadata.get("inputs", [])),
        transforms=transforms,
    )

    os.makedirs(stored.path, exist_ok=True)
    for kind in TABLES:
        source = Path(curated.path) / f"{kind}.parquet"
        if source.is_file():
            shutil.copyfile(source, Path(stored.path) / f"{kind}.parquet")
    refs = {name: version.ref for name, version in versions.items()}
    (Path(stored.path) / "versions.json").write_text(json.dumps(refs, indent=2))
    stored.metadata.update(refs)
