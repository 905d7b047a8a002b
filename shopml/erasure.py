"""Erasure of one person: ``shopml forget --user ID``.

:func:`forget_user` takes the raw id (any notation: it is normalized and pseudonymized
as the clean stage does) and:

1. writes a new version of every table asset holding the user (curated tables by
   pseudonym; raw-zone quarantine tables by raw id) without the user's rows, then
   purges every version that still holds them (feature-table assets too, by pseudonym):
   their files and manifests are deleted,
   on a versioned bucket with every stored object version;
2. removes the user's rows from the offline feature tables (``user_recent_items`` and
   ``user_activity`` Parquet files) and the user's entity from the online store (Redis
   keys or SQLite rows of every feature view);
3. marks every model asset whose lineage names a purged version as needing retraining
   (``security/retrain/<model>@<version>.json``, see :func:`models_to_retrain`);
4. records one ``erasure.forget`` audit event per touched asset with the subject
   reference (:meth:`~shopml.security.Pseudonymizer.subject_ref`), never the raw id
   or the pseudonym.

Not covered here: copies outside the asset store, such as KFP run folders
(``$SHOPML_HOME/runs``) and the raw files a source system still holds; aggregate
features (``item_stats`` counts) keep the user's contribution as a number.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shopml.assets import MANIFEST, AssetStore, AssetVersion
from shopml.audit import AuditLog
from shopml.config import Settings
from shopml.pii import normalize_identifier
from shopml.security import Pseudonymizer
from shopml.storage import MinioStore, ObjectStore

logger = logging.getLogger(__name__)

RETRAIN_PREFIX = "security/retrain/"
#: Offline feature views keyed by user (item views hold only aggregates).
USER_FEATURE_VIEWS: tuple[str, ...] = ("user_recent_items", "user_activity")
_PRODUCER = "shopml forget"


@dataclass(frozen=True)
class ErasureResult:
    """What :func:`forget_user` removed.

    Attributes:
        subject_ref: the audit reference of the person (not the pseudonym).
        rows_removed: asset name -> rows removed from its latest version.
        new_versions: asset name -> ref of the version written without the user.
        purged_versions: refs of versions deleted because they held the user.
        offline_rows_removed: feature view -> rows removed from its offline table.
        online_entities_removed: online entries deleted (Redis keys or SQLite rows).
        models_to_retrain: model refs marked for retraining.
    """

    subject_ref: str
    rows_removed: dict[str, int] = field(default_factory=dict)
    new_versions: dict[str, str] = field(default_factory=dict)
    purged_versions: list[str] = field(default_factory=list)
    offline_rows_removed: dict[str, int] = field(default_factory=dict)
    online_entities_removed: int = 0
    models_to_retrain: list[str] = field(default_factory=list)


def forget_user(
    user_id: str,
    *,
    assets: AssetStore,
    pseudonymizer: Pseudonymizer,
    settings: Settings,
    audit: AuditLog | None = None,
) -> ErasureResult:
    """Remove one person from assets, feature stores, and flag models for retraining.

    Args:
        user_id: the raw id in any notation (email, phone, opaque id).
        assets: the asset store (its audit log, if any, is not used: erasure events go
            to ``audit``).
        pseudonymizer: the key the clean stage used.
        settings: where the feature stores live.
        audit: where to record the erasure; None records nothing.

    Returns:
        What was removed.

    Raises:
        ValueError: the id is empty.
    """
    pseudonym = pseudonymizer.pseudonymize(user_id)
    result = ErasureResult(subject_ref=pseudonymizer.subject_ref(user_id))
    matcher = _Matcher(raw_id=user_id, pseudonym=pseudonym)

    by_name: dict[str, list[AssetVersion]] = {}
    for version in assets.list():
        if version.rows is not None and version.zone in ("raw", "curated", "features"):
            by_name.setdefault(version.name, []).append(version)
    # Find every holding before writing anything: a table that cannot be read or
    # matched fails the erasure before any asset has changed.
    holdings = [(v, _holdings(assets, v, matcher)) for v in by_name.values()]
    for versions, holding in holdings:
        _erase_from_asset(assets, versions, holding, result)

    _erase_offline(settings, pseudonym, result)
    result = _with_online(result, _erase_online(settings, pseudonym))
    result.models_to_retrain.extend(
        _mark_models(assets, set(result.purged_versions), result.subject_ref)
    )
    _audit(audit, result)
    logger.info(
        "forgot subject=%s assets=%d purged=%d models_to_retrain=%d",
        result.subject_ref,
        len(result.new_versions),
        len(result.purged_versions),
        len(result.models_to_retrain),
    )
    return result


@dataclass(frozen=True)
class _Matcher:
    """Finds a person's rows: pseudonyms in curated and feature tables, raw ids in raw."""

    raw_id: str
    pseudonym: str

    def rows(self, table: pa.Table, zone: str) -> pa.Array:
        """Boolean mask of the person's rows (all False when there is no id column)."""
        mask = pa.array([False] * table.num_rows, type=pa.bool_())
        if "user_id" in table.column_names:
            ids = table.column("user_id").to_pylist()
            is_raw = zone == "raw"
            wanted = normalize_identifier(self.raw_id) if is_raw else self.pseudonym
            hits = [
                v is not None and (normalize_identifier(v) if is_raw else v) == wanted
                for v in ids
            ]
            mask = pc.or_(mask, pa.array(hits, type=pa.bool_()))
        if zone == "raw" and "raw_record" in table.column_names:
            # Whole unparsed records: the id as a token, not inside another number.
            records = pc.fill_null(table.column("raw_record"), "")
            token = rf"(^|[^0-9A-Za-z]){re.escape(self.raw_id.strip())}($|[^0-9A-Za-z])"
            found = pc.match_substring_regex(records, token, ignore_case=True)
            mask = pc.or_(mask, found.combine_chunks())
        return mask


