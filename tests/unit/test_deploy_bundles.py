"""Retention of search bundles (``serving/search/<bundle>/``) in a local object store.

Pruning keeps the newest bundles and every bundle still served: one a live
InferenceService names (stable or canary) or one built from the live recommender and
search index (the pointers ``mark_live`` writes, which ``shopml assets prune`` spares).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from components.deploy import (
    SearchBundle,
    list_search_bundles,
    prune_search_bundles,
    publish_search_bundle,
)
from shopml.assets import AssetStore, asset_store_from_settings, mark_live
from shopml.config import load_settings


@pytest.fixture
def assets() -> AssetStore:
    return asset_store_from_settings(load_settings())


def store_model(assets: AssetStore, root: Path, name: str, payload: bytes) -> str:
    root.mkdir(parents=True)
    (root / "model.pt").write_bytes(payload)
    (root / "manifest.json").write_bytes(b"{}")
    return assets.put_dir(name, "models", root, owner="t", producer="t", inputs=[]).ref


@pytest.fixture
def bundles(assets: AssetStore, tmp_path: Path) -> list[SearchBundle]:
    """Five bundles, oldest first: recommender versions 1..5 with one search index."""
    store_model(assets, tmp_path / "index", "search-index", b"index")
    published = []
    for n in range(1, 6):
        ref = store_model(assets, tmp_path / f"m{n}", "recommender", b"w%d" % n)
        published.append(publish_search_bundle(assets, ref))
    return published


def versions_in_store(assets: AssetStore) -> set[str]:
    return {key.split("/")[2] for key in assets.store.list("serving/search/")}


def test_bundles_are_listed_oldest_first(
    assets: AssetStore, bundles: list[SearchBundle]
) -> None:
    listed = list_search_bundles(assets)

    assert [b.version for b in listed] == [b.version for b in bundles]
    assert [b.model_ref for b in listed] == [b.model_ref for b in bundles]
    assert all(b.published_at for b in listed)


def test_prune_keeps_the_newest_and_the_bundles_an_inference_service_serves(
    assets: AssetStore, bundles: list[SearchBundle]
) -> None:
    stable = f"s3://shopml/{bundles[0].prefix}"  # the oldest, still stable

    deleted = prune_search_bundles(assets, keep_last=2, serving_uris=[stable, ""])

    assert [b.version for b in deleted] == [bundles[1].version, bundles[2].version]
    kept = {bundles[0].version, bundles[3].version, bundles[4].version}
    assert versions_in_store(assets) == kept
    assert assets.audit is not None
    removed = [e for e in assets.audit.events() if e.action == "deploy.bundle.delete"]
    assert [e.asset for e in removed] == [b.ref for b in deleted]


def test_prune_spares_the_bundle_of_the_live_models(
    assets: AssetStore, bundles: list[SearchBundle]
) -> None:
    for ref in (bundles[1].model_ref, bundles[1].index_ref):
        name, version = ref.split("@")
        mark_live(assets, name, version)

    deleted = prune_search_bundles(assets, keep_last=1)

    assert {b.version for b in deleted} == {
        bundles[0].version,
        bundles[2].version,
        bundles[3].version,
    }
    assert versions_in_store(assets) == {bundles[1].version, bundles[4].version}


def test_prune_dry_run_deletes_nothing(
    assets: AssetStore, bundles: list[SearchBundle]
) -> None:
    before = assets.store.list("serving/search/")

    doomed = prune_search_bundles(assets, keep_last=3, dry_run=True)

    assert [b.version for b in doomed] == [bundles[0].version, bundles[1].version]
    assert assets.store.list("serving/search/") == before


def test_prune_leaves_a_bundle_being_written_alone(
    assets: AssetStore, bundles: list[SearchBundle]
) -> None:
    # A publish in progress: files but no bundle.json yet.
    assets.store.put_bytes("serving/search/0123456789abcdef/model/model.pt", b"w")

    prune_search_bundles(assets, keep_last=1)

    assert versions_in_store(assets) == {bundles[4].version, "0123456789abcdef"}


def test_prune_refuses_to_keep_nothing(assets: AssetStore) -> None:
    with pytest.raises(ValueError, match="keep_last=0"):
        prune_search_bundles(assets, keep_last=0)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "delete"])
def test_prune_skips_a_corrupt_bundle_record_with_a_warning_and_prunes_the_rest(
    assets: AssetStore,
    bundles: list[SearchBundle],
    dry_run: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    corrupt = bundles[0].prefix + "/bundle.json"
    assets.store.put_bytes(corrupt, b"{not json")

    doomed = prune_search_bundles(assets, keep_last=3, dry_run=dry_run)

    assert [b.version for b in doomed] == [bundles[1].version]
    assert any(
        r.levelname == "WARNING" and corrupt in r.getMessage() for r in caplog.records
    )
    left = versions_in_store(assets)
    assert bundles[0].version in left  # never delete what cannot be read
    assert (bundles[1].version in left) is dry_run
