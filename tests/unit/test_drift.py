"""Drift monitoring on synthetic traffic: shifted traffic retrains, unshifted does not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shopml.drift import (
    DriftReport,
    DriftThresholds,
    ks_test,
    psi,
    render_drift_report,
    run_drift_monitor,
)

T0 = datetime(2026, 5, 1, tzinfo=UTC)


def synthetic_events(
    seed: int,
    *,
    n_events: int = 4000,
    n_users: int = 400,
    first_item: int = 0,
    zipf: float = 1.3,
    rating_mean: float = 3.5,
) -> pd.DataFrame:
    """Events over 500 items with Zipf popularity; ``first_item`` shifts the catalog."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(zipf, n_events), 500) - 1
    return pd.DataFrame(
        {
            "user_id": [f"u_{u:04d}" for u in rng.integers(0, n_users, n_events)],
            "item_id": [f"i{first_item + r}" for r in ranks],
            "event_type": "rate",
            "timestamp": [T0 + timedelta(minutes=int(m)) for m in range(n_events)],
            "value": np.clip(rng.normal(rating_mean, 1.0, n_events), 1, 5),
        }
    )


class RecordingTrigger:
    """Records the reports it was called with (the retraining pipeline's stand-in)."""

    def __init__(self) -> None:
        self.reports: list[DriftReport] = []

    def __call__(self, report: DriftReport) -> None:
        self.reports.append(report)


def test_unshifted_traffic_does_not_trigger_retraining() -> None:
    trigger = RecordingTrigger()

    report = run_drift_monitor(synthetic_events(1), synthetic_events(2), trigger)

    assert report.breaches == []
    assert trigger.reports == []
    assert report.metrics["psi_item_log_popularity"] < 0.1
    assert report.metrics["new_item_share"] < 0.05  # only the rare Zipf tail


def test_shifted_traffic_triggers_retraining() -> None:
    trigger = RecordingTrigger()
    shifted = synthetic_events(2, first_item=300, rating_mean=2.0, n_users=100)

    report = run_drift_monitor(synthetic_events(1), shifted, trigger)

    assert trigger.reports == [report]
    assert report.metrics["new_item_share"] > 0.2
    assert report.metrics["popularity_tvd"] > 0.3
    assert report.metrics["psi_value"] > 0.2
    text = " ".join(report.breaches)
    assert "never saw" in text
    assert "popularity shifted" in text
    assert "value drifted" in text


def test_serving_slos_skew_and_hit_rate_are_checked() -> None:
    events = synthetic_events(1)
    impressions = pd.DataFrame(
        {
            "time": pd.to_datetime([T0] * 100, utc=True),
            "request_id": [str(i) for i in range(100)],
            "variant": "stable",
            "status": [500] * 5 + [200] * 95,
            "latency_ms": [80.0] * 100,
            "user_id": [f"u_{i:04d}" for i in range(100)],
            "item_ids": [["i1"]] * 100,
        }
    )
    feedback = pd.DataFrame(
        {
            "user_id": ["u_0050"],
            "item_id": ["i1"],
            "event_type": ["click"],
            "timestamp": pd.to_datetime([T0 + timedelta(minutes=1)], utc=True),
        }
    )
    served = {"events_per_user": np.full(500, 40.0)}  # the store serves stale counts

    report = run_drift_monitor(
        events,
        synthetic_events(2),
        None,
        DriftThresholds(min_hit_rate=0.05),
        impressions=impressions,
        feedback=feedback,
        served_features=served,
    )

    assert report.metrics["error_rate"] == 0.05
    assert report.metrics["latency_p99_ms"] == 80.0
    assert report.metrics["online_hit_rate"] == pytest.approx(1 / 95)
    text = " ".join(report.breaches)
    assert "error rate 0.0500 > SLO" in text
    assert "p99 latency 80.0 ms" in text
    assert "training-serving skew on events_per_user" in text
    assert "online hit rate" in text


def test_psi_and_ks_on_known_samples() -> None:
    rng = np.random.default_rng(0)
    same = rng.normal(0, 1, 5000), rng.normal(0, 1, 5000)
    moved = rng.normal(0, 1, 5000), rng.normal(1, 1, 5000)

    assert psi(*same) < 0.02
    assert psi(*moved) > 0.5
    assert ks_test(*same)[1] > 0.01
    statistic, pvalue = ks_test(*moved)
    assert statistic == pytest.approx(0.38, abs=0.03)  # Phi(0.5) - Phi(-0.5)
    assert pvalue < 1e-6
    with pytest.raises(ValueError, match="two non-empty samples"):
        psi(np.array([]), np.array([1.0]))


def test_report_has_a_plot_per_feature(tmp_path: Path) -> None:
    report = run_drift_monitor(synthetic_events(1), synthetic_events(2), None)

    page = render_drift_report(report)

    assert page.count("data:image/png;base64,") == 3
    assert "no retraining" in page
