"""Evaluate stage: SASRec against popularity on the test split, and the release gate.

The core ``evaluate_models`` rebuilds the leave-one-out split from the curated tables,
loads the model artifact and scores SASRec and the popularity baseline under the same
protocol (shopml.evaluation: full ranking over all items, history excluded).
``check_gate`` raises :class:`GateError` when SASRec's NDCG@10 does not beat
popularity's by ``min_lift``; ``render_report`` makes a self-contained HTML page (table
and bar chart). ``evaluate`` below is the thin KFP component; it fails the task when
the gate fails, so nothing downstream deploys the model.
"""

import base64
import html
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import dsl

from components.common import stage_component
from components.train import read_curated
from shopml.artifact import load_model_artifact
from shopml.evaluation import DEFAULT_KS, METRICS, evaluate_scorer
from shopml.models.baselines import PopularityRecommender
from shopml.sequences import split_events

logger = logging.getLogger(__name__)

PROTOCOL = "leave-one-out, full ranking over all items, history excluded"
GATE_METRIC = "ndcg_10"
MODEL = "sasrec"
BASELINE = "popularity"


class GateError(Exception):
    """The model does not beat the baseline by the required margin."""


@dataclass
class EvaluationResult:
    """Test metrics of every model under one protocol.

    Attributes:
        models: model name -> metric -> value (``hr_10``, ``ndcg_10``, ``mrr_10``, ...).
        n_users: users evaluated (those with a test target).
        n_items: items ranked.
        seconds: evaluation wall time.
    """

    models: dict[str, dict[str, float]]
    n_users: int
    n_items: int
    seconds: float

    def metrics(self) -> dict[str, float]:
        """Flat figures for the KFP Metrics artifact, e.g. ``sasrec_ndcg_10``."""
        figures = {
            f"{model}_{name}": value
            for model, row in self.models.items()
            for name, value in row.items()
        }
        figures["n_users"] = float(self.n_users)
        return figures

    def table(self, gate: str | None = None) -> dict[str, Any]:
        """The JSON table the CLI prints: metrics named like ``ndcg@10``."""
        table: dict[str, Any] = {
            "models": {
                model: {name.replace("_", "@"): value for name, value in row.items()}
                for model, row in self.models.items()
            },
            "protocol": PROTOCOL,
            "n_users": self.n_users,
            "n_items": self.n_items,
        }
        if gate is not None:
            table["gate"] = gate
        return table


def evaluate_models(curated_dir: Path, model_dir: Path) -> EvaluationResult:
    """Score SASRec and popularity on every user's test target.

    Args:
        curated_dir: folder with ``events.parquet`` and ``catalog.parquet``, the data
            the model was trained on.
        model_dir: the model artifact folder.

    Returns:
        Test metrics of both models.

    Raises:
        FileNotFoundError: a curated table is missing.
        shopml.artifact.ArtifactError: the model artifact is missing or corrupt.
        ValueError: the curated items differ from the model's item vocabulary.
    """
    started = time.monotonic()
    artifact = load_model_artifact(model_dir)
    events, catalog = read_curated(curated_dir)
    split = split_events(events, catalog)
    if split.vocab.item_ids != artifact.item_ids:
        raise ValueError(
            f"the curated data index {split.n_items} items but the model at "
            f"{model_dir} knows {artifact.config.n_items} (or in another order); "
            "evaluate on the curated folder the model was trained on"
        )

    popularity = PopularityRecommender(split.n_items).fit(split.histories("test"))
    max_seq_len = artifact.config.max_seq_len
    models = {
        MODEL: evaluate_scorer(
            artifact.model.full_sort_scores, split, "test", max_seq_len=max_seq_len
        ),
        BASELINE: evaluate_scorer(
            popularity.full_sort_scores, split, "test", max_seq_len=max_seq_len
        ),
    }
    n_users = int((split.test_items > 0).sum())
    result = EvaluationResult(
        models, n_users, split.n_items, time.monotonic() - started
    )
    logger.info(
        "evaluate done users=%d sasrec_ndcg_10=%.4f popularity_ndcg_10=%.4f "
        "seconds=%.1f",
        n_users,
        models[MODEL][GATE_METRIC],
        models[BASELINE][GATE_METRIC],
        result.seconds,
    )
    return result


@dataclass(frozen=True)
class GateDecision:
    """Whether the model may be deployed, and why, in one line."""

    passed: bool
    message: str


