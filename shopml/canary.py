"""Canary analysis: compare a new model version with the stable one, then promote or
roll back, on a cluster or locally.

Inputs are the impression log (one row per served request: ``time``, ``request_id``,
``variant`` ``stable``/``canary``, ``status``, ``latency_ms``, ``user_id`` pseudonym or
``""``, ``item_ids`` served) and feedback events (canonical events with ``click`` or
``purchase``). :func:`analyze_canary` compares the two variants over a window on error
rate, p99 latency and online hit rate (the share of impressions whose user clicked or
bought one of the served items within ``hit_horizon``), with minimum sample sizes:

* too few requests or impressions on either side: ``wait``;
* canary error rate above stable's by more than ``max_error_rate_increase``, p99 above
  ``max_p99_ratio`` x stable's (+ ``p99_slack_ms``), or a hit rate significantly lower
  (one-sided two-proportion z-test at ``z_critical``): ``rollback``;
* otherwise ``promote``.

Unlike Flagger or Argo Rollouts, which judge HTTP success and latency only, the
recommendation quality itself decides. :func:`apply_decision` sends the decision to
the traffic (a KServe ``InferenceService`` through :class:`KServeTraffic`, or the local
splitter through :class:`LocalTraffic`), records it with its figures in the audit log
and attaches it to the model asset (``models/<name>/_decisions/<version>/...``; a
promoted version is also marked live). Applying a decision that is already in place
changes nothing, so repeated canary/rollback/canary cycles leave the traffic exactly
where the last decision put it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
import pandas as pd

from shopml.assets import AssetStore, mark_live
from shopml.audit import AuditEvent, AuditLog

logger = logging.getLogger(__name__)

VARIANTS = ("stable", "canary")
FEEDBACK_TYPES = ("click", "purchase")
IMPRESSION_COLUMNS = (
    "time", "request_id", "variant", "status", "latency_ms", "user_id", "item_ids",
)  # fmt: skip
# What each decision does to the canary's traffic share.
DECISION_TRAFFIC = {"promote": 100, "rollback": 0}


@dataclass(frozen=True)
class CanaryPolicy:
    """Thresholds of the canary analysis.

    Attributes:
        window: how far back impressions count (ending at the analysis time).
        hit_horizon: how long after an impression a click or purchase counts as a hit.
        min_requests: requests each variant needs before any verdict.
        min_impressions: impressions with a user each variant needs for the hit rate.
        max_error_rate_increase: largest acceptable canary minus stable error rate.
        max_p99_ratio: largest acceptable canary p99 / stable p99 ...
        p99_slack_ms: ... plus this many ms (tiny p99s vary by whole milliseconds).
        z_critical: one-sided z beyond which the canary's lower hit rate is real
            (1.645: 5 % false rollbacks of an equally good model).
    """

    window: timedelta = timedelta(hours=1)
    hit_horizon: timedelta = timedelta(minutes=30)
    min_requests: int = 200
    min_impressions: int = 200
    max_error_rate_increase: float = 0.01
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 5.0
    z_critical: float = 1.645


@dataclass(frozen=True)
class VariantStats:
    """One variant's figures over the window.

    Attributes:
        variant: ``stable`` or ``canary``.
        requests: requests served (any status).
        errors: requests answered with a 5xx status.
        p99_ms: 99th percentile latency of successful requests (NaN without any).
        impressions: successful requests for a known user (the hit-rate sample).
        hits: impressions followed by a click or purchase of a served item.
    """

    variant: str
    requests: int
    errors: int
    p99_ms: float
    impressions: int
    hits: int

    @property
    def error_rate(self) -> float:
        """Errors per request (0.0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def hit_rate(self) -> float:
        """Hits per impression (0.0 without impressions)."""
        return self.hits / self.impressions if self.impressions else 0.0

    def figures(self) -> dict[str, float]:
        """The figures as a flat dict, for the audit log and reports."""
        return {
            "requests": float(self.requests),
            "errors": float(self.errors),
            "error_rate": round(self.error_rate, 6),
            "p99_ms": round(self.p99_ms, 3),
            "impressions": float(self.impressions),
            "hits": float(self.hits),
            "hit_rate": round(self.hit_rate, 6),
        }


@dataclass(frozen=True)
class CanaryDecision:
    """The verdict and everything it was based on.

    Attributes:
        decision: ``promote``, ``rollback`` or ``wait``.
        reasons: one sentence per rule that fired (or why it waits or promotes).
        stable: the stable variant's figures.
        canary: the canary's figures.
        hit_rate_z: the two-proportion z of canary minus stable hit rate.
        analyzed_at: end of the window.
    """

    decision: str
    reasons: list[str]
    stable: VariantStats
    canary: VariantStats
    hit_rate_z: float
    analyzed_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def details(self) -> dict[str, Any]:
        """The decision as audit-log details (numbers and short sentences)."""
        return {
            "decision": self.decision,
            "reasons": self.reasons,
            "stable": self.stable.figures(),
            "canary": self.canary.figures(),
            "hit_rate_z": round(self.hit_rate_z, 4),
            "analyzed_at": self.analyzed_at.isoformat(),
        }


def read_impressions(path: Path) -> pd.DataFrame:
    """Read an impression log (JSON lines, as the splitter writes it).

    Raises:
        ValueError: a line lacks one of ``IMPRESSION_COLUMNS``.
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    frame = pd.DataFrame(rows, columns=list(IMPRESSION_COLUMNS))
    if frame.isna().any().any():
        bad = frame.columns[frame.isna().any()].tolist()
        raise ValueError(f"impression log {path} has lines without {bad}")
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame


def count_hits(
    impressions: pd.DataFrame, feedback: pd.DataFrame, horizon: timedelta
) -> pd.Series:
    """Whether each impression was followed by a click or purchase of a served item.

    Args:
        impressions: the impression log (see module docstring).
        feedback: canonical events (``user_id`` pseudonym, ``item_id``,
            ``event_type``, ``timestamp``).
        horizon: how long after the impression feedback counts.

    Returns:
        Boolean per impression, on the impressions' index.
    """
    positive = feedback[feedback["event_type"].isin(FEEDBACK_TYPES)]
    served = impressions[["user_id", "item_ids", "time"]].explode("item_ids")
    served = served.dropna(subset=["item_ids"]).rename(columns={"item_ids": "item_id"})
    served = served.reset_index(names="impression")
    joined = served.merge(
        positive[["user_id", "item_id", "timestamp"]], on=["user_id", "item_id"]
    )
    after = joined["timestamp"] > joined["time"]
    within = joined["timestamp"] <= joined["time"] + horizon
    hit_rows = set(joined.loc[after & within, "impression"])
    return pd.Series(impressions.index.isin(list(hit_rows)), index=impressions.index)


def variant_stats(
    impressions: pd.DataFrame, hits: pd.Series, variant: str
) -> VariantStats:
    """Figures of one variant (the impressions are already cut to the window)."""
    rows = impressions[impressions["variant"] == variant]
    ok = rows[rows["status"] < 400]
    latencies = ok["latency_ms"].to_numpy(dtype=float)
    sample = ok[ok["user_id"] != ""]
    return VariantStats(
        variant=variant,
        requests=len(rows),
        errors=int((rows["status"] >= 500).sum()),
        p99_ms=float(np.percentile(latencies, 99)) if latencies.size else math.nan,
        impressions=len(sample),
        hits=int(hits.loc[sample.index].sum()),
    )


def hit_rate_z(stable: VariantStats, canary: VariantStats) -> float:
    """Two-proportion z of canary minus stable hit rate (0.0 when undefined)."""
    n_s, n_c = stable.impressions, canary.impressions
    if not n_s or not n_c:
        return 0.0
    pooled = (stable.hits + canary.hits) / (n_s + n_c)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_s + 1 / n_c))
    if spread == 0:
        return 0.0
    return (canary.hit_rate - stable.hit_rate) / spread


def analyze_canary(
    impressions: pd.DataFrame,
    feedback: pd.DataFrame,
    policy: CanaryPolicy | None = None,
    now: datetime | None = None,
) -> CanaryDecision:
    """Compare canary and stable over the window and decide.

    Args:
        impressions: the impression log (see module docstring).
        feedback: canonical feedback events.
        policy: thresholds; default :class:`CanaryPolicy`.
        now: end of the window; default the newest impression time.

    Returns:
        The decision with its figures and reasons.
    """
    policy = policy or CanaryPolicy()
    end = now or (impressions["time"].max() if len(impressions) else datetime.now(UTC))
    window = impressions[
        (impressions["time"] > end - policy.window) & (impressions["time"] <= end)
    ]
    hits = count_hits(window, feedback, policy.hit_horizon)
    stable, canary = (variant_stats(window, hits, variant) for variant in VARIANTS)
    z = hit_rate_z(stable, canary)

    decision, reasons = _verdict(policy, stable, canary, z)
    result = CanaryDecision(decision, reasons, stable, canary, z, pd.Timestamp(end))
    logger.info(
        "canary analysis decision=%s requests=%d/%d hit_rate=%.4f/%.4f z=%.2f",
        decision,
        stable.requests,
        canary.requests,
        stable.hit_rate,
        canary.hit_rate,
        z,
    )
    return result


def _verdict(
    policy: CanaryPolicy, stable: VariantStats, canary: VariantStats, z: float
) -> tuple[str, list[str]]:
    """Apply the policy's rules: sample sizes first, then each guard."""
    short = [
        f"{v.variant} has {v.requests} requests and {v.impressions} impressions; "
        f"needs {policy.min_requests} and {policy.min_impressions}"
        for v in (stable, canary)
        if v.requests < policy.min_requests or v.impressions < policy.min_impressions
    ]
    if short:
        return "wait", short

    reasons = []
    if canary.error_rate - stable.error_rate > policy.max_error_rate_increase:
        reasons.append(
            f"error rate {canary.error_rate:.4f} exceeds stable "
            f"{stable.error_rate:.4f} by more than {policy.max_error_rate_increase}"
        )
    p99_limit = stable.p99_ms * policy.max_p99_ratio + policy.p99_slack_ms
    if canary.p99_ms > p99_limit:
        reasons.append(
            f"p99 {canary.p99_ms:.1f} ms exceeds the limit {p99_limit:.1f} ms"
        )
    if z < -policy.z_critical:
        reasons.append(
            f"online hit rate {canary.hit_rate:.4f} is significantly below stable "
            f"{stable.hit_rate:.4f} (z={z:.2f} < -{policy.z_critical})"
        )
    if reasons:
        return "rollback", reasons
    return "promote", [
        f"error rate, p99 and online hit rate {canary.hit_rate:.4f} (stable "
        f"{stable.hit_rate:.4f}, z={z:.2f}) are within the policy"
    ]


# --- applying decisions -------------------------------------------------------------


class Traffic(Protocol):
    """Where a decision is applied: reads and sets the canary's traffic share."""

    def canary_percent(self) -> int:
        """The canary's current share, 0..100."""
        ...

    def apply(self, decision: str) -> bool:
        """Apply ``promote`` or ``rollback``; return whether anything changed."""
        ...


class KServeTraffic:
    """A KServe InferenceService's canary, through the ``kubernetes`` client.

    Args:
        api: a ``kubernetes.client.CustomObjectsApi``.
        target: the InferenceService (``components.deploy.ClusterTarget``).
    """

    def __init__(self, api: Any, target: Any) -> None:
        self.api = api
        self.target = target

    def _live(self) -> dict[str, Any]:
        from components.deploy import read_inference_service

        live = read_inference_service(self.api, self.target)
        if live is None:
            raise LookupError(
                f"InferenceService {self.target.namespace}/{self.target.name} does "
                "not exist; deploy a model first"
            )
        return live

    def canary_percent(self) -> int:
        """``canaryTrafficPercent`` of the live object (100 when unset)."""
        predictor = self._live()["spec"]["predictor"]
        return int(predictor.get("canaryTrafficPercent", 100))

    def apply(self, decision: str) -> bool:
        """Merge-patch the InferenceService unless the decision is already applied."""
        from components.deploy import patch_inference_service, traffic_patch

        state = {"promote": "promoted", "rollback": "rolled-back"}[decision]
        patch = traffic_patch(self._live(), state)
        if not patch:
            return False
        patch_inference_service(self.api, self.target, patch)
        return True


class LocalTraffic:
    """The local splitter of ``shopml serve --canary`` (``serving.splitter``).

    Args:
        url: the splitter's root URL, ``http://127.0.0.1:<port>``.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def canary_percent(self) -> int:
        """The splitter's current canary share."""
        response = httpx.get(f"{self.url}/splitter/traffic", timeout=5)
        response.raise_for_status()
        return int(response.json()["canary_percent"])

    def apply(self, decision: str) -> bool:
        """Set the share the decision calls for, unless it is already set."""
        wanted = DECISION_TRAFFIC[decision]
        if self.canary_percent() == wanted:
            return False
        response = httpx.put(
            f"{self.url}/splitter/traffic", json={"canary_percent": wanted}, timeout=5
        )
        response.raise_for_status()
        return True


def apply_decision(
    result: CanaryDecision,
    traffic: Traffic,
    audit: AuditLog,
    *,
    model_ref: str,
    assets: AssetStore | None = None,
) -> AuditEvent | None:
    """Send a decision to the traffic, record it, and attach it to the model asset.

    Args:
        result: the analysis result; ``wait`` changes nothing and records nothing.
        traffic: where traffic is split.
        audit: the audit log.
        model_ref: the canary model, ``name@version`` (or its storage URI).
        assets: the asset store; when given, the decision is stored beside the model
            and a promoted version is marked live.

    Returns:
        The audit event, or ``None`` for ``wait``.
    """
    if result.decision == "wait":
        logger.info(
            "canary model=%s: waiting, %s", model_ref, "; ".join(result.reasons)
        )
        return None
    changed = traffic.apply(result.decision)
    details = {**result.details(), "traffic_changed": changed}
    details["canary_percent"] = traffic.canary_percent()
    event = audit.record(None, "deploy.decision", model_ref, "success", **details)
    if assets is not None and "@" in model_ref:
        _attach(assets, model_ref, event)
    logger.info(
        "canary model=%s decision=%s canary_percent=%d changed=%s",
        model_ref,
        result.decision,
        details["canary_percent"],
        changed,
    )
    return event


def _attach(assets: AssetStore, model_ref: str, event: AuditEvent) -> None:
    """Store the decision next to the model version; mark a promoted one live."""
    name, version = model_ref.split("@", 1)
    key = f"models/{name}/_decisions/{version}/{event.seq:012d}.json"
    assets.store.put_bytes(key, json.dumps(asdict(event), sort_keys=True).encode())
    if event.details["decision"] == "promote":
        mark_live(assets, name, version)


def model_decisions(assets: AssetStore, model_ref: str) -> list[dict[str, Any]]:
    """The decisions attached to a model version, oldest first."""
    name, version = model_ref.split("@", 1)
    prefix = f"models/{name}/_decisions/{version}/"
    return [
        json.loads(assets.store.get_bytes(key))
        for key in sorted(assets.store.list(prefix))
    ]
