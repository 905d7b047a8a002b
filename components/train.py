"""Train stage: curated events and catalog -> SASRec model artifact.

The core ``train_model`` reads ``events.parquet`` and ``catalog.parquet`` from the
curated folder, builds the leave-one-out split (shopml.sequences), trains SASRec with
early stopping on validation NDCG@10 (shopml.training) and saves the model artifact
(shopml.artifact) with item titles from the catalog and the popularity of every
interaction except the held-out test items. ``train`` below is the thin KFP component.
"""

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from kfp import dsl

from components.common import stage_component
from shopml.artifact import save_model_artifact
from shopml.features import split_for_training
from shopml.models.baselines import PopularityRecommender
from shopml.models.sasrec import SASRecConfig
from shopml.sequences import LeaveOneOutSplit
from shopml.training import TrainConfig, TrainResult, train_sasrec

logger = logging.getLogger(__name__)

EVENTS_FILE = "events.parquet"
CATALOG_FILE = "catalog.parquet"


@dataclass
class TrainParams:
    """Parameters of the train stage; the defaults do well on MovieLens-100K.

    Attributes:
        epochs: upper bound on epochs; early stopping usually ends sooner.
        max_seq_len: number of most recent items the model reads per user.
        hidden_size: width of the Transformer.
        n_layers: number of Transformer blocks.
        n_heads: attention heads per block.
        dropout: dropout rate everywhere in the model.
        loss: ``ce`` (full softmax), ``sampled`` or ``bce``.
        n_negatives: negatives per batch for the ``sampled`` loss.
        lr: peak learning rate.
        batch_size: training windows per step.
        patience: validation rounds without improvement before stopping.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: random seed.
        show_progress: progress bar; ``None`` follows ``SHOPML_PROGRESS``.
        source: training histories from ``events`` (full histories) or ``feast``
            (point-in-time sequences from the offline feature store, as long as the
            features stage's max_seq_len; the features stage must run first). The
            validation and test targets are leave-one-out by time either way.
    """

    epochs: int = 200
    max_seq_len: int = 50
    hidden_size: int = 64
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.2
    loss: str = "ce"
    n_negatives: int = 256
    lr: float = 2e-3
    batch_size: int = 128
    patience: int = 5
    device: str = "auto"
    seed: int = 42
    show_progress: bool | None = None
    source: str = "events"


@dataclass
class TrainSummary:
    """What the train stage produced.

    Attributes:
        model_dir: the model artifact folder.
        n_users: users in the split.
        n_items: items in the vocabulary.
        n_train_interactions: interactions in the training histories.
        best_epoch: epoch whose weights were saved.
        epochs_run: epochs run before stopping.
        seconds: training wall time.
        device: device trained on.
        valid: validation metrics of the saved weights.
    """

    model_dir: str
    n_users: int
    n_items: int
    n_train_interactions: int
    best_epoch: int
    epochs_run: int
    seconds: float
    device: str
    valid: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat figures for the KFP Metrics artifact."""
        figures = {
            "n_users": float(self.n_users),
            "n_items": float(self.n_items),
            "n_train_interactions": float(self.n_train_interactions),
            "best_epoch": float(self.best_epoch),
            "epochs_run": float(self.epochs_run),
            "train_seconds": self.seconds,
        }
        figures.update({f"valid_{name}": value for name, value in self.valid.items()})
        return figures


def read_curated(curated_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the curated events and catalog tables.

    Raises:
        FileNotFoundError: a table is missing from ``curated_dir``.
    """
    tables = []
    for name in (EVENTS_FILE, CATALOG_FILE):
        path = curated_dir / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; the curated folder needs {name}"
            )
        tables.append(pd.read_parquet(path))
    return tables[0], tables[1]


def items_table(split: LeaveOneOutSplit, catalog: pd.DataFrame) -> pd.DataFrame:
    """The artifact's items table: index 1..N, item_id, title (the id if untitled)."""
    item_ids = pd.Series(split.vocab.item_ids[1:], dtype=str)
    catalog_titles = (
        catalog.assign(item_id=catalog["item_id"].astype(str))
        .drop_duplicates("item_id")
        .set_index("item_id")["title"]
    )
    title = item_ids.map(catalog_titles).fillna(item_ids)
    return pd.DataFrame(
        {
            "index": np.arange(1, len(item_ids) + 1, dtype=np.int64),
            "item_id": item_ids.to_numpy(),
            "title": title.astype(str).to_numpy(),
        }
    )


