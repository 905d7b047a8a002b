"""Canary analysis on synthetic impression logs and feedback, and decision records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shopml.assets import AssetStore
from shopml.audit import AuditLog
from shopml.canary import (
    CanaryDecision,
    CanaryPolicy,
    analyze_canary,
    apply_decision,
    count_hits,
    model_decisions,
    read_impressions,
)
from shopml.storage import LocalStore

T0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
POLICY = CanaryPolicy(min_requests=100, min_impressions=100)


def traffic(
    n: int,
    variant: str,
    hit_rate: float,
    *,
    seed: int,
    error_rate: float = 0.0,
    latency_ms: float = 5.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Impressions of one variant and the clicks that give it ``hit_rate``."""
    rng = np.random.default_rng(seed)
    times = [T0 + timedelta(seconds=int(s)) for s in rng.integers(0, 1800, n)]
    users = [f"u_{variant}_{i:05d}" for i in range(n)]
    statuses = np.where(rng.random(n) < error_rate, 500, 200)
    impressions = pd.DataFrame(
        {
            "time": pd.to_datetime(times, utc=True),
            "request_id": [f"{variant}-{i}" for i in range(n)],
            "variant": variant,
            "status": statuses,
            "latency_ms": rng.gamma(4.0, latency_ms / 4.0, n),
            "user_id": users,
            "item_ids": [[f"i{i}", f"j{i}"] for i in range(n)],
        }
    )
    clicked = (rng.random(n) < hit_rate) & (statuses == 200)
    feedback = pd.DataFrame(
        {
            "user_id": [users[i] for i in np.flatnonzero(clicked)],
            "item_id": [f"j{i}" for i in np.flatnonzero(clicked)],
            "event_type": "click",
            "timestamp": [
                times[i] + timedelta(minutes=5) for i in np.flatnonzero(clicked)
            ],
        }
    )
    return impressions, feedback


