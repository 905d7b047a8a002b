"""MinioStore and AssetStore against a real S3-compatible server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from shopml.assets import AssetStore, AssetVersion
from shopml.config import load_settings
from shopml.storage import MinioStore, download_uri, open_store
from tests.services import S3Server

pytestmark = pytest.mark.integration

CLASSES = {"item_id": "public", "title": "public"}


@pytest.fixture
def minio_store(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> MinioStore:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store = open_store(load_settings())
    assert isinstance(store, MinioStore)
    return store


def catalog(n: int) -> pa.Table:
    return pa.table(
        {"item_id": [str(i) for i in range(n)], "title": [f"t{i}" for i in range(n)]}
    )


def put(assets: AssetStore, table: pa.Table) -> AssetVersion:
    return assets.put_table(
        "catalog", "curated", table, owner="shopml-data", classification=CLASSES,
        producer="test", inputs=[],
    )  # fmt: skip


def test_object_round_trip_on_s3(minio_store: MinioStore, tmp_path: Path) -> None:
    minio_store.put_bytes("a/b/one.bin", b"\x00\x01")
    source = tmp_path / "two.txt"
    source.write_text("two")
    minio_store.put_file("a/two.txt", source)

    assert minio_store.get_bytes("a/b/one.bin") == b"\x00\x01"
    assert minio_store.exists("a/two.txt")
    assert not minio_store.exists("a/three.txt")
    assert minio_store.list("a/") == ["a/b/one.bin", "a/two.txt"]
    assert minio_store.uri("a/two.txt") == f"s3://{minio_store.bucket}/a/two.txt"
    minio_store.get_file("a/two.txt", tmp_path / "down" / "two.txt")
    assert (tmp_path / "down" / "two.txt").read_text() == "two"

    minio_store.delete("a/two.txt")
    assert minio_store.list("a/") == ["a/b/one.bin"]
    with pytest.raises(FileNotFoundError, match=r"a/two\.txt"):
        minio_store.get_bytes("a/two.txt")
    with pytest.raises(ValueError, match=r"'\.\.'"):
        minio_store.put_bytes("a/../b", b"x")


def test_assets_on_s3_are_versioned_idempotent_and_ignore_half_writes(
    minio_store: MinioStore,
) -> None:
    assets = AssetStore(minio_store)
    first = put(assets, catalog(3))
    keys = minio_store.list()
    again = put(assets, catalog(3))
    assert again == first
    assert minio_store.list() == keys

    minio_store.put_bytes("curated/catalog/0000000000000000/data.parquet", b"partial")
    assert [v.version for v in assets.list()] == [first.version]
    assert assets.read_table("catalog").equals(catalog(3))

    newer = put(assets, catalog(5))
    assert assets.get("catalog").version == newer.version
    assert assets.read_table("catalog", first.version).num_rows == 3


def test_folder_asset_on_s3(minio_store: MinioStore, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"w" * 1000)
    (folder / "config.json").write_text("{}")
    assets = AssetStore(minio_store)

    stored = assets.put_dir(
        "sasrec", "models", folder, owner="ml", producer="t", inputs=[]
    )
    assets.fetch_dir("sasrec", stored.version, tmp_path / "back")

    assert (tmp_path / "back" / "model.pt").read_bytes() == b"w" * 1000
    assert sorted(f["name"] for f in stored.files) == ["config.json", "model.pt"]


def test_download_uri_reads_s3_inputs(minio_store: MinioStore, tmp_path: Path) -> None:
    minio_store.put_bytes("inputs/events.csv", b"user_id\n1\n")

    path = download_uri(
        f"s3://{minio_store.bucket}/inputs/events.csv", tmp_path, load_settings()
    )

    assert path.read_bytes() == b"user_id\n1\n"
    assert path.name == "events.csv"
