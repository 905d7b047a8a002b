"""Versioned data and model assets on top of an object store.

An asset version is immutable and content-addressed: its version is the first 16 hex
characters of the sha256 of its content (the canonical Parquet bytes of a table, or the
sorted file names and contents of a folder). Layout in the store::

    <zone>/<name>/<version>/data.parquet        (a table), or the folder's files
    <zone>/<name>/<version>/_manifest.json      written last: the version exists once
                                                 its manifest does

Zones are ``raw`` (restricted: raw ids, quarantine), ``curated``, ``features`` and
``models``. Writing the same content twice writes nothing the second time and returns
the first version, so re-running a stage on the same input yields the same version.
Parquet bytes are stable for a given pyarrow release (pinned in ``constraints.txt``):
the file records the writer version in ``created_by``, which no option overrides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from shopml.retention import check_keep_last, expired
from shopml.schemas import CLASSES
from shopml.storage import ObjectStore

if TYPE_CHECKING:
    from shopml.audit import AuditLog
    from shopml.config import Settings

logger = logging.getLogger(__name__)

ZONES: tuple[str, ...] = ("raw", "curated", "features", "models")
MANIFEST = "_manifest.json"
TABLE_FILE = "data.parquet"
_NAME_PATTERN = re.compile(r"[a-z0-9_-]+")
_VERSION_CHARS = 16


@dataclass(frozen=True)
class AssetVersion:
    """One immutable version of an asset, as recorded in its manifest.

    Attributes:
        name: asset name, ``[a-z0-9_-]+``.
        zone: ``raw``, ``curated``, ``features`` or ``models``.
        version: 16 hex characters of the content hash.
        created_at: ISO-8601 UTC time the version was first written.
        rows: row count of a table; None for a folder.
        bytes: total size of the stored files.
        schema: ``[{"name", "type", "class"}, ...]`` per column (empty for a folder).
        owner: team or person answerable for the asset.
        producer: the stage or command that wrote it.
        inputs: lineage, ``["name@version", ...]``.
        quality: checks and counts from the producer, if any.
        files: ``[{"name", "sha256", "bytes"}, ...]`` relative to the version folder.
    """

    name: str
    zone: str
    version: str
    created_at: str
    rows: int | None
    bytes: int
    schema: list[dict[str, str]]
    owner: str
    producer: str
    inputs: list[str]
    quality: dict[str, Any] | None = None
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """``name@version``, the form lineage records use."""
        return f"{self.name}@{self.version}"

    @property
    def prefix(self) -> str:
        """Key prefix of the version's files, ending in ``/``."""
        return f"{self.zone}/{self.name}/{self.version}/"

    def to_json(self) -> str:
        """The manifest text."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AssetVersion:
        """Read a manifest."""
        return cls(**json.loads(text))


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialize a table to Parquet deterministically: same table, same bytes.

    Schema metadata (e.g. the pandas block that records its version) is removed, chunks
    are combined, and compression, row-group size, format and page versions are fixed.

    Args:
        table: the table.

    Returns:
        The Parquet file content.
    """
    table = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=1_000_000,
        version="2.6",
        compression="zstd",
        compression_level=3,
        use_dictionary=True,
        write_statistics=True,
        data_page_version="1.0",
        store_schema=True,
    )
    return bytes(sink.getvalue().to_pybytes())


def check_name(name: str) -> str:
    """Validate an asset name (``[a-z0-9_-]+``) and return it.

    Raises:
        ValueError: the name has other characters or is empty.
    """
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"asset name {name!r} is invalid; use lowercase letters, digits, _ and -"
        )
    return name


def _check_zone(zone: str) -> str:
    if zone not in ZONES:
        raise ValueError(f"asset zone {zone!r} is unknown; use one of {list(ZONES)}")
    return zone


def _file_entry(name: str, data: bytes) -> dict[str, Any]:
    return {
        "name": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }


