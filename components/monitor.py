"""Monitor stage: probe the deployed endpoint with real users and check its answers.

The core ``probe_endpoint`` asks the endpoint for each user's top-k over the v1 and the
v2 protocol (httpx), records latency and errors, and checks every answer: k items, no
duplicates, nothing from the user's history, non-empty titles, v1 and v2 agreeing.
``run_monitor`` picks the users from the raw events (raw ids, as the application sends
them), finds their histories in the curated events through the pseudonymizer, probes,
and ``render_report`` writes the HTML report. Raw user ids appear in no log, metric or
report: users are numbered.

The server knows only the most recent ``history_window`` items of a user (the online
store's sequence), so that is the history it must exclude; recommendations of items the
user saw before that window are counted separately (``seen_before_window``) and warned
about, not failed. ``monitor`` below is the thin KFP component around the core.
"""

import base64
import html
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from kfp import dsl

from components.common import stage_component
from shopml.security import Pseudonymizer

logger = logging.getLogger(__name__)

DEFAULT_K = 10
DEFAULT_HISTORY_WINDOW = 50
_V1_MODEL_PATH = "/v1/models/"
# A request that returns (item_ids, titles) or raises.
_Call = Callable[[], tuple[list[str], list[str]]]


class MonitorCheckError(RuntimeError):
    """The endpoint returned errors or answers that fail the sanity checks."""


@dataclass(frozen=True)
class ProbeCall:
    """One request to the endpoint.

    Attributes:
        user_index: position of the user in the probed list (raw ids are not kept).
        protocol: ``"v1"`` or ``"v2"``.
        status_code: HTTP status; 0 when no response came back.
        latency_ms: wall time of the request.
        item_ids: recommended item ids, best first (empty on error).
        titles: their titles.
        error: what went wrong, or ``None``.
    """

    user_index: int
    protocol: str
    status_code: int
    latency_ms: float
    item_ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class MonitorResult:
    """Every probe call and the sanity failures found in the answers.

    Attributes:
        k: items asked per user.
        calls: the calls, v1 and v2 for each user.
        sanity_failures: one line per failed check, naming the user number and protocol.
        seen_before_window: recommended items the user saw before the history window.
    """

    k: int
    calls: list[ProbeCall] = field(default_factory=list)
    sanity_failures: list[str] = field(default_factory=list)
    seen_before_window: int = 0

    @property
    def error_rate(self) -> float:
        """Share of calls that failed (0.0 with no calls)."""
        if not self.calls:
            return 0.0
        return sum(call.error is not None for call in self.calls) / len(self.calls)

    @property
    def latencies_ms(self) -> np.ndarray:
        """Latency of every call that got a response, in ms."""
        return np.array(
            [c.latency_ms for c in self.calls if c.status_code], dtype=float
        )

    def metrics(self) -> dict[str, float]:
        """Stage metrics: latency percentiles (ms), error rate, failure counts."""
        latencies = self.latencies_ms
        if latencies.size == 0:
            latencies = np.array([np.nan])
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
        return {
            "latency_p50_ms": float(p50),
            "latency_p95_ms": float(p95),
            "latency_p99_ms": float(p99),
            "latency_max_ms": float(np.max(latencies)),
            "error_rate": self.error_rate,
            "sanity_failures": float(len(self.sanity_failures)),
            "seen_before_window": float(self.seen_before_window),
            "requests": float(len(self.calls)),
        }

    def raise_for_failures(self) -> None:
        """Raise when any call failed or any answer failed a sanity check.

        Raises:
            MonitorCheckError: with the error rate and the first failures.
        """
        if not self.sanity_failures and self.error_rate == 0:
            return
        errors = [
            f"user #{c.user_index} {c.protocol}: {c.error}"
            for c in self.calls
            if c.error
        ]
        shown = "; ".join([*errors, *self.sanity_failures][:10])
        raise MonitorCheckError(
            f"endpoint checks failed: error_rate={self.error_rate:.3f}, "
            f"sanity_failures={len(self.sanity_failures)}; first: {shown}"
        )


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """Split a v1 model URL into the server URL and the model name.

    Args:
        endpoint: ``http://host:port/v1/models/<name>``, as the deploy stage returns it.

    Returns:
        ``("http://host:port", "<name>")``.

    Raises:
        ValueError: the URL has no ``/v1/models/<name>`` path.
    """
    root, marker, name = endpoint.rstrip("/").partition(_V1_MODEL_PATH)
    if not marker or not name or "/" in name:
        raise ValueError(
            f"endpoint={endpoint!r} is not a v1 model URL; expected "
            "http://host:port/v1/models/<name>"
        )
    return root, name


