"""The feature store on real services: Redis online store, S3 (moto) offline store."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from minio import Minio

from components.features import build_features
from shopml.config import S3Settings, Settings
from shopml.features import (
    FeatureStoreUnavailable,
    OnlineFeatureClient,
    feature_store_from_settings,
    push_events,
)
from tests.services import RedisServer, S3Server
from tests.unit.test_features import AS_OF, T2, USER_A, USER_B, write_tiny_curated

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
