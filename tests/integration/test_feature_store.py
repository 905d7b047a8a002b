"""The feature store on real services: Redis online store, S3 (moto) offline store.

Also: registry in S3 with Redis online in one run, the Redis fast path against Feast,
and a pushed event reaching the recommender's next answer.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import redis
from minio import Minio

from components.features import build_features
from serving.recommender import RecommenderModel
from shopml.config import S3Settings, Settings, load_settings
from shopml.features import (
    FeatureStoreUnavailable,
    OnlineFeatureClient,
    feature_store_from_settings,
    push_events,
    training_examples,
)
from shopml.security import load_pseudonymizer
from tests.services import RedisServer, S3Server
from tests.unit.test_features import AS_OF, T2, USER_A, USER_B, write_tiny_curated
from tests.unit.test_recommender import item_id as recommender_item_id
from tests.unit.test_recommender import write_tiny_artifact

pytestmark = pytest.mark.integration


def test_redis_online_store_apply_materialize_push_read(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home", redis_url=redis_server.url, progress=False
    )

    result = build_features(write_tiny_curated(tmp_path / "curated"), settings)
    store = feature_store_from_settings(settings)
    client = OnlineFeatureClient(store)

    assert result.online_store == "redis"
    assert client.user_sequence(USER_A) == ["i1", "i2", "i3", "i4", "i5"]
    assert client.user_activity(USER_A)["n_events_all"] == 5

    new_event = pd.DataFrame(
        {
            "user_id": [USER_B],
            "item_id": ["i6"],
            "timestamp": [pd.Timestamp(AS_OF + timedelta(minutes=5))],
        }
    )
    assert push_events(store, new_event) == 1

    rows = store.get_online_features(
        features=["user_recent_items:item_seq", "user_recent_items:item_seq_len"],
        entity_rows=[{"user_id": USER_B}, {"user_id": "u_unknown"}],
    ).to_dict()
    assert rows["item_seq"] == [["i2", "i5", "i6"], None]
    assert rows["item_seq_len"] == [3, None]


@pytest.mark.timeout(30)
def test_redis_down_raises_feature_store_unavailable(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home", redis_url=redis_server.url, progress=False
    )
    build_features(write_tiny_curated(tmp_path / "curated"), settings)
    client = OnlineFeatureClient.from_settings(settings)
    assert client.user_sequence(USER_A)[-1] == "i5"

    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(FeatureStoreUnavailable) as raised:
        client.user_sequence(USER_A)
    elapsed = time.monotonic() - started

    # The contract, not a benchmark: the server falls back instead of hanging
    # (redis-py's default retries alone back off for about 7 s).
    assert elapsed < 3.0
    assert raised.value.__cause__ is not None
    assert "user_recent_items" in str(raised.value)
    with pytest.raises(FeatureStoreUnavailable):
        client.user_activity(USER_A)


def test_s3_offline_store_serves_historical_features(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    settings = Settings(
        home=tmp_path / "home",
        s3=S3Settings(
            endpoint=s3_server.endpoint,
            bucket=s3_server.bucket,
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
        ),
        progress=False,
    )

    result = build_features(write_tiny_curated(tmp_path / "curated"), settings)
    store = feature_store_from_settings(settings)
    joined = store.get_historical_features(
        entity_df=pd.DataFrame(
            {"user_id": [USER_A, USER_B], "event_timestamp": [T2, AS_OF]}
        ),
        features=["user_recent_items:item_seq"],
    ).to_df()
    activity = store.get_historical_features(
        entity_df=pd.DataFrame({"user_id": [USER_B], "event_timestamp": [AS_OF]}),
        features=["user_activity:n_events_all"],
    ).to_df()

    assert result.offline_root == f"s3://{s3_server.bucket}/features/offline"
    assert result.registry == f"s3://{s3_server.bucket}/feast/registry.pb"
    by_user = {row.user_id: row for row in joined.itertuples()}
    assert list(by_user[USER_A].item_seq) == ["i1", "i2"]
    assert list(by_user[USER_B].item_seq) == ["i2", "i5"]
    assert activity["n_events_all"].tolist() == [3]

    minio = Minio(
        s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        secure=False,
    )
    keys = {
        obj.object_name for obj in minio.list_objects(s3_server.bucket, recursive=True)
    }
    assert "feast/registry.pb" in keys
    assert "features/offline/user_recent_items.parquet" in keys
    assert OnlineFeatureClient(store).user_sequence(USER_B) == ["i2", "i5"]


def redis_snapshot(url: str) -> dict[bytes, Any]:
    """Every hash in a Redis database, for before/after comparisons."""
    client = redis.Redis.from_url(url)
    try:
        return {key: client.hgetall(key) for key in client.scan_iter()}
    finally:
        client.close()


def test_s3_registry_and_redis_online_store_end_to_end(
    s3_server: S3Server,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SHOPML_REDIS_URL", redis_server.url)
    settings = load_settings()
    curated = write_tiny_curated(tmp_path / "curated")

    # apply + materialize (full), then again: incremental, nothing changes online.
    first = build_features(curated, settings)
    online_before = redis_snapshot(redis_server.url)
    again = build_features(curated, settings)

    assert (first.registry, first.online_store) == (
        f"s3://{s3_server.bucket}/feast/registry.pb",
        "redis",
    )
    assert (first.materialization, again.materialization) == ("full", "incremental")
    assert redis_snapshot(redis_server.url) == online_before
    assert len(online_before) == 2 + 6  # one hash per user and per item

    # A reader with a fresh store object sees the registry in S3, not on local disk.
    store = feature_store_from_settings(settings)
    assert not (settings.feast_dir / "registry.db").exists()
    assert (
        push_events(
            store,
            pd.DataFrame(
                {
                    "user_id": [USER_B],
                    "item_id": ["i6"],
                    "timestamp": [pd.Timestamp(AS_OF + timedelta(minutes=5))],
                }
            ),
        )
        == 1
    )

    online = store.get_online_features(
        features=["user_recent_items:item_seq", "user_activity:n_events_all"],
        entity_rows=[{"user_id": USER_A}, {"user_id": USER_B}],
    ).to_dict()
    historical = training_examples(
        store,
        pd.DataFrame({"user_id": [USER_A, USER_B], "event_timestamp": [T2, AS_OF]}),
    )

    assert online["item_seq"] == [["i1", "i2", "i3", "i4", "i5"], ["i2", "i5", "i6"]]
    assert online["n_events_all"] == [5, 3]
    # The push went online only: the offline history of USER_B has no i6.
    assert historical["item_seq"].tolist() == [["i1", "i2"], ["i2", "i5"]]


def test_fast_path_reads_exactly_what_feast_reads(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home", redis_url=redis_server.url, progress=False
    )
    build_features(write_tiny_curated(tmp_path / "curated"), settings)
    store = feature_store_from_settings(settings)
    fast = OnlineFeatureClient(store)
    through_feast = OnlineFeatureClient(store, use_redis_fast_path=False)
    users = [USER_A, USER_B, "u_unknown"]

    assert fast.user_sequences(users) == through_feast.user_sequences(users)
    for user in users:
        assert fast.serving_features(user) == through_feast.serving_features(user)
        assert fast.user_activity(user) == through_feast.user_activity(user)
    assert fast._redis_reader() is not None  # the fast path was really taken
    assert through_feast._redis_reader() is None
    assert fast.serving_features(USER_A).activity["n_events_all"] == 5
    assert fast.serving_features("u_unknown").item_seq == []


def test_fast_path_on_a_store_never_applied_is_unavailable(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home", redis_url=redis_server.url, progress=False
    )
    client = OnlineFeatureClient.from_settings(settings)

    with pytest.raises(FeatureStoreUnavailable, match="user_recent_items"):
        client.user_sequence(USER_A)


@pytest.mark.timeout(60)
def test_pushed_event_changes_the_next_recommendation_within_a_second(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home", redis_url=redis_server.url, progress=False
    )
    pseudonymizer = load_pseudonymizer(settings)
    shopper = pseudonymizer.pseudonymize("shopper-1")
    history = [recommender_item_id(i) for i in (1, 2, 3)]
    events = pd.DataFrame(
        {
            "user_id": [shopper] * 3,
            "item_id": history,
            "event_type": ["view"] * 3,
            "timestamp": pd.to_datetime(
                [AS_OF - timedelta(hours=h) for h in (3, 2, 1)], utc=True
            ),
        }
    )
    write_tiny_curated(tmp_path / "curated", events)
    build_features(tmp_path / "curated", settings)
    model = RecommenderModel(
        "recommender",
        write_tiny_artifact(tmp_path / "model"),
        OnlineFeatureClient(feature_store_from_settings(settings)),
        pseudonymizer,
    )
    assert model.load()
    body = {"instances": [{"user_id": "shopper-1", "k": 29}]}
    before = asyncio.run(model(body, headers={}))[0]["predictions"][0]["item_ids"]
    pushed_item = before[0]  # the current top item: pushing it must remove it

    started = time.monotonic()
    push_events(
        feature_store_from_settings(settings),
        pd.DataFrame(
            {
                "user_id": [shopper],
                "item_id": [pushed_item],
                "timestamp": [pd.Timestamp(AS_OF)],
            }
        ),
    )
    after = asyncio.run(model(body, headers={}))[0]["predictions"][0]["item_ids"]
    elapsed = time.monotonic() - started

    assert sorted(before) == sorted(
        recommender_item_id(i) for i in range(4, 31)
    )  # 30 items, 3 seen
    assert pushed_item not in after
    assert len(after) == 26
    assert after != before
    assert elapsed < 1.0


def test_a_wiped_redis_is_refilled_by_the_next_run(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path / "home", redis_url=redis_server.url, progress=False
    )
    curated = write_tiny_curated(tmp_path / "curated")
    build_features(curated, settings)
    before = redis_snapshot(redis_server.url)
    kept = build_features(curated, settings)  # nothing lost: incremental, no change

    redis.Redis.from_url(redis_server.url).flushall()  # a restart without persistence
    refilled = build_features(curated, settings)

    assert kept.materialization == "incremental"
    assert refilled.materialization == "refill"
    assert redis_snapshot(redis_server.url) == before
    assert OnlineFeatureClient.from_settings(settings).user_sequence(USER_A)
