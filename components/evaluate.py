"""Evaluate stage: SASRec against the baselines and the live model, and the release gate.

The core ``evaluate_models`` rebuilds the leave-one-out split from the curated tables,
loads the model artifact and scores SASRec, the baselines (popularity, item-to-item
co-occurrence, implicit ALS; shopml.models.baselines) and, when there is one, the
production model (the champion) under the same protocol (shopml.evaluation: full
ranking over all items, history excluded; accuracy, coverage, popularity bias and
per-segment accuracy). ``decide_gate`` passes the model only when its NDCG@10 beats
the best baseline and the champion by ``min_lift``; ``model_card_with`` records the
figures and the decision in the model card; ``render_report`` makes a self-contained
HTML page. ``evaluate`` below is the thin KFP component; it fails the task when the
gate fails, so nothing downstream deploys the model.
"""

import base64
import html
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from kfp import dsl
from torch import Tensor

from components.common import stage_component
from components.train import FIT_ON_TRAIN, FIT_ON_TRAIN_VALID, read_curated
from shopml.artifact import (
    ArtifactError,
    ModelArtifact,
    ModelCard,
    data_versions,
    load_model_artifact,
    load_model_card,
    save_model_card,
)
from shopml.assets import LIVE_POINTER, AssetStore, AssetVersion, register_model
from shopml.evaluation import (
    DEFAULT_KS,
    METRICS,
    SEGMENTS,
    RankingEvaluation,
    ScoreFn,
    SegmentRules,
    evaluate_ranking,
)
from shopml.models.baselines import (
    ImplicitALSRecommender,
    ItemKNNRecommender,
    PopularityRecommender,
)
from shopml.sequences import ItemVocab, LeaveOneOutSplit, Stage, split_events

logger = logging.getLogger(__name__)

PROTOCOL = "leave-one-out, full ranking over all items, history excluded"
GATE_METRIC = "ndcg_10"
MODEL = "sasrec"
BASELINE = "popularity"
BASELINES = ("popularity", "itemknn", "als")
CHAMPION = "champion"
# Baselines read this much of each history (SASRec reads its own max_seq_len).
BASELINE_SEQ_LEN = 200
SEGMENT_FIGURES = ("hr_10", "ndcg_10", "n_users")


class GateError(Exception):
    """The model does not beat the best baseline or the champion by the margin."""


class Scorer(Protocol):
    """Anything with the ``full_sort_scores`` contract of shopml.models."""

    def full_sort_scores(self, item_seq: Tensor) -> Tensor: ...


@dataclass
class EvaluationResult:
    """Test figures of every model under one protocol.

    Attributes:
        models: model name -> metric -> value (``hr_10``, ``ndcg_10``, ``mrr_10``,
            ``coverage_10``, ``popularity_bias_10``, ... and the same @20).
        n_users: users evaluated (those with a test target).
        n_items: items ranked.
        seconds: evaluation wall time.
        segments: model name -> segment (``short_history``, ``long_history``,
            ``cold_item``, ``warm_item``) -> metric -> value, with ``n_users``.
        short_history_max: history length up to which a user counts as short.
        fit_on: what the model and the baselines learned from: ``train``, or
            ``train+valid`` after the train stage's final fit.
    """

    models: dict[str, dict[str, float]]
    n_users: int
    n_items: int
    seconds: float
    segments: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    short_history_max: int = 0
    fit_on: str = FIT_ON_TRAIN

    def metrics(self) -> dict[str, float]:
        """Flat figures for the KFP Metrics artifact, e.g. ``sasrec_ndcg_10`` and
        ``sasrec_cold_item_ndcg_10``."""
        figures = {
            f"{model}_{name}": value
            for model, row in self.models.items()
            for name, value in row.items()
        }
        for model, segments in self.segments.items():
            for segment, row in segments.items():
                for name in SEGMENT_FIGURES:
                    figures[f"{model}_{segment}_{name}"] = row[name]
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
            "fit_on": self.fit_on,
            "n_users": self.n_users,
            "n_items": self.n_items,
        }
        if gate is not None:
            table["gate"] = gate
        return table


