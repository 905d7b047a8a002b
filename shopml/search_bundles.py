"""Search bundles: what the ``search`` InferenceService downloads, and their retention.

The ``search`` predictor (runtime ``shopml-search``: ``python -m serving.search`` serves
``search`` and ``recommender`` in one process) reads one folder of the object store:

    serving/search/<bundle>/model/      the recommender version being deployed
    serving/search/<bundle>/index/      a ``search-index`` asset version
    serving/search/<bundle>/bundle.json {"model", "index", "version", "published_at"}

``<bundle>`` is a hash of both refs, so publishing the same pair twice writes nothing,
and ``bundle.json`` is written last: a bundle exists once its record does.
:func:`prune_search_bundles` applies the asset retention policy
(:mod:`shopml.retention`) to bundles: it keeps the newest ones and every bundle still
served, one a live InferenceService names or one built from the live models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shopml.assets import AssetStore, AssetVersion, live_refs
from shopml.retention import check_keep_last, expired

logger = logging.getLogger(__name__)

SEARCH_INDEX_ASSET = "search-index"
SEARCH_BUNDLE_PREFIX = "serving/search"
BUNDLE_MODEL_DIR = "model"
BUNDLE_INDEX_DIR = "index"
BUNDLE_RECORD = "bundle.json"
# Bundles kept by default besides the served ones: the stable, a canary and one back.
SEARCH_BUNDLES_KEPT = 3
_BUNDLE_CHARS = 16


@dataclass(frozen=True)
class SearchBundle:
    """A search bundle in the object store: what the ``search`` predictor downloads.

    Attributes:
        version: 16 hex characters of the sha256 of ``model_ref`` and ``index_ref``.
        model_ref: the recommender, ``recommender@<version>`` (folder ``model/``).
        index_ref: the search index, ``search-index@<version>`` (folder ``index/``).
        published: whether this call wrote it (``False``: it was already there).
        published_at: ISO-8601 UTC time it was first written; ``""`` for a bundle
            published before the time was recorded (retention treats it as oldest).
    """

    version: str
    model_ref: str
    index_ref: str
    published: bool
    published_at: str = ""

    @property
    def prefix(self) -> str:
        """Key prefix of the bundle, ``serving/search/<version>`` (no trailing ``/``)."""
        return f"{SEARCH_BUNDLE_PREFIX}/{self.version}"

    @property
    def ref(self) -> str:
        """``search-bundle@<version>``, the name the audit log records."""
        return f"search-bundle@{self.version}"


def bundle_version(model_ref: str, index_ref: str) -> str:
    """The bundle version of a recommender ref and a search index ref."""
    digest = hashlib.sha256(f"{model_ref}\0{index_ref}".encode())
    return digest.hexdigest()[:_BUNDLE_CHARS]


def bundle_of_uri(uri: str) -> str | None:
    """The bundle version a storage URI points at (``s3://b/serving/search/<v>``).

    Returns:
        The version, or ``None`` when ``uri`` is not a search bundle.
    """
    marker = f"{SEARCH_BUNDLE_PREFIX}/"
    if marker not in uri:
        return None
    return uri.split(marker, 1)[1].strip("/").split("/", 1)[0] or None


def require_models_asset(
    assets: AssetStore, name: str, version: str | None
) -> AssetVersion:
    """A version of a ``models``-zone asset the bundle needs; a clear error if absent.

    Raises:
        KeyError: no such asset or version; the message says which stage stores it.
        ValueError: the asset is not in the ``models`` zone.
    """
    try:
        asset = assets.get(name, version)
    except KeyError as err:
        raise KeyError(
            f"the search bundle needs asset {name!r}"
            f"{'@' + version if version else ''}: {err.args[0]}; run the stage that "
            "stores it (train, search_index) first, or deploy without search"
        ) from err
    if asset.zone != "models":
        raise ValueError(f"asset {asset.ref} is in zone {asset.zone!r}, not 'models'")
    return asset


def publish_search_bundle(
    assets: AssetStore, model_ref: str, index_version: str | None = None
) -> SearchBundle:
    """Copy a recommender version and a search index into one search bundle.

    Files are read through the asset store (each checked against its manifest and the
    read audited) and written under ``serving/search/<bundle>/model/`` and
    ``.../index/``; ``bundle.json`` (both refs) is written last, so a bundle exists
    once its record does, and an existing bundle is not written again.

    Args:
        assets: the asset store.
        model_ref: the recommender, ``recommender@<version>``.
        index_version: the ``search-index`` version; ``None`` takes the latest.

    Returns:
        The bundle.

    Raises:
        ValueError: ``model_ref`` is not ``name@version``, or an asset is not a model.
        KeyError: the recommender version or the search index does not exist.
    """
    if "@" not in model_ref:
        raise ValueError(f"model_ref={model_ref!r} must be a ref, name@version")
    name, version = model_ref.split("@", 1)
    model = require_models_asset(assets, name, version)
    index = require_models_asset(assets, SEARCH_INDEX_ASSET, index_version)
    bundle = SearchBundle(
        bundle_version(model.ref, index.ref), model.ref, index.ref, True
    )
    record_key = f"{bundle.prefix}/{BUNDLE_RECORD}"
    if assets.store.exists(record_key):
        logger.info("search bundle=%s unchanged; nothing written", bundle.version)
        audit(assets, "deploy.bundle", bundle.ref, "unchanged")
        return replace(_read_bundle(assets, bundle.version), published=False)

    _copy_into_bundle(assets, bundle, model, index)
    bundle = replace(bundle, published_at=datetime.now(UTC).isoformat())
    record = {
        "model": model.ref,
        "index": index.ref,
        "version": bundle.version,
        "published_at": bundle.published_at,
    }
    assets.store.put_bytes(record_key, json.dumps(record, indent=2).encode())
    n_files = len(model.files) + len(index.files)
    logger.info(
        "search bundle=%s published model=%s index=%s files=%d",
        bundle.version, model.ref, index.ref, n_files,
    )  # fmt: skip
    audit(
        assets, "deploy.bundle", bundle.ref, "success",
        model=model.ref, index=index.ref, files=n_files,
    )  # fmt: skip
    return bundle


def _copy_into_bundle(
    assets: AssetStore, bundle: SearchBundle, model: AssetVersion, index: AssetVersion
) -> None:
    """Fetch both assets (verified, audited) and write their files under the bundle."""
    with tempfile.TemporaryDirectory(prefix="shopml-bundle-") as tmp:
        for folder, asset in ((BUNDLE_MODEL_DIR, model), (BUNDLE_INDEX_DIR, index)):
            local = Path(tmp) / folder
            assets.fetch_dir(asset.name, asset.version, local)
            for entry in asset.files:
                key = f"{bundle.prefix}/{folder}/{entry['name']}"
                assets.store.put_file(key, local / entry["name"])


def _read_bundle(assets: AssetStore, version: str) -> SearchBundle:
    key = f"{SEARCH_BUNDLE_PREFIX}/{version}/{BUNDLE_RECORD}"
    record = json.loads(assets.store.get_bytes(key))
    return SearchBundle(
        version,
        str(record["model"]),
        str(record["index"]),
        published=False,
        published_at=str(record.get("published_at", "")),
    )


def list_search_bundles(assets: AssetStore) -> list[SearchBundle]:
    """Every published bundle (one with a ``bundle.json``), oldest first.

    A folder without ``bundle.json`` is a publish in progress (or one that crashed)
    and is not listed; nor is one whose ``bundle.json`` cannot be read (a warning
    names it), so retention never deletes what it cannot read.
    """
    record_keys = [
        key
        for key in assets.store.list(f"{SEARCH_BUNDLE_PREFIX}/")
        if key.count("/") == 3 and key.endswith(f"/{BUNDLE_RECORD}")
    ]
    bundles = []
    for key in record_keys:
        try:
            bundles.append(_read_bundle(assets, key.split("/")[2]))
        except (ValueError, KeyError, TypeError) as err:
            # JSONDecodeError and UnicodeDecodeError are ValueErrors.
            logger.warning(
                "search bundle record %s is unreadable (%s: %s); bundle skipped, "
                "never pruned",
                key,
                type(err).__name__,
                err,
            )
    return sorted(bundles, key=lambda b: (b.published_at, b.version))


def prune_search_bundles(
    assets: AssetStore,
    *,
    keep_last: int = SEARCH_BUNDLES_KEPT,
    serving_uris: Iterable[str] = (),
    dry_run: bool = False,
) -> list[SearchBundle]:
    """Delete old search bundles, keeping the newest and every one still served.

    The policy of ``shopml assets prune`` (:func:`shopml.retention.expired`): the
    ``keep_last`` newest bundles stay, and so does a bundle that is served: one that
    ``serving_uris`` names (the stable and canary storage URIs of the live ``search``
    InferenceService) or one whose recommender and search index are both live in the
    asset store (:func:`shopml.assets.live_refs`). A bundle is deleted record first, so
    it is gone at once for readers; a folder still being written (no record) is left
    alone.

    Args:
        assets: the asset store.
        keep_last: newest bundles kept (at least 1).
        serving_uris: storage URIs an InferenceService routes traffic to.
        dry_run: only say what would be deleted.

    Returns:
        The bundles deleted (or that would be), oldest first.

    Raises:
        ValueError: ``keep_last`` is below 1.
    """
    check_keep_last(keep_last)
    served = {v for uri in serving_uris if (v := bundle_of_uri(uri)) is not None}
    live = live_refs(assets)

    def is_served(bundle: SearchBundle) -> bool:
        both_live = bundle.model_ref in live and bundle.index_ref in live
        return bundle.version in served or both_live

    doomed = expired(list_search_bundles(assets), keep_last, is_served)
    for bundle in [] if dry_run else doomed:
        _delete_bundle(assets, bundle)
    logger.info(
        "search bundle retention keep_last=%d: %s %d bundle(s); served=%s",
        keep_last,
        "would delete" if dry_run else "deleted",
        len(doomed),
        sorted(served),
    )
    return doomed


def _delete_bundle(assets: AssetStore, bundle: SearchBundle) -> None:
    """Delete the record first (the bundle is gone for readers), then its files."""
    assets.store.delete(f"{bundle.prefix}/{BUNDLE_RECORD}")
    files = assets.store.list(f"{bundle.prefix}/")
    for key in files:
        assets.store.delete(key)
    audit(
        assets, "deploy.bundle.delete", bundle.ref, "success",
        model=bundle.model_ref, index=bundle.index_ref, files=len(files),
    )  # fmt: skip


def audit(
    assets: AssetStore, action: str, subject: str, outcome: str, **details: Any
) -> None:
    """Record an event in the asset store's audit log, when it has one."""
    if assets.audit is not None:
        assets.audit.record(None, action, subject, outcome, **details)
