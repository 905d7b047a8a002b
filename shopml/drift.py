"""Drift and health of a served model: the monitoring half of the loop back to training.

:func:`compute_drift` compares current traffic with the training-time reference:

* data drift on per-event features (PSI and the two-sample KS test): events per user,
  the training popularity of the items users touch, and ``value`` when present;
* the share of interactions with items the model has never seen (new-item share);
* the popularity shift: total variation distance between the item distributions;
* training-serving skew: PSI between a feature as computed offline and as served;
* online hit rate and latency / error SLOs from the impression log when given.

Each figure is checked against :class:`DriftThresholds`; :func:`run_drift_monitor`
calls the retraining trigger when any threshold is crossed (the KFP client on a
cluster, :func:`shopml.runner.run_local_pipeline` otherwise: see
:func:`retraining_trigger`). :func:`render_drift_report` writes the HTML report with
plots.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from shopml.config import Settings

logger = logging.getLogger(__name__)

# Ids of the per-event features compared between reference and current traffic.
FEATURES = ("events_per_user", "item_log_popularity", "value")
_EPS = 1e-6


@dataclass(frozen=True)
class DriftThresholds:
    """When the monitor asks for retraining.

    Attributes:
        psi: population stability index above which a feature has drifted
            (0.1 slight, 0.2 significant, by convention).
        ks_pvalue: KS p-value below which a feature has drifted (with ``psi``
            crossed too, so that huge samples do not flag trivial shifts).
        new_item_share: largest acceptable share of interactions with unknown items.
        popularity_tvd: largest acceptable total variation distance between the
            reference and current item distributions.
        skew_psi: PSI above which offline and served features disagree.
        min_hit_rate: lowest acceptable online hit rate (when impressions are given).
        p99_ms: latency SLO (p99 of successful requests).
        error_rate: error SLO (share of 5xx answers).
    """

    psi: float = 0.2
    ks_pvalue: float = 0.01
    new_item_share: float = 0.2
    popularity_tvd: float = 0.3
    skew_psi: float = 0.2
    min_hit_rate: float = 0.01
    p99_ms: float = 50.0
    error_rate: float = 0.01


@dataclass
class DriftReport:
    """Every figure, the threshold breaches, and the samples behind the plots.

    Attributes:
        metrics: figure name -> value.
        breaches: one sentence per crossed threshold.
        samples: feature -> (reference values, current values), for the plots.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    breaches: list[str] = field(default_factory=list)
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def should_retrain(self) -> bool:
        """Whether any threshold was crossed."""
        return bool(self.breaches)


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Population stability index of ``actual`` against ``expected``.

    Bins are quantiles of ``expected``; empty bins get a tiny share so the index stays
    finite.

    Raises:
        ValueError: either sample is empty.
    """
    if expected.size == 0 or actual.size == 0:
        raise ValueError(
            f"psi needs two non-empty samples, got {expected.size} and {actual.size}"
        )
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    if edges.size < 3:  # a constant reference: one bin for it, one for the rest
        value = float(expected[0])
        edges = np.array([-np.inf, value - _EPS, value + _EPS, np.inf])
    e = np.histogram(expected, edges)[0] / expected.size + _EPS
    a = np.histogram(actual, edges)[0] / actual.size + _EPS
    return float(np.sum((a - e) * np.log(a / e)))


def ks_test(expected: np.ndarray, actual: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and asymptotic p-value."""
    both = np.sort(np.concatenate([expected, actual]))
    cdf_e = np.searchsorted(np.sort(expected), both, side="right") / expected.size
    cdf_a = np.searchsorted(np.sort(actual), both, side="right") / actual.size
    statistic = float(np.max(np.abs(cdf_e - cdf_a)))
    n = expected.size * actual.size / (expected.size + actual.size)
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * statistic
    # Kolmogorov distribution tail, as in Numerical Recipes' probks.
    pvalue = 2 * sum(
        (-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 101)
    )
    return statistic, float(min(max(pvalue, 0.0), 1.0))


def event_features(
    events: pd.DataFrame, popularity: pd.Series
) -> dict[str, np.ndarray]:
    """Per-event feature samples: activity, item popularity and value.

    Args:
        events: canonical events.
        popularity: reference interaction count per item id.

    Returns:
        Feature name -> values (``value`` only when the column holds numbers).
    """
    per_user = events.groupby("user_id")["item_id"].transform("size")
    counts = events["item_id"].map(popularity).fillna(0).to_numpy(dtype=float)
    samples = {
        "events_per_user": per_user.to_numpy(dtype=float),
        "item_log_popularity": np.log1p(counts),
    }
    if "value" in events and events["value"].notna().any():
        samples["value"] = events["value"].dropna().to_numpy(dtype=float)
    return samples