def mixed(
    stable: tuple[pd.DataFrame, pd.DataFrame], canary: tuple[pd.DataFrame, pd.DataFrame]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    impressions = pd.concat([stable[0], canary[0]], ignore_index=True)
    feedback = pd.concat(
        [f for f in (stable[1], canary[1]) if len(f)], ignore_index=True
    )
    feedback["timestamp"] = pd.to_datetime(feedback["timestamp"], utc=True)
    return impressions, feedback


def decide(stable: tuple, canary: tuple) -> CanaryDecision:
    impressions, feedback = mixed(stable, canary)
    return analyze_canary(impressions, feedback, POLICY, now=T0 + timedelta(hours=1))


def test_lower_online_hit_rate_is_rolled_back() -> None:
    result = decide(
        traffic(800, "stable", 0.20, seed=1), traffic(400, "canary", 0.10, seed=2)
    )

    assert result.decision == "rollback"
    assert result.hit_rate_z < -1.645
    assert result.canary.hit_rate == pytest.approx(0.10, abs=0.03)
    assert "significantly below stable" in result.reasons[0]


def test_better_canary_is_promoted() -> None:
    result = decide(
        traffic(800, "stable", 0.10, seed=3), traffic(400, "canary", 0.20, seed=4)
    )

    assert result.decision == "promote"
    assert result.hit_rate_z > 0
    assert result.stable.impressions == 800
    assert result.canary.impressions == 400


def test_too_few_samples_wait() -> None:
    result = decide(
        traffic(800, "stable", 0.2, seed=5), traffic(50, "canary", 0.0, seed=6)
    )

    assert result.decision == "wait"
    assert "canary has 50 requests" in result.reasons[0]


@pytest.mark.parametrize(
    ("canary_kwargs", "reason"),
    [
        pytest.param({"error_rate": 0.1}, "error rate", id="errors"),
        pytest.param({"latency_ms": 60.0}, "p99", id="latency"),
    ],
)
def test_errors_or_latency_roll_back_even_with_equal_hit_rate(
    canary_kwargs: dict[str, float], reason: str
) -> None:
    result = decide(
        traffic(800, "stable", 0.15, seed=7),
        traffic(800, "canary", 0.15, seed=8, **canary_kwargs),
    )

    assert result.decision == "rollback"
    assert any(r.startswith(reason) for r in result.reasons)


def test_hits_need_a_served_item_after_the_impression_within_the_horizon() -> None:
    impressions = pd.DataFrame(
        {
            "time": pd.to_datetime([T0] * 4, utc=True),
            "user_id": ["a", "b", "c", "d"],
            "item_ids": [["x"], ["x"], ["x"], ["x"]],
        }
    )
    feedback = pd.DataFrame(
        {
            "user_id": ["a", "b", "c", "d"],
            "item_id": ["x", "y", "x", "x"],
            "event_type": ["purchase", "click", "click", "view"],
            "timestamp": pd.to_datetime(
                [T0 + timedelta(minutes=1), T0, T0 - timedelta(minutes=1), T0], utc=True
            )
            + pd.to_timedelta([0, 60, 0, 60], unit="s"),
        }
    )

    hits = count_hits(impressions, feedback, timedelta(minutes=30))

    # a: purchase after; b: another item; c: before the impression; d: only a view.
    assert hits.tolist() == [True, False, False, False]


class FakeTraffic:
    """Traffic whose share is a number: the decision logic without a server."""

    def __init__(self, percent: int) -> None:
        self.percent = percent

    def canary_percent(self) -> int:
        return self.percent

    def apply(self, decision: str) -> bool:
        wanted = {"promote": 100, "rollback": 0}[decision]
        changed, self.percent = self.percent != wanted, wanted
        return changed


def test_decision_is_recorded_with_figures_and_attached_to_the_model(
    tmp_path: Path,
) -> None:
    store = LocalStore(tmp_path / "store")
    assets = AssetStore(store)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(b"weights")
    version = assets.put_dir(
        "recommender", "models", model_dir, owner="t", producer="t", inputs=[]
    ).version
    audit = AuditLog(store, actor="user:test")
    result = decide(
        traffic(800, "stable", 0.10, seed=3), traffic(400, "canary", 0.20, seed=4)
    )

    event = apply_decision(
        result,
        FakeTraffic(10),
        audit,
        model_ref=f"recommender@{version}",
        assets=assets,
    )

    assert event is not None
    assert event.action == "deploy.decision"
    assert event.details["decision"] == "promote"
    assert event.details["canary_percent"] == 100
    assert event.details["canary"]["impressions"] == 400.0
    assert audit.verify().is_intact
    [attached] = model_decisions(assets, f"recommender@{version}")
    assert attached["hash"] == event.hash
    assert store.exists("models/recommender/_live")


def test_repeated_decisions_leave_traffic_where_the_last_one_put_it(
    tmp_path: Path,
) -> None:
    audit = AuditLog(LocalStore(tmp_path / "store"), actor="user:test")
    worse = decide(
        traffic(800, "stable", 0.2, seed=1), traffic(400, "canary", 0.1, seed=2)
    )
    better = decide(
        traffic(800, "stable", 0.1, seed=3), traffic(400, "canary", 0.2, seed=4)
    )
    shares = []
    split = FakeTraffic(10)

    for result in (worse, worse, better, worse, better, better):
        apply_decision(result, split, audit, model_ref="recommender@v")
        shares.append(split.canary_percent())

    assert shares == [0, 0, 100, 0, 100, 100]
    changed = [e.details["traffic_changed"] for e in audit.events()]
    assert changed == [True, False, True, True, True, False]


def test_read_impressions_rejects_lines_without_a_field(tmp_path: Path) -> None:
    path = tmp_path / "impressions.jsonl"
    path.write_text('{"time": "2026-05-01T00:00:00+00:00", "variant": "stable"}\n')

    with pytest.raises(ValueError, match="has lines without"):
        read_impressions(path)
