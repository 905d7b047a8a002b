"""The local object store and versioned assets on top of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from shopml.assets import MANIFEST, AssetStore, parquet_bytes
from shopml.config import load_settings
from shopml.storage import LocalStore, open_store

CLASSES = {"item_id": "public", "title": "public"}


def small_table(n: int = 3) -> pa.Table:
    return pa.table(
        {"item_id": [str(i) for i in range(n)], "title": [f"t{i}" for i in range(n)]}
    )


def put(assets: AssetStore, table: pa.Table, name: str = "catalog") -> str:
    return assets.put_table(
        name,
        "curated",
        table,
        owner="shopml-data",
        classification=CLASSES,
        producer="test",
        inputs=["src@abc"],
    ).version


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "a\\b", "./a"])
def test_bad_keys_are_rejected_with_the_key_named(store: LocalStore, key: str) -> None:
    with pytest.raises(ValueError, match="object key"):
        store.put_bytes(key, b"x")


def test_local_store_round_trip_list_and_delete(
    store: LocalStore, tmp_path: Path
) -> None:
    store.put_bytes("a/b/one.txt", b"1")
    source = tmp_path / "two.txt"
    source.write_bytes(b"22")
    store.put_file("a/two.txt", source)

    assert store.get_bytes("a/b/one.txt") == b"1"
    assert store.list("a/") == ["a/b/one.txt", "a/two.txt"]
    assert store.list("a/b") == ["a/b/one.txt"]
    store.get_file("a/two.txt", tmp_path / "out" / "copy.txt")
    assert (tmp_path / "out" / "copy.txt").read_bytes() == b"22"

    store.delete("a/two.txt")
    store.delete("a/two.txt")  # absent: no error
    assert not store.exists("a/two.txt")
    with pytest.raises(FileNotFoundError, match=r"a/two\.txt"):
        store.get_bytes("a/two.txt")


def test_local_writes_leave_no_temporary_files(store: LocalStore) -> None:
    store.put_bytes("k/data", b"old")
    store.put_bytes("k/data", b"new")

    assert store.get_bytes("k/data") == b"new"
    assert sorted(os.listdir(store.root / "k")) == ["data"]


def test_open_store_is_local_without_s3(shopml_home: Path) -> None:
    opened = open_store(load_settings())

    assert isinstance(opened, LocalStore)
    assert opened.root == shopml_home / "store"


def test_parquet_bytes_are_deterministic_across_chunking_and_metadata() -> None:
    table = small_table(100)
    rechunked = pa.concat_tables([table.slice(0, 40), table.slice(40)])
    with_metadata = table.replace_schema_metadata({"pandas": "version 9"})

    assert (
        parquet_bytes(table) == parquet_bytes(rechunked) == parquet_bytes(with_metadata)
    )


def test_same_table_twice_is_one_version_and_nothing_is_rewritten(
    store: LocalStore,
) -> None:
    assets = AssetStore(store)
    first = put(assets, small_table())
    keys = store.list()
    stamps = {k: store.path(k).stat().st_mtime_ns for k in keys}

    second = put(assets, small_table())

    assert second == first
    assert store.list() == keys
    assert {k: store.path(k).stat().st_mtime_ns for k in keys} == stamps
    assert [v.version for v in assets.list()] == [first]


def test_new_content_is_a_new_version_and_latest_wins(store: LocalStore) -> None:
    assets = AssetStore(store)
    old = put(assets, small_table(3))
    new = put(assets, small_table(4))

    assert old != new
    assert assets.get("catalog").version == new
    assert assets.get("catalog", old).rows == 3
    assert assets.read_table("catalog").num_rows == 4
    assert assets.read_table("catalog", old).equals(small_table(3))


def test_manifest_records_schema_lineage_and_files(store: LocalStore) -> None:
    assets = AssetStore(store)
    version = put(assets, small_table())

    manifest = json.loads(store.get_bytes(f"curated/catalog/{version}/{MANIFEST}"))
    assert manifest["schema"] == [
        {"name": "item_id", "type": "string", "class": "public"},
        {"name": "title", "type": "string", "class": "public"},
    ]
    assert manifest["inputs"] == ["src@abc"]
    assert manifest["rows"] == 3
    assert manifest["files"][0]["name"] == "data.parquet"
    assert manifest["created_at"].endswith("+00:00")


def test_half_written_version_is_invisible(store: LocalStore) -> None:
    assets = AssetStore(store)
    committed = put(assets, small_table(3))
    # A writer that died after the data and before the manifest.
    store.put_bytes(
        "curated/catalog/ffffffffffffffff/data.parquet", parquet_bytes(small_table(9))
    )

    assert [v.version for v in assets.list()] == [committed]
    assert assets.get("catalog").version == committed
    with pytest.raises(KeyError, match="ffffffffffffffff"):
        assets.get("catalog", "ffffffffffffffff")


def test_tampered_data_is_refused(store: LocalStore) -> None:
    assets = AssetStore(store)
    version = put(assets, small_table())
    store.put_bytes(
        f"curated/catalog/{version}/data.parquet", parquet_bytes(small_table(5))
    )

    with pytest.raises(ValueError, match="manifest says"):
        assets.read_table("catalog")


@pytest.mark.parametrize("name", ["Catalog", "cat/alog", "", "café", "a.b"])
def test_bad_asset_names_are_rejected(store: LocalStore, name: str) -> None:
    with pytest.raises(ValueError, match="asset name"):
        put(AssetStore(store), small_table(), name=name)


def test_every_column_needs_a_known_class(store: LocalStore) -> None:
    assets = AssetStore(store)
    with pytest.raises(ValueError, match=r"\['title'\] have no data class"):
        assets.put_table(
            "catalog",
            "curated",
            small_table(),
            owner="o",
            classification={"item_id": "public"},
            producer="p",
            inputs=[],
        )
    with pytest.raises(ValueError, match="secret"):
        assets.put_table(
            "catalog",
            "curated",
            small_table(),
            owner="o",
            classification={"item_id": "public", "title": "secret"},
            producer="p",
            inputs=[],
        )


def test_a_name_lives_in_one_zone(store: LocalStore) -> None:
    assets = AssetStore(store)
    put(assets, small_table())
    with pytest.raises(ValueError, match="already lives in zone 'curated'"):
        assets.put_table(
            "catalog", "raw", small_table(), owner="o", classification=CLASSES,
            producer="p", inputs=[],
        )  # fmt: skip


def test_folder_assets_round_trip_and_are_content_addressed(
    store: LocalStore, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "model.pt").write_bytes(b"\x00weights")
    (model / "sub" / "config.json").write_text('{"n_items": 3}')
    assets = AssetStore(store)

    first = assets.put_dir(
        "sasrec", "models", model, owner="ml", producer="t", inputs=[]
    )
    again = assets.put_dir(
        "sasrec", "models", model, owner="ml", producer="t", inputs=[]
    )
    fetched = assets.fetch_dir("sasrec", None, tmp_path / "fetched")

    assert again == first
    assert fetched.version == first.version
    assert (
        tmp_path / "fetched" / "sub" / "config.json"
    ).read_text() == '{"n_items": 3}'
    assert (tmp_path / "fetched" / "model.pt").read_bytes() == b"\x00weights"

    (model / "model.pt").write_bytes(b"\x00weights2")
    changed = assets.put_dir(
        "sasrec", "models", model, owner="ml", producer="t", inputs=[]
    )
    assert changed.version != first.version
    with pytest.raises(ValueError, match="folder, not a table"):
        assets.read_table("sasrec")