def popularity_tvd(reference: pd.DataFrame, current: pd.DataFrame) -> float:
    """Total variation distance between the item distributions (0 same, 1 disjoint)."""
    p = reference["item_id"].value_counts(normalize=True)
    q = current["item_id"].value_counts(normalize=True)
    p, q = p.align(q, fill_value=0.0)
    return float(0.5 * np.abs(p - q).sum())


def compute_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    thresholds: DriftThresholds | None = None,
    *,
    impressions: pd.DataFrame | None = None,
    feedback: pd.DataFrame | None = None,
    served_features: dict[str, np.ndarray] | None = None,
) -> DriftReport:
    """Compare current events (and serving logs) with the training reference.

    Args:
        reference: canonical events the model was trained on.
        current: canonical events since.
        thresholds: when to ask for retraining; default :class:`DriftThresholds`.
        impressions: the impression log (``shopml.canary`` format), for SLOs and the
            online hit rate.
        feedback: click/purchase events, for the online hit rate.
        served_features: feature -> values as read online, compared with the same
            feature computed offline from ``current`` (training-serving skew).

    Returns:
        The report.

    Raises:
        ValueError: ``reference`` or ``current`` is empty.
    """
    if reference.empty or current.empty:
        raise ValueError(
            f"drift needs reference and current events, got {len(reference)} and "
            f"{len(current)} rows"
        )
    limits = thresholds or DriftThresholds()
    report = DriftReport()
    popularity = reference["item_id"].value_counts()
    _feature_drift(report, event_features(reference, popularity),
                   event_features(current, popularity), limits)  # fmt: skip
    _catalog_drift(report, reference, current, limits)
    if served_features:
        _skew(report, event_features(current, popularity), served_features, limits)
    if impressions is not None:
        _serving_health(report, impressions, feedback, limits)
    logger.info(
        "drift figures=%d breaches=%d retrain=%s",
        len(report.metrics),
        len(report.breaches),
        report.should_retrain,
    )
    return report


def _feature_drift(
    report: DriftReport,
    reference: dict[str, np.ndarray],
    current: dict[str, np.ndarray],
    limits: DriftThresholds,
) -> None:
    for name in FEATURES:
        if name not in reference or name not in current:
            continue
        index = psi(reference[name], current[name])
        statistic, pvalue = ks_test(reference[name], current[name])
        report.metrics |= {
            f"psi_{name}": index,
            f"ks_{name}": statistic,
            f"ks_pvalue_{name}": pvalue,
        }
        report.samples[name] = (reference[name], current[name])
        if index > limits.psi and pvalue < limits.ks_pvalue:
            report.breaches.append(
                f"{name} drifted: PSI {index:.3f} > {limits.psi} and KS p-value "
                f"{pvalue:.2g} < {limits.ks_pvalue}"
            )


def _catalog_drift(
    report: DriftReport,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    limits: DriftThresholds,
) -> None:
    known = set(reference["item_id"].astype(str))
    share = float((~current["item_id"].astype(str).isin(known)).mean())
    tvd = popularity_tvd(reference, current)
    report.metrics |= {"new_item_share": share, "popularity_tvd": tvd}
    if share > limits.new_item_share:
        report.breaches.append(
            f"{share:.1%} of interactions are with items the model never saw "
            f"(limit {limits.new_item_share:.0%})"
        )
    if tvd > limits.popularity_tvd:
        report.breaches.append(
            f"item popularity shifted: total variation {tvd:.3f} > "
            f"{limits.popularity_tvd}"
        )


def _skew(
    report: DriftReport,
    offline: dict[str, np.ndarray],
    served: dict[str, np.ndarray],
    limits: DriftThresholds,
) -> None:
    for name, values in served.items():
        if name not in offline or values.size == 0:
            continue
        index = psi(offline[name], values)
        report.metrics[f"skew_psi_{name}"] = index
        if index > limits.skew_psi:
            report.breaches.append(
                f"training-serving skew on {name}: PSI {index:.3f} > {limits.skew_psi}"
            )