_Holding = tuple[AssetVersion, pa.Table, pa.Array]


def _holdings(
    assets: AssetStore, versions: list[AssetVersion], matcher: _Matcher
) -> list[_Holding]:
    """The versions of one asset that hold the person, with their rows' mask."""
    holding = []
    for version in versions:
        table = assets.read_table(version.name, version.version)
        mask = matcher.rows(table, version.zone)
        if pc.any(mask).as_py():
            holding.append((version, table, mask))
    return holding


def _erase_from_asset(
    assets: AssetStore,
    versions: list[AssetVersion],
    holding: list[_Holding],
    result: ErasureResult,
) -> None:
    """New latest version without the person, then purge versions that hold them."""
    if not holding:
        return

    latest = versions[-1]
    latest_hit = next((h for h in holding if h[0] == latest), None)
    if latest_hit is not None:
        _, table, mask = latest_hit
        kept = table.filter(pc.invert(mask))
        new = assets.put_table(
            latest.name,
            latest.zone,
            kept,
            owner=latest.owner,
            classification={c["name"]: c["class"] for c in latest.schema},
            producer=_PRODUCER,
            inputs=list(latest.inputs),
            quality={**(latest.quality or {}), "erasures": result.subject_ref},
        )
        result.rows_removed[latest.name] = table.num_rows - kept.num_rows
        result.new_versions[latest.name] = new.ref
    for version, _, _ in holding:
        purge_version(assets.store, version)
        result.purged_versions.append(version.ref)


def purge_version(store: ObjectStore, version: AssetVersion) -> None:
    """Delete every file of a version, manifest first, with all stored object versions.

    Args:
        store: the object store.
        version: the asset version to remove.
    """
    keys = [version.prefix + MANIFEST] + [
        version.prefix + f["name"] for f in version.files
    ]
    for key in keys:
        purge_key(store, key)
    logger.info("purged asset=%s files=%d", version.ref, len(version.files))


def purge_key(store: ObjectStore, key: str) -> None:
    """Delete an object; on a versioned bucket delete every version of it too.

    Args:
        store: the object store.
        key: the object key.
    """
    if not isinstance(store, MinioStore):
        store.delete(key)
        return
    listed = store.client.list_objects(
        store.bucket, prefix=key, recursive=True, include_version=True
    )
    for item in listed:
        if item.object_name == key:
            store.client.remove_object(store.bucket, key, version_id=item.version_id)
    store.delete(key)


def _erase_offline(settings: Settings, pseudonym: str, result: ErasureResult) -> None:
    """Remove the person's rows from the offline tables of user-keyed feature views."""
    from shopml.feast_store import offline_root

    root = offline_root(settings).rstrip("/")
    for view in USER_FEATURE_VIEWS:
        path = f"{root}/{view}.parquet"
        table = _read_offline(path, settings)
        if table is None or "user_id" not in table.column_names:
            continue
        mask = pc.equal(table.column("user_id"), pseudonym)
        removed = int(pc.sum(pc.cast(pc.fill_null(mask, False), pa.int64())).as_py())
        if removed:
            _write_offline(
                table.filter(pc.invert(pc.fill_null(mask, False))), path, settings
            )
            result.offline_rows_removed[view] = removed


def _offline_filesystem(path: str, settings: Settings) -> tuple[Any, str]:
    """The pyarrow filesystem and in-filesystem path of an offline table."""
    if not path.startswith("s3://"):
        return None, path
    from pyarrow import fs

    if settings.s3 is None:
        raise ValueError(
            f"offline path {path!r} is on S3 but SHOPML_S3_ENDPOINT is not set"
        )
    s3 = fs.S3FileSystem(
        access_key=settings.s3.access_key,
        secret_key=settings.s3.secret_key,
        endpoint_override=settings.s3.endpoint_url,
        region=settings.s3.region,
    )
    return s3, path.removeprefix("s3://")


