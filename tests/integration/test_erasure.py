"""``forget_user`` on real stores: assets, offline Parquet, SQLite and Redis online."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.features import build_features
from shopml.assets import AssetStore
from shopml.audit import AuditLog
from shopml.config import Settings
from shopml.erasure import forget_user, models_to_retrain
from shopml.features import OnlineFeatureClient, offline_root
from shopml.schemas import classify_columns
from shopml.security import Pseudonymizer, scan_for_values
from shopml.storage import LocalStore, open_store
from tests.services import RedisServer
from tests.unit.test_features import tiny_events, write_tiny_curated

pytestmark = pytest.mark.integration

PSEUDO = Pseudonymizer(b"erasure-test-key")
JANE = "Jane.Doe+shop@Example.com"
JANE_PSEUDONYM = PSEUDO.pseudonymize(JANE)
OTHER = "u_" + "b" * 32  # the second user of the tiny events


def _events() -> pd.DataFrame:
    events = tiny_events()
    events.loc[events["user_id"] != OTHER, "user_id"] = JANE_PSEUDONYM
    return events


def _seed(settings: Settings, tmp_path: Path) -> tuple[AssetStore, AuditLog, str]:
    """Curated events, a model trained on them, and features built from them."""
    store = open_store(settings)
    audit = AuditLog(store, actor="user:tester")
    assets = AssetStore(store, audit=audit)
    events = pa.Table.from_pandas(_events(), preserve_index=False)
    version = assets.put_table(
        "events",
        "curated",
        events,
        owner="o",
        classification=classify_columns("events", events.column_names, curated=True),
        producer="test",
        inputs=[],
    )
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.pt").write_bytes(b"weights")
    assets.put_dir(
        "recommender",
        "models",
        model_dir,
        owner="o",
        producer="t",
        inputs=[version.ref],
    )
    build_features(write_tiny_curated(tmp_path / "curated", _events()), settings)
    return assets, audit, version.ref


def _assert_forgotten(settings: Settings, assets: AssetStore, old_ref: str) -> None:
    latest = assets.read_table("events")
    assert JANE_PSEUDONYM not in latest.column("user_id").to_pylist()
    assert OTHER in latest.column("user_id").to_pylist()
    assert old_ref not in [v.ref for v in assets.versions("events")]
    for view in ("user_recent_items", "user_activity"):
        table = assets.read_table(view)
        assert JANE_PSEUDONYM not in table.column("user_id").to_pylist()
        assert OTHER in table.column("user_id").to_pylist()

    for view in ("user_recent_items", "user_activity"):
        offline = pq.read_table(f"{offline_root(settings)}/{view}.parquet")
        assert JANE_PSEUDONYM not in offline.column("user_id").to_pylist()
        assert OTHER in offline.column("user_id").to_pylist()

    client = OnlineFeatureClient.from_settings(settings)
    assert client.user_sequence(JANE_PSEUDONYM) == []
    assert client.user_activity(JANE_PSEUDONYM)["n_events_all"] == 0
    assert client.user_sequence(OTHER) == ["i2", "i5"]


def test_forget_on_local_store_and_sqlite(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", progress=False)
    assets, audit, old_ref = _seed(settings, tmp_path)

    result = forget_user(
        "  jane.doe+SHOP@example.COM",
        assets=assets,
        pseudonymizer=PSEUDO,
        settings=settings,
        audit=audit,
    )

    # Jane's 5 events, and her rows in the feature-table assets (epoch row + 4 times
    # in user_recent_items, one user_activity row); item_stats has no user column.
    assert result.rows_removed == {
        "events": 5,
        "user_recent_items": 5,
        "user_activity": 1,
    }
    assert old_ref in result.purged_versions
    assert {ref.split("@")[0] for ref in result.purged_versions} == {
        "events",
        "user_recent_items",
        "user_activity",
    }
    assert result.offline_rows_removed["user_activity"] == 1
    assert result.online_entities_removed > 0
    assert [m["model"].split("@")[0] for m in models_to_retrain(assets.store)] == [
        "recommender"
    ]
    _assert_forgotten(settings, assets, old_ref)

    # The audit log names the erasure by subject reference only, and stays intact.
    erasures = [e for e in audit.events() if e.action == "erasure.forget"]
    assert {e.details["subject_ref"] for e in erasures} == {result.subject_ref}
    assert audit.verify().is_intact
    assert isinstance(assets.store, LocalStore)
    audit_dir = assets.store.root / "audit"
    assert scan_for_values([audit_dir], [], [JANE, JANE_PSEUDONYM]) == []


def test_forget_removes_the_user_from_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home", redis_url=redis_server.url, progress=False
    )
    assets, audit, old_ref = _seed(settings, tmp_path)
    assert scan_for_values([], [redis_server.url], [JANE_PSEUDONYM]) != []

    result = forget_user(
        JANE, assets=assets, pseudonymizer=PSEUDO, settings=settings, audit=audit
    )

    assert result.online_entities_removed == 1
    _assert_forgotten(settings, assets, old_ref)
    assert scan_for_values([], [redis_server.url], [JANE_PSEUDONYM]) == []


def test_forget_passes_over_empty_tables(tmp_path: Path) -> None:
    # Every normal run stores an empty quarantine table; an empty column has no type
    # to match against, which once crashed forget half-way through.
    settings = Settings(home=tmp_path / "home", progress=False)
    assets, audit, old_ref = _seed(settings, tmp_path)
    empty = pa.table(
        {"user_id": pa.array([], pa.string()), "reason": pa.array([], pa.string())}
    )
    assets.put_table(
        "quarantine_catalog", "raw", empty, owner="o",
        classification={"user_id": "pii", "reason": "internal"},
        producer="test", inputs=[],
    )  # fmt: skip

    result = forget_user(
        JANE, assets=assets, pseudonymizer=PSEUDO, settings=settings, audit=audit
    )

    assert result.rows_removed["events"] == 5
    assert "quarantine_catalog" not in result.rows_removed
    _assert_forgotten(settings, assets, old_ref)


def test_forget_of_an_unknown_user_changes_nothing(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", progress=False)
    assets, _, old_ref = _seed(settings, tmp_path)

    result = forget_user(
        "nobody@example.com", assets=assets, pseudonymizer=PSEUDO, settings=settings
    )

    assert result.purged_versions == [] and result.new_versions == {}
    assert [v.ref for v in assets.versions("events")] == [old_ref]
    assert result.offline_rows_removed == {}
    assert result.online_entities_removed == 0