def _serving_health(
    report: DriftReport,
    impressions: pd.DataFrame,
    feedback: pd.DataFrame | None,
    limits: DriftThresholds,
) -> None:
    from shopml.canary import CanaryPolicy, count_hits

    ok = impressions[impressions["status"] < 400]
    error_rate = (
        float((impressions["status"] >= 500).mean()) if len(impressions) else 0.0
    )
    p99 = float(np.percentile(ok["latency_ms"], 99)) if len(ok) else 0.0
    report.metrics |= {"error_rate": error_rate, "latency_p99_ms": p99}
    if error_rate > limits.error_rate:
        report.breaches.append(f"error rate {error_rate:.4f} > SLO {limits.error_rate}")
    if p99 > limits.p99_ms:
        report.breaches.append(f"p99 latency {p99:.1f} ms > SLO {limits.p99_ms} ms")
    users = ok[ok["user_id"] != ""]
    if feedback is None or users.empty:
        return
    hits = count_hits(users, feedback, CanaryPolicy().hit_horizon)
    hit_rate = float(hits.mean())
    report.metrics["online_hit_rate"] = hit_rate
    if hit_rate < limits.min_hit_rate:
        report.breaches.append(
            f"online hit rate {hit_rate:.4f} < {limits.min_hit_rate}"
        )


def _histogram_png(name: str, reference: np.ndarray, current: np.ndarray) -> str:
    """Reference vs current histogram as base64 PNG (matplotlib object API)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 2.6), dpi=90)
    axes = figure.subplots()
    edges = np.histogram_bin_edges(np.concatenate([reference, current]), 30).tolist()
    axes.hist(reference, bins=edges, alpha=0.6, density=True, label="reference")
    axes.hist(current, bins=edges, alpha=0.6, density=True, label="current")
    axes.set_title(name)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_drift_report(report: DriftReport) -> str:
    """The drift report as a self-contained HTML page with one plot per feature."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{value:.4f}</td></tr>"
        for name, value in report.metrics.items()
    )
    breaches = "".join(f"<li>{html.escape(line)}</li>" for line in report.breaches)
    plots = "".join(
        f'<img alt="{name}" src="data:image/png;base64,'
        f'{_histogram_png(name, *samples)}">'
        for name, samples in report.samples.items()
    )
    verdict = "retraining requested" if report.should_retrain else "no retraining"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>shopml drift</title>"
        "</head><body><h1>Drift and serving health</h1>"
        f"<p><b>{verdict}</b></p><h2>Threshold breaches</h2>"
        f"<ul>{breaches or '<li>none</li>'}</ul><h2>Figures</h2>"
        f"<table>{rows}</table><h2>Distributions</h2>{plots}</body></html>"
    )


RetrainTrigger = Callable[[DriftReport], Any]


def retraining_trigger(
    settings: Settings, arguments: dict[str, Any], kfp_host: str | None = None
) -> RetrainTrigger:
    """The default trigger: a KFP run on a cluster, the local runner otherwise.

    Args:
        settings: process settings.
        arguments: lifecycle pipeline parameters for the new run.
        kfp_host: the Kubeflow Pipelines API URL; ``None`` runs locally.

    Returns:
        A callable that starts the retraining pipeline for a report.
    """

    def trigger(report: DriftReport) -> Any:
        logger.warning(
            "starting the retraining pipeline: %s", "; ".join(report.breaches)
        )
        if kfp_host:
            import kfp

            from pipelines.lifecycle import lifecycle_pipeline

            client = kfp.Client(host=kfp_host)
            return client.create_run_from_pipeline_func(
                lifecycle_pipeline, arguments=arguments
            )
        from shopml.runner import run_local_pipeline

        return run_local_pipeline(settings, arguments)

    return trigger


def run_drift_monitor(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    trigger: RetrainTrigger | None,
    thresholds: DriftThresholds | None = None,
    **logs: Any,
) -> DriftReport:
    """Compute drift and start retraining when a threshold is crossed.

    Args:
        reference: training events.
        current: events since.
        trigger: called with the report when retraining is needed; ``None`` only
            reports.
        thresholds: see :class:`DriftThresholds`.
        **logs: ``impressions``, ``feedback``, ``served_features`` for
            :func:`compute_drift`.

    Returns:
        The report.
    """
    report = compute_drift(reference, current, thresholds, **logs)
    if report.should_retrain and trigger is not None:
        trigger(report)
    return report