def _configs(params: TrainParams, n_items: int) -> tuple[SASRecConfig, TrainConfig]:
    model_config = SASRecConfig(
        n_items=n_items,
        max_seq_len=params.max_seq_len,
        hidden_size=params.hidden_size,
        n_heads=params.n_heads,
        n_layers=params.n_layers,
        dropout=params.dropout,
        loss=params.loss,
        n_negatives=params.n_negatives,
    )
    train_config = TrainConfig(
        epochs=params.epochs,
        batch_size=params.batch_size,
        lr=params.lr,
        patience=params.patience,
        seed=params.seed,
        device=params.device,
        show_progress=params.show_progress,
    )
    return model_config, train_config


def _summary(
    model_dir: Path, split: LeaveOneOutSplit, result: TrainResult
) -> TrainSummary:
    return TrainSummary(
        model_dir=str(model_dir),
        n_users=len(split.user_ids),
        n_items=split.n_items,
        n_train_interactions=sum(len(seq) for seq in split.train_seqs),
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        seconds=result.seconds,
        device=result.device,
        valid=result.best_valid,
    )


def train_model(
    curated_dir: Path, model_dir: Path, params: TrainParams | None = None
) -> TrainSummary:
    """Train SASRec on the curated tables and save the model artifact.

    Args:
        curated_dir: folder with ``events.parquet`` and ``catalog.parquet``.
        model_dir: folder that receives the model artifact.
        params: stage parameters; defaults when ``None``.

    Returns:
        The training summary.

    Raises:
        FileNotFoundError: a curated table is missing.
        ValueError: the parameters are invalid or the data too small to train on.
    """
    params = params or TrainParams()
    events, catalog = read_curated(curated_dir)
    logger.info("train start events=%d catalog=%d", len(events), len(catalog))
    split = split_for_training(events, catalog, params.source)
    model_config, train_config = _configs(params, split.n_items)

    result = train_sasrec(split, model_config, train_config)

    popularity = PopularityRecommender(split.n_items).fit(split.histories("test"))
    summary = _summary(model_dir, split, result)
    extra: dict[str, Any] = {"train": asdict(summary), "params": asdict(params)}
    save_model_artifact(
        model_dir,
        result.model,
        items_table(split, catalog),
        popularity.popularity,
        extra,
    )
    logger.info(
        "train done model_dir=%s best_epoch=%d valid_ndcg_10=%.4f seconds=%.1f",
        model_dir,
        summary.best_epoch,
        summary.valid.get("ndcg_10", float("nan")),
        summary.seconds,
    )
    return summary


@stage_component
def train(
    curated: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    epochs: int = 200,
    max_seq_len: int = 50,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 2,
    loss: str = "ce",
    device: str = "auto",
    seed: int = 42,
    source: str = "events",
) -> None:
    """Train the SASRec recommender and write the model artifact folder.

    Args:
        curated: folder with ``events.parquet`` and ``catalog.parquet``.
        model: receives the model artifact (model.pt, config.json, items.parquet,
            popularity.npy, manifest.json).
        metrics: validation metrics, best epoch, data sizes and training time.
        epochs: upper bound on epochs; early stopping usually ends sooner.
        max_seq_len: number of most recent items the model reads per user.
        hidden_size: width of the Transformer.
        n_layers: number of Transformer blocks.
        n_heads: attention heads per block.
        loss: ``ce`` (full softmax), ``sampled`` or ``bce``.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        seed: random seed.
        source: training histories from ``events`` or ``feast`` (point-in-time).
    """
    import os
    from pathlib import Path

    from components.train import TrainParams, train_model
    from shopml.logs import configure_logging

    configure_logging()
    params = TrainParams(
        epochs=epochs,
        max_seq_len=max_seq_len,
        hidden_size=hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        loss=loss,
        device=device,
        seed=seed,
        source=source,
    )
    os.makedirs(model.path, exist_ok=True)
    summary = train_model(Path(curated.path), Path(model.path), params)
    for name, value in summary.metrics().items():
        metrics.log_metric(name, value)

    from shopml.assets import asset_store_from_settings, register_model
    from shopml.config import load_settings

    assets = asset_store_from_settings(load_settings())
    asset = register_model(assets, Path(model.path), Path(curated.path))
    model.metadata["asset"] = asset.ref
