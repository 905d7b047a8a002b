"""Features stage and online client on a SQLite online store, with hand-written events.

The events are old (1997, like MovieLens) on purpose: views have no TTL, so they must
still materialize and be served.
"""

from __future__ import annotations

import importlib
import json
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import shopml.features
from components.features import build_features, read_curated, user_recent_items_table
from feature_repo import FEATURE_VIEWS, PROJECT
from shopml.config import Settings
from shopml.feast_store import feature_store_from_settings, redis_connection_string
from shopml.feature_push import push_events
from shopml.online_features import FeatureStoreUnavailable, OnlineFeatureClient

T1 = datetime(1997, 8, 1, 12, tzinfo=UTC)  # outside the 30-day window of AS_OF
T2 = datetime(1997, 9, 1, 12, tzinfo=UTC)  # inside 30 days, outside 7 days
T3 = datetime(1997, 9, 15, 12, tzinfo=UTC)  # inside 7 days
AS_OF = datetime(1997, 9, 20, 12, tzinfo=UTC)  # the newest event
USER_A = "u_" + "a" * 32
USER_B = "u_" + "b" * 32


def tiny_events() -> pd.DataFrame:
    """Two users; USER_A has two events at T3 whose order only the item id decides."""
    rows = [
        (USER_A, "i1", "view", T1, None),
        (USER_A, "i2", "view", T2, None),
        (USER_A, "i4", "view", T3, None),  # same time as i3: i3 goes first by item id
        (USER_A, "i3", "cart", T3, None),
        (USER_A, "i5", "purchase", AS_OF, None),
        (USER_B, "i2", "rate", T2, 4.0),
        (USER_B, "", "search", T3, None),  # a search: counted, not in the sequence
        (USER_B, "i5", "view", T3, None),
    ]
    frame = pd.DataFrame(
        rows, columns=["user_id", "item_id", "event_type", "timestamp", "value"]
    )
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    return frame


def tiny_catalog() -> pd.DataFrame:
    """Five items, two categories; i6 is never seen in events."""
    return pd.DataFrame(
        {
            "item_id": ["i1", "i2", "i3", "i4", "i5", "i6"],
            "title": ["One", "Two", "Three", "Four", "Five", "Six"],
            "category": ["books", "books", "toys", "toys", None, "toys"],
            "price": [10.0, 20.0, 30.0, None, 50.0, 60.0],
        }
    )


def write_tiny_curated(folder: Path, events: pd.DataFrame | None = None) -> Path:
    """Write the curated tables the features stage reads; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (tiny_events() if events is None else events).to_parquet(folder / "events.parquet")
    tiny_catalog().to_parquet(folder / "catalog.parquet")
    return folder


def online_rows(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every online table in the SQLite store, sorted."""
    with sqlite3.connect(settings.feast_dir / "online.db") as connection:
        return {
            view: sorted(
                connection.execute(
                    "SELECT entity_key, feature_name, value, event_ts "
                    f"FROM {PROJECT}_{view}"
                ).fetchall()
            )
            for view in FEATURE_VIEWS
        }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Any]:
    """One features run shared by the read-only tests of this file."""
    root = tmp_path_factory.mktemp("built")
    settings = Settings(home=root / "home", progress=False)
    result = build_features(
        write_tiny_curated(root / "curated"), settings, max_seq_len=50
    )
    return settings, result


@pytest.fixture(scope="module")
def client(built: tuple[Settings, Any]) -> OnlineFeatureClient:
    settings, _ = built
    return OnlineFeatureClient.from_settings(settings)


def test_build_reports_rows_and_first_run_is_full(built: tuple[Settings, Any]) -> None:
    settings, result = built

    assert result.materialization == "full"
    assert result.online_store == "sqlite"
    assert result.registry == str(settings.feast_dir / "registry.db")
    # USER_A: epoch row, T1, T2, T3 (two events, one row), AS_OF; USER_B: epoch, T2, T3.
    assert result.row_counts == {
        "user_recent_items": 8,
        "user_activity": 2,
        "item_stats": 6,
    }
    assert json.loads(result.to_json())["n_users"] == 2
    assert Path(result.offline_root, "user_recent_items.parquet").is_file()