def _v1_call(
    client: httpx.Client, name: str, user: str, k: int
) -> tuple[list[str], list[str]]:
    response = client.post(
        f"/v1/models/{name}:predict", json={"instances": [{"user_id": user, "k": k}]}
    )
    response.raise_for_status()
    prediction = response.json()["predictions"][0]
    return list(prediction["item_ids"]), list(prediction["titles"])


def _v2_call(
    client: httpx.Client, name: str, user: str, k: int, request_id: str
) -> tuple[list[str], list[str]]:
    body = {
        "id": request_id,
        "inputs": [
            {"name": "user_id", "shape": [1], "datatype": "BYTES", "data": [user]},
            {"name": "k", "shape": [1], "datatype": "INT32", "data": [k]},
        ],
    }
    response = client.post(f"/v2/models/{name}/infer", json=body)
    response.raise_for_status()
    outputs = {output["name"]: output["data"] for output in response.json()["outputs"]}
    # Rows are padded with "" when fewer than k items remain.
    items = [item for item in outputs["item_ids"] if item]
    return items, list(outputs["titles"][: len(items)])


def _timed_call(protocol: str, user_index: int, call: _Call) -> ProbeCall:
    """Run one request, measure it, and turn failures into a recorded error."""
    started = time.perf_counter()
    try:
        item_ids, titles = call()
    except httpx.HTTPStatusError as err:
        latency_ms = (time.perf_counter() - started) * 1000
        status, text = err.response.status_code, err.response.text[:200]
        return ProbeCall(
            user_index, protocol, status, latency_ms, error=f"HTTP {status}: {text}"
        )
    except (httpx.TransportError, KeyError, IndexError, TypeError, ValueError) as err:
        latency_ms = (time.perf_counter() - started) * 1000
        return ProbeCall(
            user_index, protocol, 0, latency_ms, error=f"{type(err).__name__}: {err}"
        )
    latency_ms = (time.perf_counter() - started) * 1000
    return ProbeCall(user_index, protocol, 200, latency_ms, item_ids, titles)


def check_answer(call: ProbeCall, k: int, history: set[str]) -> list[str]:
    """The sanity failures of one successful answer.

    Args:
        call: the call and its answer.
        k: items asked for.
        history: item ids the server must not recommend to this user.

    Returns:
        One line per failed check, naming the user number and protocol.
    """
    where = f"user #{call.user_index} {call.protocol}"
    failures = []
    if len(call.item_ids) != k:
        failures.append(f"{where}: {len(call.item_ids)} items returned, expected {k}")
    if len(set(call.item_ids)) != len(call.item_ids):
        failures.append(f"{where}: duplicate items in {call.item_ids}")
    seen = sorted(set(call.item_ids) & history)
    if seen:
        failures.append(f"{where}: recommended items from the user's history {seen}")
    if len(call.titles) != len(call.item_ids) or not all(call.titles):
        failures.append(f"{where}: empty or missing titles {call.titles}")
    return failures