def fit_baselines(split: LeaveOneOutSplit, stage: Stage = "valid") -> dict[str, Scorer]:
    """Every baseline fitted on the histories before the ``stage`` target.

    ``"valid"`` (the default) fits on the training histories, the data the train
    stage's SASRec learns from (it early-stops on the validation targets and never
    learns from them). Like SASRec the baselines read each user's validation item at
    test time as history, but never learn from it: fitting them on it would give them
    1 more training pair per user than the model (+20 % on short-history data such as
    Amazon 5-core), an unfair comparison.

    ``"test"`` fits on the training histories plus every validation item: the final
    fit, to compare with a SASRec refitted on the same data
    (``shopml.training.refit_sasrec``) once validation has chosen its epoch count.
    Every model then learns the newest transitions before the test targets.

    Args:
        split: the leave-one-out split.
        stage: ``"valid"`` or ``"test"``, as in ``LeaveOneOutSplit.histories``.

    Returns:
        Baseline name -> fitted model.

    Raises:
        ValueError: ``stage`` is neither ``"valid"`` nor ``"test"``.
    """
    histories = split.histories(stage)
    return {
        "popularity": PopularityRecommender(split.n_items).fit(histories),
        "itemknn": ItemKNNRecommender(split.n_items).fit(histories),
        "als": ImplicitALSRecommender(split.n_items).fit(histories),
    }


def champion_scorer(champion: ModelArtifact, vocab: ItemVocab) -> ScoreFn:
    """Score the current vocabulary with a model trained on another one.

    Histories are translated to the champion's item indices (items it never saw become
    padding) and its scores back; items it does not know score ``-inf``.
    """
    to_champion = torch.tensor(
        [champion.index_of(item_id) or 0 for item_id in vocab.item_ids]
    )  # [N] current index -> champion index, 0 when unknown
    known = torch.nonzero(to_champion > 0).squeeze(1)

    def score(item_seq: Tensor) -> Tensor:
        translated = to_champion.to(item_seq.device)[item_seq]  # [B, L]
        champion_scores = champion.model.full_sort_scores(translated)  # [B, N']
        scores = torch.full(
            (item_seq.size(0), len(vocab.item_ids)),
            float("-inf"),
            device=champion_scores.device,
        )
        scores[:, known] = champion_scores[:, to_champion[known]].float()
        return scores

    return score


def _evaluate_all(
    scorers: dict[str, tuple[ScoreFn, int]],
    split: LeaveOneOutSplit,
    rules: SegmentRules,
) -> dict[str, RankingEvaluation]:
    """Evaluate every named (score function, history width) on the test targets."""
    return {
        name: evaluate_ranking(
            score_fn, split, "test", DEFAULT_KS, rules=rules, max_seq_len=width
        )
        for name, (score_fn, width) in scorers.items()
    }