def test_feature_tables_are_versioned_assets_with_curated_lineage(
    tmp_path: Path,
) -> None:
    from shopml.assets import asset_store_from_settings

    curated = write_tiny_curated(tmp_path / "curated")
    refs = {
        "events": "events@aaaa",
        "catalog": "catalog@bbbb",
        "quarantine_events": "q@c",
    }
    (curated / "versions.json").write_text(json.dumps(refs))
    settings = Settings(home=tmp_path / "home", progress=False)

    first = build_features(curated, settings, max_seq_len=50)
    again = build_features(curated, settings, max_seq_len=50)

    assets = asset_store_from_settings(settings)
    stored = assets.get("user_recent_items")
    assert first.assets["user_recent_items"] == stored.ref
    assert stored.zone == "features"
    assert stored.rows == first.row_counts["user_recent_items"] == 8
    assert stored.inputs == ["catalog@bbbb", "events@aaaa"]
    assert {c["class"] for c in stored.schema} == {"internal"}
    # Same curated data, same feature versions: nothing new is written.
    assert again.assets == first.assets
    assert [v.name for v in assets.list()].count("user_activity") == 1


def test_read_back_passes_after_materialization_and_catches_lost_writes(
    built: tuple[Settings, Any],
) -> None:
    from components.features import MaterializationError, verify_online

    settings, _ = built
    written = user_recent_items_table(tiny_events(), 50)
    verify_online(settings, written, 50)  # both users are online

    lost = written.copy()
    lost.loc[lost["user_id"] == USER_B, "user_id"] = "u_" + "c" * 32  # never written
    with pytest.raises(MaterializationError, match="1 of 2 sampled users"):
        verify_online(settings, lost, 50)


def test_user_sequence_is_oldest_first_with_ties_broken_by_item_id(
    client: OnlineFeatureClient,
) -> None:
    assert client.user_sequence(USER_A) == ["i1", "i2", "i3", "i4", "i5"]
    assert client.user_sequence(USER_B) == ["i2", "i5"]


def test_user_sequence_keeps_only_the_newest_max_seq_len(
    built: tuple[Settings, Any],
) -> None:
    settings, _ = built
    short = OnlineFeatureClient.from_settings(settings, max_seq_len=2)

    assert short.user_sequence(USER_A) == ["i4", "i5"]


def test_seen_items_cover_history_beyond_the_sequence_window(
    built: tuple[Settings, Any],
) -> None:
    settings, _ = built
    short = OnlineFeatureClient.from_settings(settings, max_seq_len=2)

    features_a, unknown = short.serving_features_batch([USER_A, "u_" + "0" * 32])

    assert features_a.item_seq == ["i4", "i5"]
    assert features_a.excluded_items == {"i1", "i2", "i3", "i4", "i5"}
    assert unknown.item_seq == []
    assert unknown.excluded_items == set()


def test_unknown_user_gets_empty_sequence_and_default_activity(
    client: OnlineFeatureClient,
) -> None:
    activity = client.user_activity("u_" + "0" * 32)

    assert client.user_sequence("u_" + "0" * 32) == []
    assert activity["n_events_all"] == 0
    assert activity["days_since_last_event"] == -1.0
    assert activity["avg_price"] == 0.0


def test_store_never_built_is_unavailable(tmp_path: Path) -> None:
    client = OnlineFeatureClient.from_settings(Settings(home=tmp_path / "empty-home"))

    with pytest.raises(FeatureStoreUnavailable, match="user_recent_items") as raised:
        client.user_sequence(USER_A)

    assert "does not exist" in str(raised.value.__cause__)


def test_user_sequences_reads_many_users_in_order(client: OnlineFeatureClient) -> None:
    sequences = client.user_sequences([USER_B, "u_unknown", USER_A, USER_B])

    assert sequences == [["i2", "i5"], [], ["i1", "i2", "i3", "i4", "i5"], ["i2", "i5"]]
    assert client.user_sequences([]) == []


def test_user_activity_counts_windows_back_from_the_newest_event(
    client: OnlineFeatureClient,
) -> None:
    activity = client.user_activity(USER_A)
    other = client.user_activity(USER_B)

    assert (
        activity["n_events_7d"],
        activity["n_events_30d"],
        activity["n_events_all"],
    ) == (
        3,
        4,
        5,
    )
    assert (
        activity["n_view_all"],
        activity["n_cart_7d"],
        activity["n_purchase_7d"],
    ) == (3, 1, 1)
    assert activity["days_since_last_event"] == 0.0
    assert activity["n_distinct_categories"] == 2  # books, toys; i5 has no category
    assert activity["avg_price"] == pytest.approx((10 + 20 + 30 + 50) / 4)
    assert (other["n_search_all"], other["n_rate_30d"]) == (1, 1)
    assert other["days_since_last_event"] == pytest.approx(5.0)