def _probe_user(
    client: httpx.Client,
    model_name: str,
    index: int,
    user: str,
    *,
    k: int,
    history: set[str],
) -> tuple[list[ProbeCall], list[str]]:
    """Ask for one user's top-k over v1 and v2; return the calls and sanity failures."""
    v1 = _timed_call("v1", index, partial(_v1_call, client, model_name, user, k))
    v2 = _timed_call(
        "v2", index, partial(_v2_call, client, model_name, user, k, f"monitor-{index}")
    )

    failures = []
    for call in (v1, v2):
        if call.error is None:
            failures += check_answer(call, k, history)
    if v1.error is None and v2.error is None and v1.item_ids != v2.item_ids:
        failures.append(
            f"user #{index}: v1 and v2 disagree: {v1.item_ids} vs {v2.item_ids}"
        )
    return [v1, v2], failures


def probe_endpoint(
    url: str,
    model_name: str,
    users: list[str],
    histories: dict[str, set[str]] | None,
    k: int = DEFAULT_K,
    *,
    timeout_s: float = 10.0,
) -> MonitorResult:
    """Ask the endpoint for each user's top-k over v1 and v2 and check the answers.

    Args:
        url: the server URL, ``http://host:port``.
        model_name: the model name in the URLs.
        users: raw user ids, as the application sends them.
        histories: per raw user id, the items the server must not recommend; ``None``
            skips that check.
        k: items asked per user.
        timeout_s: per-request timeout.

    Returns:
        Every call with its latency, and the sanity failures.
    """
    result = MonitorResult(k=k)
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        for index, user in enumerate(users):
            history = (histories or {}).get(user, set())
            calls, failures = _probe_user(
                client, model_name, index, user, k=k, history=history
            )
            result.calls += calls
            result.sanity_failures += failures

    logger.info(
        "probed model=%s users=%d requests=%d error_rate=%.3f sanity_failures=%d",
        model_name,
        len(users),
        len(result.calls),
        result.error_rate,
        len(result.sanity_failures),
    )
    return result


@dataclass(frozen=True)
class UserSample:
    """Users to probe and what the checks need to know about them.

    Attributes:
        users: raw user ids.
        recent: per raw id, the last ``history_window`` items (the server excludes
            these).
        full: per raw id, every item in the curated events.
    """

    users: list[str]
    recent: dict[str, set[str]]
    full: dict[str, set[str]]


def sample_users(
    raw_dir: Path,
    curated_dir: Path,
    pseudonymizer: Pseudonymizer,
    n_users: int,
    *,
    history_window: int = DEFAULT_HISTORY_WINDOW,
    seed: int = 0,
) -> UserSample:
    """Pick users from the raw events and find their curated histories.

    Args:
        raw_dir: raw zone folder with ``events.parquet`` (raw user ids).
        curated_dir: curated folder with ``events.parquet`` (pseudonyms).
        pseudonymizer: the key the clean stage used.
        n_users: users to pick (all when there are fewer).
        history_window: the most recent items per user the server knows.
        seed: seed of the sample.

    Returns:
        The users, in sample order, with their recent and full item sets.

    Raises:
        ValueError: ``n_users`` is below 1 or the raw events hold no user.
    """
    if n_users < 1:
        raise ValueError(f"n_users={n_users} must be at least 1")
    raw = pd.read_parquet(raw_dir / "events.parquet", columns=["user_id"])
    candidates = sorted(raw["user_id"].dropna().astype(str).unique())
    if not candidates:
        raise ValueError(f"{raw_dir / 'events.parquet'} holds no user_id")
    rng = np.random.default_rng(seed)
    picked = rng.choice(
        len(candidates), size=min(n_users, len(candidates)), replace=False
    )
    users = [candidates[i] for i in picked]

    # Histories in sequence order, (timestamp, item_id), as the online store keeps them.
    by_pseudonym = {pseudonymizer.pseudonymize(user): user for user in users}
    events = pd.read_parquet(
        curated_dir / "events.parquet", columns=["user_id", "item_id", "timestamp"]
    )
    events = events[events["user_id"].isin(by_pseudonym.keys())]
    events = events.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    recent: dict[str, set[str]] = {user: set() for user in users}
    full: dict[str, set[str]] = {user: set() for user in users}
    for pseudonym, group in events.groupby("user_id", sort=False):
        items = group["item_id"].astype(str).tolist()
        full[by_pseudonym[str(pseudonym)]] = set(items)
        recent[by_pseudonym[str(pseudonym)]] = set(items[-history_window:])
    return UserSample(users, recent, full)


