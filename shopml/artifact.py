"""The model artifact: a folder with SASRec weights, its config, items and a manifest.

Layout (see docs/architecture.md): ``model.pt`` (state_dict), ``config.json``
(:class:`SASRecConfig`), ``items.parquet`` (index, item_id, title),
``popularity.npy`` (fallback ranking) and ``manifest.json`` with the sha256 and size of
each, written last so a folder without a manifest is known to be incomplete. Loading
verifies the manifest before reading anything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
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