def test_item_stats_are_served_online(built: tuple[Settings, Any]) -> None:
    settings, _ = built
    store = feature_store_from_settings(settings)
    names = ["n_users_all", "n_events_30d", "conversion_rate", "avg_rating", "title"]

    rows = store.get_online_features(
        features=[f"item_stats:{name}" for name in names],
        entity_rows=[{"item_id": "i2"}, {"item_id": "i5"}, {"item_id": "i6"}],
    ).to_dict()

    assert rows["n_users_all"] == [2, 2, 0]
    assert rows["n_events_30d"] == [2, 2, 0]
    assert rows["conversion_rate"][1] == 1.0  # one purchase per view
    assert rows["avg_rating"][0] == 4.0
    assert rows["title"] == ["Two", "Five", "Six"]


def test_point_in_time_join_never_sees_later_items(built: tuple[Settings, Any]) -> None:
    settings, _ = built
    store = feature_store_from_settings(settings)
    entity_df = pd.DataFrame(
        {
            "user_id": [USER_A, USER_A, USER_A, USER_B],
            "event_timestamp": [
                T1 - timedelta(days=1),
                T2 + timedelta(hours=1),
                T3,
                T2,
            ],
        }
    )

    joined = store.get_historical_features(
        entity_df=entity_df, features=["user_recent_items:item_seq"]
    ).to_df()
    by_time = {
        (row.user_id, row.event_timestamp): list(row.item_seq)
        for row in joined.itertuples()
    }

    # A naive join on the user would hand every row USER_A's full sequence, i5 included.
    assert len(joined) == 4
    assert by_time[(USER_A, T1 - timedelta(days=1))] == []
    assert by_time[(USER_A, T2 + timedelta(hours=1))] == ["i1", "i2"]
    assert by_time[(USER_A, T3)] == ["i1", "i2", "i3", "i4"]
    assert by_time[(USER_B, T2)] == ["i2"]


def test_training_service_keeps_every_entity_row(built: tuple[Settings, Any]) -> None:
    settings, _ = built
    store = feature_store_from_settings(settings)
    entity_df = pd.DataFrame(
        {
            "user_id": [USER_A, USER_B, "u_unknown"],
            # Just before USER_B's T3 event: its own item must not be in the input.
            "event_timestamp": [T1 - timedelta(days=1), T3 - timedelta(seconds=1), T2],
            "label": ["i1", "i5", "i9"],
        }
    )

    joined = store.get_historical_features(
        entity_df=entity_df, features=store.get_feature_service("recommender_training")
    ).to_df()

    assert sorted(joined["label"]) == ["i1", "i5", "i9"]
    assert [list(seq) for seq in joined.sort_values("label")["item_seq"][:2]] == [
        [],
        ["i2"],
    ]