def count_seen_before_window(result: MonitorResult, sample: UserSample) -> int:
    """Recommended items that the user saw before the server's history window."""
    count = 0
    for call in result.calls:
        user = sample.users[call.user_index]
        older = sample.full[user] - sample.recent[user]
        count += len(older.intersection(call.item_ids))
    return count


def run_monitor(
    endpoint: str,
    raw_dir: Path,
    curated_dir: Path,
    pseudonymizer: Pseudonymizer,
    *,
    n_users: int = 20,
    k: int = DEFAULT_K,
    history_window: int = DEFAULT_HISTORY_WINDOW,
) -> MonitorResult:
    """Sample users, probe the endpoint and count recommendations of older items.

    Args:
        endpoint: the v1 model URL from the deploy stage.
        raw_dir: raw zone folder with ``events.parquet``.
        curated_dir: curated folder with ``events.parquet``.
        pseudonymizer: the key the clean stage used.
        n_users: users to probe.
        k: items asked per user.
        history_window: the most recent items per user the server knows.

    Returns:
        The probe result.
    """
    url, model_name = split_endpoint(endpoint)
    sample = sample_users(
        raw_dir, curated_dir, pseudonymizer, n_users, history_window=history_window
    )
    result = probe_endpoint(url, model_name, sample.users, sample.recent, k)
    result.seen_before_window = count_seen_before_window(result, sample)
    if result.seen_before_window:
        logger.warning(
            "model=%s recommended %d item(s) users saw before their last %d items: the "
            "online store keeps only that window, so older items are not excluded",
            model_name,
            result.seen_before_window,
            history_window,
        )
    return result