class AssetStore:
    """Versioned assets in an :class:`~shopml.storage.ObjectStore`.

    Args:
        store: where the bytes live.
        audit: when given, every version written or read is recorded there
            (``asset.write`` / ``asset.read``, see :mod:`shopml.audit`).
    """

    def __init__(self, store: ObjectStore, audit: AuditLog | None = None) -> None:
        self.store = store
        self.audit = audit

    def put_table(
        self,
        name: str,
        zone: str,
        table: pa.Table,
        *,
        owner: str,
        classification: dict[str, str],
        producer: str,
        inputs: list[str],
        quality: dict[str, Any] | None = None,
    ) -> AssetVersion:
        """Store a table as a new version, or return the stored one with equal content.

        Args:
            name: asset name, ``[a-z0-9_-]+``, unique across zones.
            zone: ``raw``, ``curated``, ``features`` or ``models``.
            table: the content.
            owner: team or person answerable for it.
            classification: data class of every column (``public``, ``internal``,
                ``pii``, ``sensitive``).
            producer: the stage or command writing it.
            inputs: lineage, ``["name@version", ...]``.
            quality: checks and counts to record.

        Returns:
            The version, new or existing.

        Raises:
            ValueError: bad name or zone, a column without a valid class, or the name is
                taken in another zone.
        """
        self._check_target(name, zone)
        with tempfile.TemporaryDirectory(prefix="shopml-asset-") as tmp:
            path = Path(tmp) / TABLE_FILE
            path.write_bytes(parquet_bytes(table))
            return self.put_table_file(
                name, zone, path, owner=owner, classification=classification,
                producer=producer, inputs=inputs, quality=quality,
            )  # fmt: skip

    def put_dir(
        self,
        name: str,
        zone: str,
        folder: Path,
        *,
        owner: str,
        classification: dict[str, str] | None = None,
        producer: str,
        inputs: list[str],
        quality: dict[str, Any] | None = None,
    ) -> AssetVersion:
        """Store every file under ``folder`` as one version (a model, a feature export).

        The version hashes the sorted relative file names with their contents.

        Args:
            name: asset name, ``[a-z0-9_-]+``, unique across zones.
            zone: ``raw``, ``curated``, ``features`` or ``models``.
            folder: the files; subfolders keep their relative paths.
            owner: team or person answerable for it.
            classification: optional class per file or column, recorded as the schema.
            producer: the stage or command writing it.
            inputs: lineage, ``["name@version", ...]``.
            quality: checks and metrics to record.

        Returns:
            The version, new or existing.

        Raises:
            ValueError: bad name or zone, an empty folder, the name taken in another
                zone, or a file named like the manifest.
        """
        self._check_target(name, zone)
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        if not files:
            raise ValueError(
                f"folder {str(folder)!r} for asset {name!r} holds no files"
            )
        relative = [p.relative_to(folder).as_posix() for p in files]
        if MANIFEST in relative:
            raise ValueError(f"folder {str(folder)!r} holds a file named {MANIFEST!r}")

        digest = hashlib.sha256()
        entries = []
        for rel, path in zip(relative, files, strict=True):
            data = path.read_bytes()
            entries.append(_file_entry(rel, data))
            digest.update(f"{rel}\0{len(data)}\0".encode())
            digest.update(data)
        version = digest.hexdigest()[:_VERSION_CHARS]
        existing = self._existing(zone, name, version)
        if existing is not None:
            return existing

        prefix = f"{zone}/{name}/{version}/"
        for rel, path in zip(relative, files, strict=True):
            self.store.put_file(prefix + rel, path)
        return self._commit(
            AssetVersion(
                name=name,
                zone=zone,
                version=version,
                created_at=datetime.now(UTC).isoformat(),
                rows=None,
                bytes=sum(int(e["bytes"]) for e in entries),
                schema=[
                    {"name": k, "type": "file", "class": v}
                    for k, v in sorted((classification or {}).items())
                ],
                owner=owner,
                producer=producer,
                inputs=list(inputs),
                quality=quality,
                files=entries,
            )
        )

    def put_table_file(
        self,
        name: str,
        zone: str,
        path: Path,
        *,
        owner: str,
        classification: dict[str, str],
        producer: str,
        inputs: list[str],
        quality: dict[str, Any] | None = None,
    ) -> AssetVersion:
        """Store a Parquet file as a table version without loading it.

        Like :meth:`put_table`, but the version is the sha256 of the file as it is
        (read in 1 MiB blocks), rows and schema come from its footer and the file is
        uploaded by path; the same file gives the same version. Memory stays flat
        whatever the file's size.

        Args:
            name: asset name, ``[a-z0-9_-]+``, unique across zones.
            zone: ``raw``, ``curated``, ``features`` or ``models``.
            path: the Parquet file.
            owner: team or person answerable for it.
            classification: data class of every column.
            producer: the stage or command writing it.
            inputs: lineage, ``["name@version", ...]``.
            quality: checks and counts to record.

        Returns:
            The version, new or existing.

        Raises:
            ValueError: bad name or zone, a column without a valid class, or the name
                is taken in another zone.
        """
        self._check_target(name, zone)
        metadata = pq.read_metadata(path)
        schema = _describe_schema(metadata.schema.to_arrow_schema(), classification)
        digest = hashlib.sha256()
        with Path(path).open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        version = digest.hexdigest()[:_VERSION_CHARS]
        existing = self._existing(zone, name, version)
        if existing is not None:
            return existing

        size = Path(path).stat().st_size
        asset = AssetVersion(
            name=name,
            zone=zone,
            version=version,
            created_at=datetime.now(UTC).isoformat(),
            rows=metadata.num_rows,
            bytes=size,
            schema=schema,
            owner=owner,
            producer=producer,
            inputs=list(inputs),
            quality=quality,
            files=[{"name": TABLE_FILE, "sha256": digest.hexdigest(), "bytes": size}],
        )
        # Data first, manifest last (in _commit): no reader sees a partial version.
        self.store.put_file(asset.prefix + TABLE_FILE, Path(path))
        return self._commit(asset)

    def get(self, name: str, version: str | None = None) -> AssetVersion:
        """Look up one version of an asset.

        Args:
            name: asset name.
            version: the version; None picks the latest by creation time.

        Returns:
            The version's manifest.

        Raises:
            KeyError: no such asset or version (a version without a manifest does
                not exist).
        """
        versions = self.versions(name)
        if not versions:
            raise KeyError(f"asset {name!r} has no versions in the store")
        if version is None:
            return versions[-1]
        for candidate in versions:
            if candidate.version == version:
                return candidate
        known = ", ".join(v.version for v in versions)
        raise KeyError(f"asset {name!r} has no version {version!r}; it has {known}")

    def versions(self, name: str) -> list[AssetVersion]:
        """Every committed version of ``name``, oldest first."""
        check_name(name)
        found = [
            self._read_manifest(key)
            for zone in ZONES
            for key in self.store.list(f"{zone}/{name}/")
            if _is_manifest_of(key, zone, name)
        ]
        return sorted(found, key=lambda v: (v.created_at, v.version))

    def list(self) -> list[AssetVersion]:
        """Every committed version of every asset, by name then creation time."""
        found = [
            self._read_manifest(key)
            for zone in ZONES
            for key in self.store.list(f"{zone}/")
            if key.endswith("/" + MANIFEST) and key.count("/") == 3
        ]
        return sorted(found, key=lambda v: (v.name, v.created_at, v.version))

    def read_table(self, name: str, version: str | None = None) -> pa.Table:
        """Read a table asset, checking its bytes against the manifest.

        Args:
            name: asset name.
            version: the version; None for the latest.

        Returns:
            The table.

        Raises:
            KeyError: no such asset or version.
            ValueError: the asset is not a table, or its data does not match its
                manifest.
        """
        asset = self.get(name, version)
        entry = next((f for f in asset.files if f["name"] == TABLE_FILE), None)
        if entry is None:
            raise ValueError(
                f"asset {asset.ref} is a folder, not a table; use fetch_dir"
            )
        data = self.store.get_bytes(asset.prefix + TABLE_FILE)
        self._verify_read(asset, entry, data)
        self._record("asset.read", asset, "success", files=1)
        return pq.read_table(pa.BufferReader(data))

    def fetch_dir(self, name: str, version: str | None, dest: Path) -> AssetVersion:
        """Download every file of a version into ``dest``, each checked by its sha256.

        Args:
            name: asset name.
            version: the version; None for the latest.
            dest: folder to fill (created).

        Returns:
            The version fetched.

        Raises:
            KeyError: no such asset or version.
            ValueError: a file does not match the manifest.
        """
        asset = self.get(name, version)
        dest.mkdir(parents=True, exist_ok=True)
        for entry in asset.files:
            data = self.store.get_bytes(asset.prefix + entry["name"])
            self._verify_read(asset, entry, data)
            target = dest / entry["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        logger.info(
            "fetched asset=%s files=%d into %s", asset.ref, len(asset.files), dest
        )
        self._record("asset.read", asset, "success", files=len(asset.files))
        return asset

    def _check_target(self, name: str, zone: str) -> None:
        check_name(name)
        _check_zone(zone)
        for other in ZONES:
            if other != zone and any(
                _is_manifest_of(key, other, name)
                for key in self.store.list(f"{other}/{name}/")
            ):
                raise ValueError(
                    f"asset {name!r} already lives in zone {other!r}, not {zone!r}"
                )

    def _existing(self, zone: str, name: str, version: str) -> AssetVersion | None:
        key = f"{zone}/{name}/{version}/{MANIFEST}"
        if not self.store.exists(key):
            return None
        logger.info("asset=%s@%s unchanged; nothing written", name, version)
        asset = self._read_manifest(key)
        self._record("asset.write", asset, "unchanged", zone=zone)
        return asset

    def _commit(self, asset: AssetVersion) -> AssetVersion:
        self.store.put_bytes(asset.prefix + MANIFEST, asset.to_json().encode("utf-8"))
        logger.info(
            "stored asset=%s zone=%s rows=%s bytes=%d at %s",
            asset.ref,
            asset.zone,
            asset.rows,
            asset.bytes,
            self.store.uri(asset.prefix + MANIFEST),
        )
        self._record(
            "asset.write",
            asset,
            "success",
            zone=asset.zone,
            rows=asset.rows,
            bytes=asset.bytes,
            producer=asset.producer,
        )
        return asset

    def _verify_read(
        self, asset: AssetVersion, entry: dict[str, Any], data: bytes
    ) -> None:
        """Check a file against the manifest; a mismatch is audited as a failure."""
        try:
            _verify(asset, entry, data)
        except ValueError:
            self._record("asset.read", asset, "failure", file=entry["name"])
            raise

    def _record(
        self, action: str, asset: AssetVersion, outcome: str, **details: Any
    ) -> None:
        if self.audit is not None:
            self.audit.record(None, action, asset.ref, outcome, **details)

    def _read_manifest(self, key: str) -> AssetVersion:
        return AssetVersion.from_json(self.store.get_bytes(key).decode("utf-8"))


