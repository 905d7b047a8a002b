"""The asset catalog end to end: lineage from the raw file to the model, the CLI,
crash safety of writes (local folder and S3 on 127.0.0.1) and retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
import typer
from typer.testing import CliRunner

from components.clean import CleanConfig, clean_tables
from components.ingest import ingest_sources, register_raw_tables
from components.store import store_tables
from shopml.assets import (
    AssetStore,
    asset_store_from_settings,
    mark_live,
    prune_versions,
    register_model,
)
from shopml.cli_assets import assets_app, synth
from shopml.config import load_settings
from shopml.quality import QualityConfig, write_quality_json
from shopml.security import Pseudonymizer
from shopml.storage import LocalStore, MinioStore
from tests.services import S3Server

pytestmark = pytest.mark.integration

RUNNER = CliRunner()
REPO = Path(__file__).parents[2]


def run_data_stages(tmp_path: Path) -> AssetStore:
    """ingest -> raw assets -> clean -> store -> model registration, as the stages do."""
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,event_type,timestamp\n"
        "u1,i1,view,2024-01-01\nu1,i2,view,2024-01-02\nu2,i9,view,2024-01-02\n"
    )
    (tmp_path / "catalog.csv").write_text("item_id,title\ni1,Shoe\ni2,Hat\n")
    result = ingest_sources(
        "files",
        tmp_path / "raw",
        events_path=str(tmp_path / "events.csv"),
        catalog_path=str(tmp_path / "catalog.csv"),
    )
    assets = asset_store_from_settings(load_settings())
    raw_refs = register_raw_tables(
        tmp_path / "raw", assets, result.inputs, producer="t"
    )
    config = CleanConfig(now=datetime(2025, 1, 1, tzinfo=UTC))
    curated, quarantine = tmp_path / "curated", tmp_path / "quarantine"
    cleaned = clean_tables(
        tmp_path / "raw", curated, quarantine, Pseudonymizer(b"k"), config
    )
    # As the clean component does: the checks travel to the store stage.
    (curated / "quality.json").write_text(
        write_quality_json(cleaned.checks, QualityConfig())
    )
    stored = store_tables(curated, quarantine, assets, producer="t", inputs=raw_refs)
    (curated / "versions.json").write_text(
        json.dumps({name: v.ref for name, v in stored.items()})
    )
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"weights")
    register_model(assets, model_dir, curated)
    return assets


def test_lineage_runs_from_the_raw_file_to_the_model(tmp_path: Path) -> None:
    assets = run_data_stages(tmp_path)
    out = RUNNER.invoke(assets_app, ["lineage", "recommender"])
    assert out.exit_code == 0, out.output

    lines = out.output.splitlines()
    assert lines[0].startswith("recommender@") and "[models]" in lines[0]
    events = assets.get("events")
    raw_events = assets.get("raw_events")
    assert f"  <- {events.ref} [curated] by t" in lines
    assert f"    <- {raw_events.ref} [raw] by t" in lines
    assert any(line.strip().startswith("<- events.csv@") for line in lines)
    # A version reached twice is expanded once, then only referred back to.
    expanded = [
        line.strip().removeprefix("<- ").split()[0] for line in lines if " by " in line
    ]
    assert len(expanded) == len(set(expanded))
    # Each curated table names the raw tables it comes from, not all of them.
    raw_catalog = assets.get("raw_catalog")
    assert assets.get("catalog").inputs == [raw_catalog.ref]
    assert sorted(events.inputs) == sorted([raw_events.ref, raw_catalog.ref])
    assert f"    <- {raw_catalog.ref} [raw] (see above)" in lines


def test_list_show_and_diff(tmp_path: Path) -> None:
    assets = run_data_stages(tmp_path)
    listing = RUNNER.invoke(assets_app, ["list"]).output
    for name in ("events", "catalog", "raw_events", "quarantine_events", "recommender"):
        assert f"\n{name} " in listing

    shown = RUNNER.invoke(assets_app, ["show", "events"]).output
    assert "rows      2" in shown
    assert "owner     shopml-data" in shown
    assert "referential_integrity" in shown  # the quality checks of the clean stage
    manifest = json.loads(
        RUNNER.invoke(assets_app, ["show", "events", "--json"]).output
    )
    assert manifest["version"] == assets.get("events").version

    old = assets.get("catalog")
    table = pa.table(
        {"item_id": ["i1"], "title": ["Shoe"], "price": [1.0], "brand": ["acme"]}
    )
    classes = dict.fromkeys(table.column_names, "public")
    new = assets.put_table(
        "catalog", "curated", table, owner="o", classification=classes,
        producer="t", inputs=[],
    )  # fmt: skip
    changes = RUNNER.invoke(assets_app, ["diff", old.ref, new.ref]).output
    assert "+ column brand string (public)" in changes
    assert "- column category string (public)" in changes
    assert "~ rows 2 -> 1" in changes


def test_unknown_asset_is_a_clear_error() -> None:
    out = RUNNER.invoke(assets_app, ["show", "nothing@abc"])
    assert out.exit_code != 0
    assert "nothing" in out.output


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import pyarrow as pa
    from shopml.assets import MANIFEST, AssetStore
    from shopml.config import load_settings
    from shopml.storage import open_store

    store = open_store(load_settings())
    original = store.put_bytes

    def put_bytes(key, data):
        if key.endswith(MANIFEST):  # data is written: die before the manifest
            os.kill(os.getpid(), signal.SIGKILL)
        original(key, data)

    store.put_bytes = put_bytes
    table = pa.table({"item_id": ["i1", "i2"]})
    AssetStore(store).put_table(
        "catalog", "curated", table, owner="o", classification={"item_id": "public"},
        producer="killed", inputs=[],
    )
    """
)


