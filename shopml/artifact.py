"""The model artifact: a folder with SASRec weights, its config, items and a manifest.

Layout (see docs/architecture.md): ``model.pt`` (state_dict), ``config.json``
(:class:`SASRecConfig`), ``items.parquet`` (index, item_id, title),
``popularity.npy`` (fallback ranking) and ``manifest.json`` with the sha256 and size of
each, written last so a folder without a manifest is known to be incomplete. Loading
verifies the manifest before reading anything else.

Beside them, ``model_card.json`` (:class:`ModelCard`) documents the model: the data
versions it was trained on, its parameters, its validation and test figures, the
release gate's decision and its intended use. The card is not in the manifest, because
the evaluate stage completes it after the weights are sealed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from shopml.models.sasrec import SASRec, SASRecConfig

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.parquet"
POPULARITY_FILE = "popularity.npy"
MANIFEST_FILE = "manifest.json"
MODEL_CARD_FILE = "model_card.json"
ARTIFACT_FILES = (MODEL_FILE, CONFIG_FILE, ITEMS_FILE, POPULARITY_FILE)
MANIFEST_VERSION = 1


class ArtifactError(Exception):
    """A model artifact is missing a file, is corrupt or fails its checksum."""


@dataclass
class ModelArtifact:
    """A loaded model artifact, ready to score.

    Attributes:
        model: the SASRec model, in eval mode on the CPU.
        config: its configuration.
        item_ids: item index -> item_id; ``item_ids[0] == ""`` is padding.
        titles: item index -> title, same indexing.
        popularity: float32 [n_items + 1] training popularity, the fallback ranking.
        extra: free-form metadata given at save time (training figures, data version).
    """

    model: SASRec
    config: SASRecConfig
    item_ids: list[str]
    titles: list[str]
    popularity: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {item_id: i for i, item_id in enumerate(self.item_ids) if i > 0}

    def index_of(self, item_id: str) -> int | None:
        """The model index of ``item_id``; ``None`` for an item the model never saw."""
        return self._index.get(item_id)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_items(
    items: pd.DataFrame, popularity: np.ndarray, n_items: int
) -> pd.DataFrame:
    """Validate and normalise the items table against the model's vocabulary size."""
    missing = {"index", "item_id", "title"} - set(items.columns)
    if missing:
        raise ValueError(
            f"items is missing columns {sorted(missing)}; needs index, item_id, title"
        )
    table = (
        items[["index", "item_id", "title"]].sort_values("index").reset_index(drop=True)
    )
    expected = np.arange(1, n_items + 1)
    if len(table) != n_items or not np.array_equal(table["index"].to_numpy(), expected):
        raise ValueError(
            f"items['index'] must be exactly 1..{n_items} (model n_items), "
            f"got {len(table)} rows from {table['index'].min()} to "
            f"{table['index'].max()}"
        )
    if popularity.shape != (n_items + 1,):
        raise ValueError(
            f"popularity has shape {popularity.shape}, expected ({n_items + 1},)"
        )
    return table.astype({"index": "int64", "item_id": "string", "title": "string"})


