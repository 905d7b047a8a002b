"""The recommender server under stress, over HTTP on 127.0.0.1.

A real ``python -m serving`` on a Redis-backed Feast store: Redis frozen (SIGSTOP) and
then killed mid-test, the server falls back on popularity (degraded, counted in
``/metrics``) and recovers without a restart. Also: business filters, explanations on
the v1 ``:explain`` route, size limits, load shedding, and no raw user id in the log.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from components.deploy import LocalDeployment, deploy_local, stop_local
from components.features import build_features
from shopml.config import load_settings
from shopml.features import feature_store_from_settings, push_events
from shopml.security import load_pseudonymizer
from tests.services import RedisServer, start_redis
from tests.unit.test_features import AS_OF, write_tiny_curated
from tests.unit.test_recommender import item_id, write_tiny_artifact

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 90
RAW_USER = "shopper-7731"
HISTORY = [item_id(i) for i in (1, 2, 3)]


def shopper_events(pseudonym: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [pseudonym] * 3,
            "item_id": HISTORY,
            "event_type": ["view"] * 3,
            "timestamp": pd.to_datetime(
                [AS_OF - timedelta(hours=h) for h in (3, 2, 1)], utc=True
            ),
        }
    )


@pytest.fixture
def redis_served(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalDeployment]:
    """A server reading a shopper's history from Feast on Redis."""
    monkeypatch.setenv("SHOPML_REDIS_URL", redis_server.url)
    settings = load_settings()
    pseudonym = load_pseudonymizer(settings).pseudonymize(RAW_USER)
    write_tiny_curated(tmp_path / "curated", shopper_events(pseudonym))
    build_features(tmp_path / "curated", settings)
    deployment = deploy_local(
        write_tiny_artifact(tmp_path / "model"),
        timeout_s=START_TIMEOUT_S,
        extra_args=["--lookup-timeout-ms", "200"],
    )
    try:
        yield deployment
    finally:
        stop_local(deployment)


def ask(deployment: LocalDeployment) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    response = httpx.post(
        f"{deployment.endpoint}:predict",
        json={"instances": [{"user_id": RAW_USER, "k": 27}]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0], time.monotonic() - started


def metric(deployment: LocalDeployment, name: str, **labels: str) -> float:
    """One sample of the server's Prometheus metrics (0 when absent)."""
    text = httpx.get(f"{deployment.url}/metrics").text
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.timeout(180)
def test_redis_frozen_then_killed_degrades_to_popularity_and_recovers(
    redis_served: LocalDeployment, redis_server: RedisServer
) -> None:
    healthy, _ = ask(redis_served)

    # Frozen: connections hang, the lookup deadline (200 ms) falls back.
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        frozen, frozen_s = ask(redis_served)
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    thawed, _ = ask(redis_served)

    # Killed, then back on the same port (empty: the shopper's history is pushed again).
    redis_server.stop()
    dead, _ = ask(redis_served)
    revived = start_redis(redis_server.port)
    try:
        settings = load_settings()
        pseudonym = load_pseudonymizer(settings).pseudonymize(RAW_USER)
        push_events(feature_store_from_settings(settings), shopper_events(pseudonym))
        recovered, _ = ask(redis_served)
    finally:
        revived.stop()

    popularity = [item_id(i) for i in range(30, 3, -1)]  # most popular first
    assert healthy["degraded"] is False
    assert sorted(healthy["item_ids"]) == sorted(item_id(i) for i in range(4, 31))
    assert frozen["degraded"] is True
    assert frozen["item_ids"] == popularity
    assert frozen_s < 1.5
    assert thawed["degraded"] is False
    assert not set(thawed["item_ids"]) & set(HISTORY)
    assert dead["degraded"] is True
    assert recovered["degraded"] is False
    assert recovered["item_ids"] == healthy["item_ids"]
    fallbacks = "shopml_recommender_fallbacks_total"
    assert metric(redis_served, fallbacks, reason="store_timeout") >= 1
    assert metric(redis_served, fallbacks, reason="store_unavailable") >= 1
    log = redis_served.log_path.read_text()
    assert "degraded model=recommender reason=store_timeout" in log
    assert RAW_USER not in log


# --- filters, explanations, limits and shedding on a server without a store ----------


@pytest.fixture(scope="module")
def catalog_served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LocalDeployment]:
    """A server with a catalog (categories) and a tight in-flight limit."""
    root = tmp_path_factory.mktemp("catalog-server")
    catalog = pd.DataFrame(
        {
            "item_id": [item_id(i) for i in range(1, 31)],
            "title": [f"Title {i}" for i in range(1, 31)],
            "category": ["even" if i % 2 == 0 else "odd" for i in range(1, 31)],
        }
    )
    catalog.to_parquet(root / "catalog.parquet", index=False)
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("SHOPML_")]:
            patch.delenv(name)
        patch.setenv("SHOPML_HOME", str(root / "home"))
        deployment = deploy_local(
            write_tiny_artifact(root / "model"),
            use_feature_store=False,
            timeout_s=START_TIMEOUT_S,
            extra_args=[
                "--catalog", str(root / "catalog.parquet"),
                "--max-in-flight", "2", "--max-body-bytes", "4096",
            ],
        )  # fmt: skip
    try:
        yield deployment
    finally:
        stop_local(deployment)