def evaluate_models(
    curated_dir: Path,
    model_dir: Path,
    champion_dir: Path | None = None,
    rules: SegmentRules | None = None,
) -> EvaluationResult:
    """Score SASRec, every baseline and the champion on every user's test target.

    The baselines learn from what the model learned from: the training histories, or
    those plus every validation item when the train stage saved its final fit (the
    artifact's ``train.fit_on``). The champion is scored as it was trained.

    Args:
        curated_dir: folder with ``events.parquet`` and ``catalog.parquet``, the data
            the model was trained on.
        model_dir: the model artifact folder.
        champion_dir: the production model's artifact folder, if there is one; it may
            know other items than the current data.
        rules: segment thresholds; defaults when ``None``.

    Returns:
        Test figures of every model.

    Raises:
        FileNotFoundError: a curated table is missing.
        shopml.artifact.ArtifactError: a model artifact is missing or corrupt.
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

    scorers: dict[str, tuple[ScoreFn, int]] = {
        MODEL: (artifact.model.full_sort_scores, artifact.config.max_seq_len)
    }
    fit_on = artifact.extra.get("train", {}).get("fit_on", FIT_ON_TRAIN)
    stages: dict[str, Stage] = {FIT_ON_TRAIN: "valid", FIT_ON_TRAIN_VALID: "test"}
    if fit_on not in stages:
        raise ArtifactError(
            f"train.fit_on={fit_on!r} in the manifest of {model_dir} is not one of "
            f"{sorted(stages)}; the baselines cannot be fitted on the model's data"
        )
    stage = stages[fit_on]
    for name, baseline in fit_baselines(split, stage).items():
        scorers[name] = (baseline.full_sort_scores, BASELINE_SEQ_LEN)
    if champion_dir is not None:
        champion = load_model_artifact(champion_dir)
        scorers[CHAMPION] = (
            champion_scorer(champion, split.vocab),
            champion.config.max_seq_len,
        )
    evaluations = _evaluate_all(scorers, split, rules or SegmentRules())

    result = _result(evaluations, split.n_items, time.monotonic() - started, fit_on)
    logger.info(
        "evaluate done users=%d fit_on=%s %s seconds=%.1f",
        result.n_users,
        fit_on,
        " ".join(f"{m}_ndcg_10={r[GATE_METRIC]:.4f}" for m, r in result.models.items()),
        result.seconds,
    )
    return result


def _result(
    evaluations: dict[str, RankingEvaluation],
    n_items: int,
    seconds: float,
    fit_on: str,
) -> EvaluationResult:
    first = next(iter(evaluations.values()))
    return EvaluationResult(
        models={name: e.metrics for name, e in evaluations.items()},
        n_users=first.n_users,
        n_items=n_items,
        seconds=seconds,
        segments={name: e.segments for name, e in evaluations.items()},
        short_history_max=first.short_history_max,
        fit_on=fit_on,
    )


@dataclass(frozen=True)
class GateDecision:
    """Whether the model may be deployed, why in one line, and the figures compared.

    Attributes:
        passed: the model beat every reference by the margin.
        message: one line naming the model's figure, the threshold and its source.
        model: the model's NDCG@10.
        reference: name of the strongest reference (best baseline or champion).
        reference_value: its NDCG@10.
        threshold: ``reference_value * (1 + min_lift)``.
        min_lift: the required relative lift.
        references: every reference's NDCG@10.
    """

    passed: bool
    message: str
    model: float = 0.0
    reference: str = BASELINE
    reference_value: float = 0.0
    threshold: float = 0.0
    min_lift: float = 0.0
    references: dict[str, float] = field(default_factory=dict)


def decide_gate(result: EvaluationResult, min_lift: float = 0.0) -> GateDecision:
    """Pass only when SASRec NDCG@10 > max(baselines, champion) x (1 + min_lift).

    Args:
        result: the evaluation; every model except SASRec is a reference.
        min_lift: required relative lift, e.g. 0.1 for 10 %.

    Returns:
        The decision; its message names both figures and the threshold.

    Raises:
        ValueError: the result has no SASRec row or no reference to compare with.
    """
    if MODEL not in result.models or len(result.models) < 2:
        raise ValueError(
            f"the gate needs {MODEL!r} and at least one baseline; the evaluation has "
            f"{sorted(result.models)}"
        )
    model = result.models[MODEL][GATE_METRIC]
    references = {
        name: row[GATE_METRIC] for name, row in result.models.items() if name != MODEL
    }
    reference = max(references, key=lambda name: references[name])
    threshold = references[reference] * (1.0 + min_lift)
    passed = model > threshold
    message = (
        f"{'passed' if passed else 'failed'}: sasrec ndcg@10 {model:.4f} "
        f"{'>' if passed else '<='} threshold {threshold:.4f} = {reference} ndcg@10 "
        f"{references[reference]:.4f} x (1 + min_lift {min_lift:g})"
    )
    return GateDecision(
        passed,
        message,
        model,
        reference,
        references[reference],
        threshold,
        min_lift,
        references,
    )


def check_gate(result: EvaluationResult, min_lift: float = 0.0) -> str:
    """Raise unless SASRec NDCG@10 beats every reference by ``min_lift``.

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