def kill_mid_write(env: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLER], env=env, cwd=REPO, timeout=60, check=False
    )
    assert done.returncode == -9  # killed by SIGKILL, between data and manifest


def assert_invisible_then_rerun(assets: AssetStore) -> None:
    assert assets.versions("catalog") == []
    assert any(key.endswith("data.parquet") for key in assets.store.list("curated/"))
    table = pa.table({"item_id": ["i1", "i2"]})
    version = assets.put_table(
        "catalog", "curated", table, owner="o", classification={"item_id": "public"},
        producer="rerun", inputs=[],
    )  # fmt: skip
    assert [v.ref for v in assets.versions("catalog")] == [version.ref]
    assert assets.read_table("catalog").equals(table)


def test_a_killed_local_write_leaves_no_version_and_the_rerun_completes(
    tmp_path: Path,
) -> None:
    kill_mid_write(dict(os.environ))
    assert_invisible_then_rerun(AssetStore(LocalStore(load_settings().store_root)))


def test_a_killed_s3_write_leaves_no_version_and_the_rerun_completes(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    kill_mid_write(dict(os.environ))
    settings = load_settings()
    assert settings.s3 is not None
    assert_invisible_then_rerun(AssetStore(MinioStore(settings.s3)))


def test_retention_prunes_old_versions_but_never_a_live_models_inputs(
    tmp_path: Path,
) -> None:
    assets = AssetStore(LocalStore(tmp_path / "store"))
    classes = {"n": "internal"}
    versions = [
        assets.put_table(
            "events",
            "curated",
            pa.table({"n": [n]}),
            owner="o",
            classification=classes,
            producer="t",
            inputs=[],
        )
        for n in range(4)
    ]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"w")
    model = assets.put_dir(
        "recommender", "models", model_dir, owner="o", producer="t",
        inputs=[versions[0].ref],
    )  # fmt: skip
    mark_live(assets, "recommender", model.version)

    assert prune_versions(assets, keep_last=1, dry_run=True) == versions[1:3]
    assert len(assets.versions("events")) == 4
    deleted = prune_versions(assets, keep_last=1)

    assert deleted == versions[1:3]
    kept = [v.ref for v in assets.versions("events")]
    assert kept == [versions[0].ref, versions[3].ref]
    assert assets.read_table("events", versions[0].version).column("n").to_pylist() == [
        0
    ]
    assert not any(versions[1].version in key for key in assets.store.list("curated/"))


def test_synth_command_writes_files_with_faults(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(synth)
    out = RUNNER.invoke(
        app,
        ["--events", "5000", "--out", str(tmp_path), "--fault", "duplicate=0.1",
         "--format", "csv"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert (tmp_path / "events.csv").is_file()
    rows = int(out.output.split()[1].replace(",", ""))
    assert 5300 < rows < 5700  # about 10% duplicates added

    bad = RUNNER.invoke(app, ["--fault", "duplicate"])
    assert bad.exit_code != 0
    assert "KIND=RATE" in bad.output