def _latency_histogram_png(latencies_ms: np.ndarray) -> str:
    """A latency histogram as base64 PNG (matplotlib object API, no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3), dpi=100)
    axes = figure.subplots()
    axes.hist(
        latencies_ms, bins=min(30, max(5, latencies_ms.size // 2)), color="#4c72b0"
    )
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("requests")
    axes.set_title("Request latency, v1 and v2")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_report(result: MonitorResult, endpoint: str) -> str:
    """The monitor report as a self-contained HTML page.

    Args:
        result: the probe result.
        endpoint: the probed model URL, shown in the heading.

    Returns:
        HTML with the metrics, a latency histogram, the sanity failures and one row per
        call.
    """
    metric_rows = "".join(
        f"<tr><td>{name}</td><td>{value:.3f}</td></tr>"
        for name, value in result.metrics().items()
    )
    call_rows = "".join(
        f"<tr><td>#{c.user_index}</td><td>{c.protocol}</td><td>{c.status_code}</td>"
        f"<td>{c.latency_ms:.1f}</td><td>{len(c.item_ids)}</td>"
        f"<td>{html.escape(' | '.join(c.titles[:3]))}</td>"
        f"<td>{html.escape(c.error or '')}</td></tr>"
        for c in result.calls
    )
    failures = "".join(
        f"<li>{html.escape(line)}</li>" for line in result.sanity_failures
    )
    latencies = result.latencies_ms
    histogram = (
        f'<img alt="latency histogram" src="data:image/png;base64,'
        f'{_latency_histogram_png(latencies)}">'
        if latencies.size
        else "<p>No response came back: no latency to show.</p>"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>shopml monitor</title>"
        "<style>body{font-family:sans-serif}"
        "td,th{padding:2px 8px;text-align:left}</style></head><body>"
        f"<h1>Endpoint monitor</h1><p>{html.escape(endpoint)}, k={result.k}</p>"
        f"<h2>Metrics</h2><table>{metric_rows}</table>{histogram}"
        f"<h2>Sanity failures ({len(result.sanity_failures)})</h2>"
        f"<ul>{failures or '<li>none</li>'}</ul>"
        "<h2>Requests</h2><table><tr><th>user</th><th>protocol</th><th>status</th>"
        "<th>ms</th><th>items</th><th>first titles</th><th>error</th></tr>"
        f"{call_rows}</table></body></html>"
    )


@stage_component
def monitor(
    endpoint: str,
    raw: dsl.Input[dsl.Dataset],
    curated: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
    n_users: int = 20,
) -> None:
    """Probe the endpoint with sampled users, log metrics, write the report, then check.

    Args:
        endpoint: the v1 model URL from the deploy stage.
        raw: the ingest stage's refs to the raw tables (raw user ids are read from
            the restricted raw zone), or a folder with ``events.parquet``.
        curated: curated folder with ``events.parquet``.
        metrics: latency_p50_ms, latency_p99_ms, error_rate, sanity_failures and more.
        report: the HTML report.
        n_users: users to probe.

    Raises:
        MonitorCheckError: any error or sanity failure (after metrics and report).
    """
    import tempfile
    from pathlib import Path

    from components.ingest import fetch_raw_tables
    from components.monitor import render_report, run_monitor
    from shopml.assets import asset_store_from_settings, read_refs
    from shopml.config import load_settings
    from shopml.logs import configure_logging
    from shopml.security import load_pseudonymizer

    configure_logging()
    settings = load_settings()
    pseudonymizer = load_pseudonymizer(settings)
    refs = read_refs(Path(raw.path))
    with tempfile.TemporaryDirectory(prefix="shopml-monitor-") as tmp:
        raw_dir = Path(raw.path)
        if refs is not None:  # raw ids come from the restricted raw zone
            events = {"events": refs["events"]}
            assets = asset_store_from_settings(settings)
            raw_dir = fetch_raw_tables(events, assets, Path(tmp) / "raw")
        result = run_monitor(
            endpoint, raw_dir, Path(curated.path), pseudonymizer, n_users=n_users
        )

    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(render_report(result, endpoint))
    result.raise_for_failures()


@stage_component
def drift_monitor(
    reference: dsl.Input[dsl.Dataset],
    current: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
    retrain: bool = False,
    kfp_host: str = "",
) -> bool:
    """Compare current events with the training events; retrain when they drifted.

    Args:
        reference: curated folder the model was trained on (``events.parquet``).
        current: folder with the events since (``events.parquet``, and optionally
            ``impressions.jsonl`` and ``feedback.parquet`` from serving).
        metrics: PSI/KS per feature, new-item share, popularity shift, SLOs, hit rate.
        report: the HTML drift report with plots.
        retrain: start the retraining pipeline when a threshold is crossed.
        kfp_host: Kubeflow Pipelines API URL for that run; empty runs it locally.

    Returns:
        Whether a threshold was crossed.
    """
    from pathlib import Path

    import pandas as pd

    from shopml.canary import read_impressions
    from shopml.config import load_settings
    from shopml.drift import render_drift_report, retraining_trigger, run_drift_monitor
    from shopml.logs import configure_logging

    configure_logging()
    folder = Path(current.path)
    logs = {}
    if (folder / "impressions.jsonl").is_file():
        logs["impressions"] = read_impressions(folder / "impressions.jsonl")
    if (folder / "feedback.parquet").is_file():
        logs["feedback"] = pd.read_parquet(folder / "feedback.parquet")
    trigger = retraining_trigger(load_settings(), {}, kfp_host or None)
    result = run_drift_monitor(
        pd.read_parquet(Path(reference.path) / "events.parquet"),
        pd.read_parquet(folder / "events.parquet"),
        trigger if retrain else None,
        **logs,
    )

    for name, value in result.metrics.items():
        metrics.log_metric(name, float(value))
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(render_drift_report(result))
    return result.should_retrain