def model_card_with(
    model_dir: Path,
    curated_dir: Path,
    result: EvaluationResult,
    decision: GateDecision,
) -> ModelCard:
    """The model's card completed with the test figures and the gate's decision.

    A model trained before cards existed gets a new card from its manifest.
    """
    card = load_model_card(model_dir)
    if card is None:
        extra = load_model_artifact(model_dir).extra
        card = ModelCard(
            model=MODEL,
            data=data_versions(curated_dir),
            parameters=dict(extra.get("params", {})),
            training=dict(extra.get("train", {})),
        )
    card.evaluation = {
        "protocol": PROTOCOL,
        "data": data_versions(curated_dir),
        "n_users": result.n_users,
        "n_items": result.n_items,
        "models": result.models,
        "segments": result.segments,
        "short_history_max": result.short_history_max,
    }
    card.gate = asdict(decision)
    return card


def record_decision(
    assets: AssetStore,
    model_dir: Path,
    curated_dir: Path,
    card: ModelCard,
    name: str = "recommender",
) -> AssetVersion:
    """Register the model with its completed card as a version of model asset ``name``.

    The card (test figures, gate decision) joins the model files, and the decision goes
    into the version's ``quality`` too, so the asset store answers "may this version
    be deployed?" without opening files. The input folder is left untouched.

    Returns:
        The new model asset version.
    """
    with tempfile.TemporaryDirectory(prefix="model-card-") as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(model_dir, folder)
        save_model_card(folder, card)
        quality = {"gate": card.gate, "test": card.evaluation.get("models", {})}
        asset = register_model(
            assets, folder, curated_dir, name=name, producer="kfp:evaluate",
            quality=quality,
        )  # fmt: skip
    logger.info(
        "gate decision recorded asset=%s passed=%s", asset.ref, card.gate["passed"]
    )
    return asset


def find_live_model(assets: AssetStore, name: str, dest: Path) -> Path | None:
    """Fetch the version of model asset ``name`` that is live (being served).

    The deploy stage marks the served version with ``shopml.assets.mark_live`` (the
    pointer ``models/<name>/_live``); older records with ``"live": true`` in a
    manifest's ``quality`` count too.

    Returns:
        ``dest`` holding the model artifact, or ``None`` when no version is live.
    """
    try:
        versions = assets.versions(name)
    except ValueError as err:
        raise ValueError(f"champion_model={name!r} is not a valid asset name") from err
    pointer = f"models/{name}/{LIVE_POINTER}"
    served = (
        json.loads(assets.store.get_bytes(pointer))["version"]
        if assets.store.exists(pointer)
        else None
    )
    live = [
        v
        for v in versions
        if v.version == served or (v.quality or {}).get("live") is True
    ]
    if not live:
        logger.info("no live version of model asset=%s: no champion to beat", name)
        return None
    assets.fetch_dir(name, live[-1].version, dest)
    logger.info("champion asset=%s", live[-1].ref)
    return dest


def _bar_chart_png(result: EvaluationResult) -> bytes:
    """A grouped bar chart of every @10 and @20 metric per model, as PNG bytes."""
    from matplotlib.figure import Figure

    names = [f"{m}_{k}" for k in DEFAULT_KS for m in METRICS]
    figure = Figure(figsize=(9, 3.5), dpi=100)
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


def _html_table(rows: dict[str, dict[str, float]], label: str) -> str:
    """An HTML table, one row per key of ``rows``, one column per metric."""
    names = list(dict.fromkeys(n for row in rows.values() for n in row))
    header = "".join(f"<th>{html.escape(n.replace('_', '@'))}</th>" for n in names)
    body = "".join(
        f"<tr><td>{html.escape(key)}</td>"
        + "".join(f"<td>{row.get(n, float('nan')):.4f}</td>" for n in names)
        + "</tr>"
        for key, row in rows.items()
    )
    return f"<table><tr><th>{html.escape(label)}</th>{header}</tr>{body}</table>"