def save_model_artifact(
    path: Path,
    model: SASRec,
    items: pd.DataFrame,
    popularity: np.ndarray,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a model artifact folder; the manifest goes last.

    Args:
        path: the folder (created if needed); existing artifact files are overwritten.
        model: the trained model; its weights are saved from the CPU.
        items: columns ``index`` (1..n_items), ``item_id``, ``title``.
        popularity: float [n_items + 1] training popularity.
        extra: JSON-serialisable metadata stored in the manifest.

    Raises:
        ValueError: ``items`` or ``popularity`` do not match the model's ``n_items``.
    """
    config = model.config
    table = _check_items(items, np.asarray(popularity), config.n_items)
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST_FILE).unlink(missing_ok=True)

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, path / MODEL_FILE)
    (path / CONFIG_FILE).write_text(
        json.dumps(config.to_dict(), indent=2, sort_keys=True)
    )
    table.to_parquet(path / ITEMS_FILE, index=False)
    np.save(path / POPULARITY_FILE, np.asarray(popularity, dtype=np.float32))

    files = {
        name: {"sha256": _sha256(path / name), "size": (path / name).stat().st_size}
        for name in ARTIFACT_FILES
    }
    manifest = {"version": MANIFEST_VERSION, "files": files, "extra": extra or {}}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    logger.info("model artifact written path=%s n_items=%d", path, config.n_items)


def _read_manifest(path: Path) -> dict[str, Any]:
    """Read the manifest and check every listed file's size and sha256."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} is missing: the artifact is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ArtifactError(f"{manifest_path} is not a valid manifest: {err}") from err

    for name in ARTIFACT_FILES:
        file_path = path / name
        if name not in files:
            raise ArtifactError(f"{manifest_path} does not list {name}")
        if not file_path.is_file():
            raise ArtifactError(f"{file_path} is missing")
        size = file_path.stat().st_size
        if size != files[name].get("size") or _sha256(file_path) != files[name].get(
            "sha256"
        ):
            raise ArtifactError(
                f"{file_path} does not match {MANIFEST_FILE} (size {size}, expected "
                f"{files[name].get('size')}; or sha256 differs): the file is corrupt"
            )
    return dict(manifest)


def load_model_artifact(path: Path) -> ModelArtifact:
    """Load and verify a model artifact folder.

    Args:
        path: the folder written by :func:`save_model_artifact`.

    Returns:
        The artifact with the model in eval mode on the CPU.

    Raises:
        ArtifactError: a file is missing, fails its checksum or cannot be read.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    try:
        config = SASRecConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
        model = SASRec(config)
        state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        items = pd.read_parquet(path / ITEMS_FILE)
        popularity = np.load(path / POPULARITY_FILE, allow_pickle=False).astype(
            np.float32
        )
        table = _check_items(items, popularity, config.n_items)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ArtifactError(
            f"model artifact at {path} cannot be loaded: {err}"
        ) from err

    model.eval()
    logger.info("model artifact loaded path=%s n_items=%d", path, config.n_items)
    return ModelArtifact(
        model=model,
        config=config,
        item_ids=["", *table["item_id"].astype(str).tolist()],
        titles=["", *table["title"].fillna("").astype(str).tolist()],
        popularity=popularity,
        extra=dict(manifest.get("extra") or {}),
    )


INTENDED_USE = (
    "Next-item recommendation for signed-in shoppers from their recent interaction "
    "history (product pages, 'you may also like' rails, personalised search "
    "re-ranking). Not for decisions about people (credit, pricing, eligibility)."
)
LIMITATIONS = (
    "Trained on logged interactions only: it reproduces their popularity and "
    "exposure biases; items with no interactions are only reachable through the "
    "text tower when the model has one; figures are leave-one-out offline estimates."
)


@dataclass
class ModelCard:
    """What a model is, what it was trained on, how good it is and what it is for.

    Attributes:
        model: model family, e.g. ``"sasrec"``.
        created_at: ISO-8601 UTC time the card was first written.
        data: input table -> content version (first 16 hex of its sha256).
        parameters: training parameters and architecture.
        training: training figures (best epoch, validation metrics, time, device).
        evaluation: test figures per model and segment, filled by the evaluate stage.
        gate: the release gate's decision and the figures it compared.
        intended_use: who should use the model for what.
        limitations: known weaknesses a user of the model must know.
    """

    model: str
    data: dict[str, str]
    parameters: dict[str, Any]
    training: dict[str, Any]
    created_at: str = field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds")
    )
    evaluation: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    intended_use: str = INTENDED_USE
    limitations: str = LIMITATIONS

    def to_json(self) -> str:
        """The card as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """Read a card written by :meth:`to_json`.

        Raises:
            ValueError: the text is not JSON or has unknown or missing fields.
        """
        try:
            raw = json.loads(text)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known})
        except (json.JSONDecodeError, TypeError, AttributeError) as err:
            raise ValueError(f"not a model card: {err}") from err


def file_version(path: Path) -> str:
    """The content version of a file: the first 16 hex characters of its sha256."""
    return _sha256(path)[:16]


def data_versions(curated_dir: Path) -> dict[str, str]:
    """The versions of the data in a curated folder, for the model card.

    The store stage's ``versions.json`` (table -> ``name@version`` asset ref) when the
    folder has one; otherwise the content version of every Parquet file in it.
    """
    refs_path = Path(curated_dir) / "versions.json"
    if refs_path.is_file():
        refs = json.loads(refs_path.read_text(encoding="utf-8"))
        return {str(name): str(ref) for name, ref in sorted(refs.items())}
    return {
        path.stem: file_version(path)
        for path in sorted(Path(curated_dir).glob("*.parquet"))
    }


def save_model_card(path: Path, card: ModelCard) -> Path:
    """Write ``model_card.json`` into the model folder ``path``; returns its path."""
    target = Path(path) / MODEL_CARD_FILE
    target.write_text(card.to_json(), encoding="utf-8")
    logger.info("model card written path=%s", target)
    return target


def load_model_card(path: Path) -> ModelCard | None:
    """The model card of the folder ``path``; ``None`` when it has none.

    Raises:
        ArtifactError: the card exists but cannot be read.
    """
    target = Path(path) / MODEL_CARD_FILE
    if not target.is_file():
        return None
    try:
        return ModelCard.from_json(target.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ArtifactError(f"{target} is not a valid model card: {err}") from err