def test_second_run_on_same_data_changes_nothing_online(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", progress=False)
    curated = write_tiny_curated(tmp_path / "curated")
    build_features(curated, settings)
    before = online_rows(settings)

    again = build_features(curated, settings)

    assert again.materialization == "incremental"
    assert online_rows(settings) == before
    assert (
        len(before["user_activity"]) == 2 * 25
    )  # two users x 24 activity features + seen


def test_incremental_run_picks_up_new_events(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", progress=False)
    build_features(write_tiny_curated(tmp_path / "curated"), settings)
    later = (
        tiny_events()
        .iloc[[0]]
        .assign(item_id="i6", timestamp=pd.Timestamp(AS_OF + timedelta(days=40)))
    )
    grown = write_tiny_curated(tmp_path / "curated2", pd.concat([tiny_events(), later]))

    result = build_features(grown, settings)
    client = OnlineFeatureClient.from_settings(settings)

    assert result.materialization == "incremental"
    assert client.user_sequence(USER_A) == ["i1", "i2", "i3", "i4", "i5", "i6"]
    # Snapshot rows move to the new reference time: USER_B's 30-day count falls to 0.
    assert client.user_activity(USER_B)["n_events_30d"] == 0


def test_push_events_appends_to_the_online_sequence(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", progress=False)
    build_features(write_tiny_curated(tmp_path / "curated"), settings)
    store = feature_store_from_settings(settings)
    new_events = pd.DataFrame(
        {
            "user_id": [USER_B, USER_B, "u_new"],
            "item_id": ["i6", "i1", "i3"],
            "timestamp": pd.to_datetime(
                [AS_OF + timedelta(hours=2), AS_OF, AS_OF], utc=True
            ),
        }
    )

    pushed = push_events(store, new_events, max_seq_len=3)
    client = OnlineFeatureClient(store)

    assert pushed == 2
    assert client.user_sequence(USER_B) == ["i5", "i1", "i6"]  # i2 falls off at 3
    assert client.user_sequence("u_new") == ["i3"]


def test_recent_items_table_cuts_to_max_seq_len_and_merges_equal_times() -> None:
    table = user_recent_items_table(tiny_events(), max_seq_len=3)
    user_a = table[table["user_id"] == USER_A]

    assert [list(seq) for seq in user_a["item_seq"]] == [
        [],
        ["i1"],
        ["i1", "i2"],
        ["i2", "i3", "i4"],
        ["i3", "i4", "i5"],
    ]
    assert user_a["item_seq_len"].tolist() == [0, 1, 2, 3, 3]


def test_recent_items_table_rejects_zero_length() -> None:
    with pytest.raises(ValueError, match="max_seq_len=0"):
        user_recent_items_table(tiny_events(), max_seq_len=0)


def test_read_curated_names_the_missing_column(tmp_path: Path) -> None:
    folder = write_tiny_curated(
        tmp_path / "curated", tiny_events().drop(columns="event_type")
    )

    with pytest.raises(ValueError, match=r"\['event_type'\]"):
        read_curated(folder)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6390/0", "127.0.0.1:6390,db=0"),
        ("redis://cache/3", "cache:6379,db=3"),
        ("rediss://:s3cret@cache:6380/1", "cache:6380,db=1,ssl=true,password=s3cret"),
    ],
    ids=["host-port-db", "default-port", "tls-password"],
)
def test_redis_connection_string(url: str, expected: str) -> None:
    assert redis_connection_string(url).startswith(expected + ",socket_timeout=")


def test_redis_connection_string_rejects_other_schemes() -> None:
    with pytest.raises(ValueError, match="http://cache:6379"):
        redis_connection_string("http://cache:6379")


def test_client_rejects_empty_sequences(built: tuple[Settings, Any]) -> None:
    settings, _ = built
    with pytest.raises(ValueError, match="max_seq_len=0"):
        OnlineFeatureClient.from_settings(settings, max_seq_len=0)


def test_component_compiles_with_typed_artifacts(tmp_path: Path) -> None:
    from kfp import compiler

    from components.features import features

    spec_path = tmp_path / "features.yaml"
    compiler.Compiler().compile(features, str(spec_path))
    spec = spec_path.read_text()

    assert "system.Dataset" in spec and "system.Metrics" in spec
    assert "max_seq_len" in spec


def test_component_body_writes_summary_and_metrics(tmp_path: Path) -> None:
    from kfp import dsl

    from components.features import features

    curated = write_tiny_curated(tmp_path / "curated")
    output = dsl.Dataset(name="features", uri=str(tmp_path / "features"))
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"))

    # The body configures logging for its process; give pytest its handlers back.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        features.python_func(
            curated=dsl.Dataset(name="curated", uri=str(curated)),
            features=output,
            metrics=metrics,
            max_seq_len=3,
        )
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    summary = json.loads((tmp_path / "features" / "features.json").read_text())

    assert summary["online_store"] == "sqlite"
    assert summary["row_counts"]["user_recent_items"] == 8
    assert summary["offline_root"].startswith(str(tmp_path / "home"))  # SHOPML_HOME
    assert metrics.metadata["rows_item_stats"] == 6.0


# Every public name of shopml.features before it was split, and the module holding it.
FEATURES_HOMES = {
    "RAY_LOCAL_NUM_CPUS": "shopml.feast_store",
    "RAY_LOCAL_OBJECT_STORE_BYTES": "shopml.feast_store",
    "RAY_WRITE_CONCURRENCY": "shopml.feast_store",
    "REDIS_TIMEOUT_S": "shopml.feast_store",
    "REGISTRY_CACHE_TTL_S": "shopml.feast_store",
    "check_join_keys": "shopml.feast_store",
    "feature_service_join_keys": "shopml.feast_store",
    "feature_store_from_settings": "shopml.feast_store",
    "offline_root": "shopml.feast_store",
    "redis_connection_string": "shopml.feast_store",
    "push_events": "shopml.feature_push",
    "SERVING_FEATURES": "shopml.online_features",
    "FeatureStoreUnavailable": "shopml.online_features",
    "OnlineFeatureClient": "shopml.online_features",
    "RedisFeatureReader": "shopml.online_features",
    "UserFeatures": "shopml.online_features",
    "read_online_features": "shopml.online_features",
    "TRAINING_SOURCES": "shopml.training_data",
    "feast_training_split": "shopml.training_data",
    "prepare_entity_frame": "shopml.training_data",
    "split_for_training": "shopml.training_data",
    "training_cutoffs": "shopml.training_data",
    "training_examples": "shopml.training_data",
}


def test_features_exports_every_name_it_held_before_the_split() -> None:
    assert sorted(shopml.features.__all__) == sorted(FEATURES_HOMES)


@pytest.mark.parametrize("name", sorted(FEATURES_HOMES))
def test_features_re_exports_the_object_of_its_home_module(name: str) -> None:
    home = importlib.import_module(FEATURES_HOMES[name])

    assert getattr(shopml.features, name) is getattr(home, name)