def test_business_filters_remove_items_and_categories(
    catalog_served: LocalDeployment,
) -> None:
    body = {
        "instances": [
            {
                "item_ids": [item_id(1)],
                "k": 10,
                "exclude_item_ids": [item_id(29)],
                "exclude_categories": ["even"],
            }
        ]
    }

    response = httpx.post(f"{catalog_served.endpoint}:predict", json=body)

    assert response.status_code == 200, response.text
    items = response.json()["predictions"][0]["item_ids"]
    # 15 odd items, minus the history (1) and the excluded 29: 13 left.
    assert len(items) == 10
    assert all(int(i) % 2 == 1 for i in items)
    assert item_id(29) not in items
    assert item_id(1) not in items


def test_explain_route_names_history_items_behind_each_recommendation(
    catalog_served: LocalDeployment,
) -> None:
    history = [item_id(1), item_id(2), item_id(3), item_id(4)]
    body = {"instances": [{"item_ids": history, "k": 4}]}

    explained = httpx.post(f"{catalog_served.endpoint}:explain", json=body)
    predicted = httpx.post(f"{catalog_served.endpoint}:predict", json=body)

    assert explained.status_code == 200, explained.text
    [prediction] = explained.json()["predictions"]
    assert prediction["item_ids"] == predicted.json()["predictions"][0]["item_ids"]
    assert "explanations" not in predicted.json()["predictions"][0]
    assert len(prediction["explanations"]) == 4
    for contributions in prediction["explanations"]:
        assert len(contributions) == 3
        assert {c["item_id"] for c in contributions} <= set(history)
        similarities = [c["similarity"] for c in contributions]
        assert similarities == sorted(similarities, reverse=True)


def test_oversized_body_is_refused_with_413_before_parsing(
    catalog_served: LocalDeployment,
) -> None:
    big = {"instances": [{"item_ids": [item_id(1)] * 900}]}

    response = httpx.post(f"{catalog_served.endpoint}:predict", json=big)

    assert response.status_code == 413
    assert "the limit is 4096 bytes" in response.json()["error"]
    assert httpx.get(catalog_served.endpoint).status_code == 200


@pytest.mark.timeout(120)
def test_overload_is_shed_with_503_while_health_answers_and_it_recovers(
    catalog_served: LocalDeployment,
) -> None:
    body = {"instances": [{"item_ids": [item_id(i)], "k": 10} for i in range(1, 30)]}

    def predict(_: int) -> int:
        return httpx.post(
            f"{catalog_served.endpoint}:predict", json=body, timeout=30
        ).status_code

    with ThreadPoolExecutor(max_workers=24) as pool:
        burst = pool.map(predict, range(200))
        health = [httpx.get(catalog_served.endpoint).status_code for _ in range(5)]
        statuses = list(burst)
    after = [predict(0) for _ in range(5)]

    assert set(statuses) <= {200, 503}
    assert statuses.count(503) > 0
    assert statuses.count(200) > 0
    assert health == [200] * 5
    assert after == [200] * 5
    assert metric(
        catalog_served, "shopml_server_rejected_requests_total", reason="shed"
    )