def decide_gate(result: EvaluationResult, min_lift: float = 0.0) -> GateDecision:
    """Pass only when SASRec NDCG@10 > popularity NDCG@10 x (1 + min_lift).

    Args:
        result: the evaluation.
        min_lift: required relative lift, e.g. 0.1 for 10 %.

    Returns:
        The decision; its message names both figures and the threshold.
    """
    model = result.models[MODEL][GATE_METRIC]
    baseline = result.models[BASELINE][GATE_METRIC]
    threshold = baseline * (1.0 + min_lift)
    passed = model > threshold
    message = (
        f"{'passed' if passed else 'failed'}: sasrec ndcg@10 {model:.4f} "
        f"{'>' if passed else '<='} threshold {threshold:.4f} = popularity ndcg@10 "
        f"{baseline:.4f} x (1 + min_lift {min_lift:g})"
    )
    return GateDecision(passed, message)


def check_gate(result: EvaluationResult, min_lift: float = 0.0) -> str:
    """Raise unless SASRec NDCG@10 > popularity NDCG@10 x (1 + min_lift).

    Args:
        result: the evaluation.
        min_lift: required relative lift, e.g. 0.1 for 10 %.

    Returns:
        The gate's one-line message when it passes.

    Raises:
        GateError: the model does not clear the threshold; the message names both
            figures and the threshold.
    """
    decision = decide_gate(result, min_lift)
    logger.info("gate %s", decision.message)
    if not decision.passed:
        raise GateError(f"gate {decision.message}; the model is not deployed")
    return decision.message


def _bar_chart_png(result: EvaluationResult) -> bytes:
    """A grouped bar chart of every @10 and @20 metric per model, as PNG bytes."""
    from matplotlib.figure import Figure

    names = [f"{m}_{k}" for k in DEFAULT_KS for m in METRICS]
    figure = Figure(figsize=(8, 3.5), dpi=100)
    axes = figure.subplots()
    width = 0.8 / max(len(result.models), 1)
    for offset, (model, row) in enumerate(result.models.items()):
        positions = [i + offset * width for i in range(len(names))]
        axes.bar(positions, [row.get(n, 0.0) for n in names], width=width, label=model)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    axes.set_xticklabels([n.replace("_", "@") for n in names])
    axes.set_ylabel("test score")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def render_report(result: EvaluationResult, gate: str) -> str:
    """A self-contained HTML page: protocol, metrics table, gate decision, bar chart."""
    names = sorted({name for row in result.models.values() for name in row})
    header = "".join(f"<th>{html.escape(n.replace('_', '@'))}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{html.escape(model)}</td>"
        + "".join(f"<td>{row[n]:.4f}</td>" for n in names)
        + "</tr>"
        for model, row in result.models.items()
    )
    chart = base64.b64encode(_bar_chart_png(result)).decode("ascii")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<title>shopml evaluation</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Evaluation</h1><p>{html.escape(PROTOCOL)}; users={result.n_users}, "
        f"items={result.n_items}</p>"
        f"<table><tr><th>model</th>{header}</tr>{rows}</table>"
        f"<p>Gate: {html.escape(gate)}</p>"
        f"<img alt='metrics per model' src='data:image/png;base64,{chart}'/>"
        "</body></html>"
    )


@stage_component
def evaluate(
    curated: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
    min_lift: float = 0.0,
) -> str:
    """Evaluate SASRec against popularity and fail the task when the gate fails.

    Args:
        curated: folder with ``events.parquet`` and ``catalog.parquet``.
        model: the model artifact folder from the train stage.
        metrics: every metric per model (``sasrec_ndcg_10``, ``popularity_hr_10``, ...).
        report: HTML page with the metrics table, the gate decision and a bar chart.
        min_lift: relative NDCG@10 lift over popularity the model needs to pass.

    Returns:
        The metrics table as JSON: ``{"models": {...}, "protocol": ..., "gate": ...}``.
    """
    import json
    from pathlib import Path

    from components.evaluate import (
        check_gate,
        decide_gate,
        evaluate_models,
        render_report,
    )
    from shopml.logs import configure_logging

    configure_logging()
    result = evaluate_models(Path(curated.path), Path(model.path))
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)

    # The report shows the decision either way; then a failed gate fails the task.
    decision = decide_gate(result, min_lift)
    with open(report.path, "w", encoding="utf-8") as handle:
        handle.write(render_report(result, decision.message))
    check_gate(result, min_lift)
    return json.dumps(result.table(decision.message))