LIVE_POINTER = "_live"


def mark_live(assets: AssetStore, name: str, version: str) -> str:
    """Record that a model version is live (served); retention never prunes it.

    The pointer is ``models/<name>/_live`` (JSON with the version and when), written by
    the deploy stage once the endpoint serves the version.

    Args:
        assets: the asset store.
        name: the model asset, e.g. ``recommender``.
        version: the version now served.

    Returns:
        The model's ref, ``name@version``.

    Raises:
        KeyError: the model version does not exist.
    """
    asset = assets.get(name, version)
    if asset.zone != "models":
        raise ValueError(f"asset {asset.ref} is in zone {asset.zone!r}, not 'models'")
    record = {"version": version, "since": datetime.now(UTC).isoformat()}
    assets.store.put_bytes(f"models/{name}/{LIVE_POINTER}", json.dumps(record).encode())
    logger.info("model=%s marked live", asset.ref)
    return asset.ref


def live_refs(assets: AssetStore) -> set[str]:
    """Refs of live models and, transitively, of every asset version they came from."""
    pending = []
    for key in assets.store.list("models/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == LIVE_POINTER:
            version = json.loads(assets.store.get_bytes(key))["version"]
            pending.append(f"{parts[1]}@{version}")
    known = {v.ref: v for v in assets.list()}
    protected: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in protected:
            continue
        protected.add(ref)
        if ref in known:
            pending.extend(known[ref].inputs)
    return protected


def prune_versions(
    assets: AssetStore, *, keep_last: int = 3, dry_run: bool = False
) -> list[AssetVersion]:
    """Delete old versions, keeping the newest per asset and everything live.

    A version is deleted manifest first, so it disappears at once for readers; a crash
    mid-way leaves only unreferenced files, never a visible half version.

    Args:
        assets: the asset store.
        keep_last: newest versions kept per asset (at least 1).
        dry_run: only say what would be deleted.

    Returns:
        The versions deleted (or that would be).

    Raises:
        ValueError: ``keep_last`` is below 1.
    """
    check_keep_last(keep_last)
    protected = live_refs(assets)
    by_name: dict[str, list[AssetVersion]] = {}
    for version in assets.list():
        by_name.setdefault(version.name, []).append(version)

    doomed = [
        v
        for versions in by_name.values()
        for v in expired(versions, keep_last, lambda v: v.ref in protected)
    ]
    for version in [] if dry_run else doomed:
        assets.store.delete(version.prefix + MANIFEST)
        for entry in version.files:
            assets.store.delete(version.prefix + entry["name"])
        assets._record("asset.delete", version, "success", zone=version.zone)
    logger.info(
        "retention keep_last=%d: %s %d version(s); %d protected by live models",
        keep_last,
        "would delete" if dry_run else "deleted",
        len(doomed),
        len(protected),
    )
    return doomed


def _is_manifest_of(key: str, zone: str, name: str) -> bool:
    parts = key.split("/")
    return (
        len(parts) == 4
        and parts[0] == zone
        and parts[1] == name
        and parts[3] == MANIFEST
    )


def _describe_schema(
    schema: pa.Schema, classification: dict[str, str]
) -> list[dict[str, str]]:
    missing = [n for n in schema.names if n not in classification]
    if missing:
        raise ValueError(f"columns {missing} have no data class; classify every column")
    unknown = {n: c for n, c in classification.items() if c not in CLASSES}
    if unknown:
        raise ValueError(
            f"data classes {unknown} are unknown; use one of {list(CLASSES)}"
        )
    return [
        {"name": f.name, "type": str(f.type), "class": classification[f.name]}
        for f in schema
    ]


def _verify(asset: AssetVersion, entry: dict[str, Any], data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(
            f"file {entry['name']!r} of asset {asset.ref} has sha256 {digest}, "
            f"manifest says {entry['sha256']}; the store was modified"
        )


def register_model(
    assets: AssetStore,
    model_dir: Path,
    curated_dir: Path,
    *,
    name: str = "recommender",
    producer: str = "kfp:train",
    quality: dict[str, Any] | None = None,
) -> AssetVersion:
    """Store a model artifact folder in zone ``models`` with its data lineage.

    Its inputs are the curated assets named in ``curated_dir/versions.json`` (written
    by the store stage); quarantine assets are left out.

    Args:
        assets: the asset store.
        model_dir: the model artifact folder.
        curated_dir: the store stage's output folder.
        name: the model asset's name.
        producer: the stage writing it.
        quality: validation metrics to record.

    Returns:
        The model version, new or existing.
    """
    from shopml.lineage import asset_dataset, start_run

    refs_path = curated_dir / "versions.json"
    refs = json.loads(refs_path.read_text()) if refs_path.is_file() else {}
    inputs = sorted(r for n, r in refs.items() if not n.startswith("quarantine_"))
    known = {v.ref: v for v in assets.list()}
    run = start_run("train", [asset_dataset(known[r]) for r in inputs if r in known])
    asset = assets.put_dir(
        name, "models", model_dir, owner="shopml-ml", producer=producer,
        inputs=inputs, quality=quality,
    )  # fmt: skip
    run.complete([asset_dataset(asset)])
    return asset


#: File in a stage's output folder naming the asset versions it stands for.
REFS_FILE = "versions.json"


def write_refs(folder: Path, refs: dict[str, str]) -> Path:
    """Write ``{name: "name@version"}`` to ``folder/versions.json`` (folder created)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REFS_FILE
    path.write_text(json.dumps(refs, indent=2, sort_keys=True), encoding="utf-8")
    return path


def read_refs(folder: Path) -> dict[str, str] | None:
    """The refs a stage wrote with :func:`write_refs`, or ``None`` when it wrote none."""
    path = folder / REFS_FILE
    if not path.is_file():
        return None
    refs = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(refs, dict) or not all(
        isinstance(v, str) and "@" in v for v in refs.values()
    ):
        raise ValueError(f"{path} must map names to 'name@version' refs, got {refs!r}")
    return refs


def fetch_table_file(assets: AssetStore, ref: str, target: Path) -> AssetVersion:
    """Download the Parquet file of table version ``ref`` (``name@version``) to ``target``.

    Raises:
        KeyError: no such version.
        ValueError: the version is not a table, or its file fails its checksum.
    """
    name, _, version = ref.partition("@")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        asset = assets.fetch_dir(name, version, Path(tmp))
        table = Path(tmp) / TABLE_FILE
        if not table.is_file():
            raise ValueError(f"asset {ref} is not a table: it has no {TABLE_FILE}")
        table.replace(target)
    return asset


def asset_store_from_settings(settings: Settings) -> AssetStore:
    """The asset store ``settings`` describe, recording every access in the audit log."""
    from shopml.audit import audit_log_from_settings
    from shopml.storage import open_store

    return AssetStore(open_store(settings), audit=audit_log_from_settings(settings))