def _read_offline(path: str, settings: Settings) -> pa.Table | None:
    filesystem, location = _offline_filesystem(path, settings)
    try:
        return pq.read_table(location, filesystem=filesystem)
    except FileNotFoundError:
        return None


def _write_offline(table: pa.Table, path: str, settings: Settings) -> None:
    filesystem, location = _offline_filesystem(path, settings)
    pq.write_table(table, location, filesystem=filesystem)
    if filesystem is not None and settings.s3 is not None:
        # The old object version still holds the person on a versioned bucket.
        store = MinioStore(settings.s3, create_bucket=False)
        key = location.split("/", 1)[1]
        _purge_noncurrent(store, key)


def _purge_noncurrent(store: MinioStore, key: str) -> None:
    listed = store.client.list_objects(
        store.bucket, prefix=key, recursive=True, include_version=True
    )
    for item in listed:
        is_latest = str(item.is_latest).lower() == "true"
        if item.object_name == key and item.version_id and not is_latest:
            store.client.remove_object(store.bucket, key, version_id=item.version_id)


def _erase_online(settings: Settings, pseudonym: str) -> int:
    """Delete the person's entity from the online store; returns entries deleted."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from shopml.feast_store import feature_store_from_settings

    config = feature_store_from_settings(settings).config
    entity_key = serialize_entity_key(
        EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=pseudonym)]),
        entity_key_serialization_version=config.entity_key_serialization_version,
    )
    if settings.redis_url is not None:
        import redis

        client = redis.Redis.from_url(settings.redis_url)
        try:
            deleted: Any = client.delete(entity_key + config.project.encode("utf-8"))
            return int(deleted)
        finally:
            client.close()
    return _erase_sqlite(settings.feast_dir / "online.db", entity_key)


def _erase_sqlite(path: Any, entity_key: bytes) -> int:
    if not path.is_file():
        return 0
    connection = sqlite3.connect(path)
    try:
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type='table'"
            )
        ]
        deleted = 0
        for table in tables:
            columns = {
                row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')
            }
            if "entity_key" in columns:
                cursor = connection.execute(
                    f'DELETE FROM "{table}" WHERE entity_key = ?', (entity_key,)
                )
                deleted += cursor.rowcount
        connection.commit()
        return deleted
    finally:
        connection.close()


def _with_online(result: ErasureResult, deleted: int) -> ErasureResult:
    from dataclasses import replace

    return replace(result, online_entities_removed=deleted)


def _mark_models(assets: AssetStore, purged: set[str], subject_ref: str) -> list[str]:
    """Write a retraining mark for every model whose lineage names a purged version."""
    marked = []
    for version in assets.list():
        if version.zone != "models" or not purged.intersection(version.inputs):
            continue
        mark = {
            "model": version.ref,
            "reason": "trained on data erased for a subject",
            "erased_inputs": sorted(purged.intersection(version.inputs)),
            "subject_ref": subject_ref,
            "marked_at": datetime.now(UTC).isoformat(),
        }
        key = f"{RETRAIN_PREFIX}{version.name}@{version.version}.json"
        assets.store.put_bytes(key, json.dumps(mark, indent=2).encode("utf-8"))
        marked.append(version.ref)
    return marked


def models_to_retrain(store: ObjectStore) -> list[dict[str, Any]]:
    """Every retraining mark written by erasures, oldest model ref first.

    Args:
        store: the object store of the assets.

    Returns:
        The marks: ``model``, ``reason``, ``erased_inputs``, ``subject_ref``,
        ``marked_at``.
    """
    return [
        json.load(io.BytesIO(store.get_bytes(key)))
        for key in store.list(RETRAIN_PREFIX)
        if key.endswith(".json")
    ]


def _audit(audit: AuditLog | None, result: ErasureResult) -> None:
    if audit is None:
        return
    touched = sorted(
        set(result.new_versions) | {r.split("@")[0] for r in result.purged_versions}
    )
    for name in touched:
        audit.record(
            None,
            "erasure.forget",
            result.new_versions.get(name, name),
            "success",
            subject_ref=result.subject_ref,
            rows_removed=result.rows_removed.get(name, 0),
            purged=[r for r in result.purged_versions if r.split("@")[0] == name],
        )
    audit.record(
        None,
        "erasure.forget",
        "feature_store",
        "success",
        subject_ref=result.subject_ref,
        offline_rows_removed=result.offline_rows_removed,
        online_entities_removed=result.online_entities_removed,
        models_to_retrain=result.models_to_retrain,
    )