def _segment_rows(result: EvaluationResult) -> dict[str, dict[str, float]]:
    """Segment table rows: ``model / segment`` -> HR@10, NDCG@10, users."""
    return {
        f"{model} / {segment}": {
            name: segments[segment][name] for name in SEGMENT_FIGURES
        }
        for model, segments in result.segments.items()
        for segment in SEGMENTS
        if segment in segments
    }


def render_report(result: EvaluationResult, gate: str) -> str:
    """A self-contained HTML page: protocol, metrics, segments, gate and a bar chart."""
    chart = base64.b64encode(_bar_chart_png(result)).decode("ascii")
    segments = ""
    if result.segments:
        segments = (
            f"<h2>Segments</h2><p>short history: at most {result.short_history_max} "
            "items; cold item: target seen at most a few times in all histories</p>"
            + _html_table(_segment_rows(result), "model / segment")
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<title>shopml evaluation</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:4px 8px;text-align:right}</style></head><body>"
        f"<h1>Evaluation</h1><p>{html.escape(PROTOCOL)}; users={result.n_users}, "
        f"items={result.n_items}; every model fitted on {html.escape(result.fit_on)}"
        "</p>"
        + _html_table(result.models, "model")
        + f"<p>Gate: {html.escape(gate)}</p>"
        + segments
        + f"<img alt='metrics per model' src='data:image/png;base64,{chart}'/>"
        "</body></html>"
    )


def champion_from_store(name: str) -> Path | None:
    """Fetch the live model asset ``name`` from the configured store into a temp dir.

    Returns:
        Its folder, or ``None`` when ``name`` is empty or no version is live.
    """
    if not name:
        return None
    from shopml.assets import asset_store_from_settings
    from shopml.config import load_settings

    assets = asset_store_from_settings(load_settings())
    return find_live_model(assets, name, Path(tempfile.mkdtemp(prefix="champion-")))


@stage_component
def evaluate(
    curated: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
    card: dsl.Output[dsl.Artifact],
    min_lift: float = 0.0,
    champion_model: str = "",
) -> str:
    """Evaluate SASRec against the baselines and the live model; gate the release.

    Args:
        curated: folder with ``events.parquet`` and ``catalog.parquet``.
        model: the model artifact folder from the train stage.
        metrics: every metric per model (``sasrec_ndcg_10``, ``itemknn_hr_10``, ...),
            and per segment (``sasrec_cold_item_ndcg_10``, ...).
        report: HTML page with the metrics and segment tables, the gate decision and a
            bar chart.
        card: the model card (JSON) completed with the test figures and the decision;
            the model is also registered with it as a new version of the
            ``recommender`` asset, the decision in the version's ``quality``.
        min_lift: relative NDCG@10 lift over the best reference the model needs.
        champion_model: models-zone asset whose newest live version the model must
            also beat; empty for none.

    Returns:
        The metrics table as JSON: ``{"models": {...}, "protocol": ..., "gate": ...}``.
    """
    import json
    from pathlib import Path

    from components.evaluate import (
        champion_from_store,
        check_gate,
        decide_gate,
        evaluate_models,
        model_card_with,
        record_decision,
        render_report,
    )
    from shopml.assets import asset_store_from_settings
    from shopml.config import load_settings
    from shopml.logs import configure_logging

    configure_logging()
    champion_dir = champion_from_store(champion_model)
    result = evaluate_models(Path(curated.path), Path(model.path), champion_dir)
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)

    # Report and card record the decision either way; then a failed gate fails the task.
    decision = decide_gate(result, min_lift)
    with open(report.path, "w", encoding="utf-8") as handle:
        handle.write(render_report(result, decision.message))
    model_card = model_card_with(Path(model.path), Path(curated.path), result, decision)
    with open(card.path, "w", encoding="utf-8") as handle:
        handle.write(model_card.to_json())
    assets = asset_store_from_settings(load_settings())
    asset = record_decision(assets, Path(model.path), Path(curated.path), model_card)
    card.metadata["asset"] = asset.ref
    check_gate(result, min_lift)
    return json.dumps(result.table(decision.message))
