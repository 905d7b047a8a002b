"""Model artifact round trip and verification of a damaged folder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shopml.artifact import (
    ITEMS_FILE,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    MODEL_FILE,
    POPULARITY_FILE,
    ArtifactError,
    ModelCard,
    data_versions,
    load_model_artifact,
    load_model_card,
    save_model_artifact,
    save_model_card,
)
from shopml.models.sasrec import SASRec, SASRecConfig, left_pad

N_ITEMS = 12


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and stay fast when other jobs load the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def items_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "index": np.arange(1, N_ITEMS + 1),
            "item_id": [f"sku-{i:03d}" for i in range(1, N_ITEMS + 1)],
            "title": [f"Item {i}" for i in range(1, N_ITEMS + 1)],
        }
    )


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    config = SASRecConfig(n_items=N_ITEMS, max_seq_len=10, hidden_size=32, dropout=0.0)
    return SASRec(config).eval()


@pytest.fixture
def artifact_dir(tmp_path: Path, model: SASRec) -> Path:
    popularity = np.arange(N_ITEMS + 1, dtype=np.float32)
    save_model_artifact(
        tmp_path / "model", model, items_table(), popularity, {"run": "r1"}
    )
    return tmp_path / "model"


def test_round_trip_restores_model_items_and_popularity(
    artifact_dir: Path, model: SASRec
) -> None:
    artifact = load_model_artifact(artifact_dir)
    item_seq = left_pad([[1, 5, 7]], 10)

    torch.testing.assert_close(
        artifact.model.full_sort_scores(item_seq), model.full_sort_scores(item_seq)
    )
    assert artifact.config == model.config
    assert artifact.item_ids[:3] == ["", "sku-001", "sku-002"]
    assert artifact.titles[N_ITEMS] == f"Item {N_ITEMS}"
    assert artifact.popularity.dtype == np.float32
    assert artifact.popularity.tolist() == list(range(N_ITEMS + 1))
    assert artifact.extra == {"run": "r1"}
    assert not artifact.model.training


def test_index_of_maps_ids_and_rejects_unknown_and_padding(artifact_dir: Path) -> None:
    artifact = load_model_artifact(artifact_dir)

    assert artifact.index_of("sku-007") == 7
    assert artifact.index_of("sku-999") is None
    assert artifact.index_of("") is None


def test_manifest_lists_size_and_sha256_of_every_file(artifact_dir: Path) -> None:
    manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())

    files = manifest["files"]
    assert sorted(files) == sorted(
        ["model.pt", "config.json", "items.parquet", "popularity.npy"]
    )
    assert files[MODEL_FILE]["size"] == (artifact_dir / MODEL_FILE).stat().st_size
    assert len(files[MODEL_FILE]["sha256"]) == 64


@pytest.mark.parametrize(
    "name", [MODEL_FILE, ITEMS_FILE, POPULARITY_FILE, MANIFEST_FILE], ids=str
)
def test_a_missing_file_raises_naming_it(artifact_dir: Path, name: str) -> None:
    (artifact_dir / name).unlink()

    with pytest.raises(ArtifactError, match=name):
        load_model_artifact(artifact_dir)


def test_a_corrupted_file_fails_the_checksum(artifact_dir: Path) -> None:
    data = bytearray((artifact_dir / MODEL_FILE).read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes
    (artifact_dir / MODEL_FILE).write_bytes(bytes(data))

    with pytest.raises(ArtifactError, match=f"{MODEL_FILE} does not match"):
        load_model_artifact(artifact_dir)


def test_a_garbled_manifest_raises(artifact_dir: Path) -> None:
    (artifact_dir / MANIFEST_FILE).write_text("{not json")

    with pytest.raises(ArtifactError, match="not a valid manifest"):
        load_model_artifact(artifact_dir)


def test_items_that_do_not_match_the_model_are_refused(
    tmp_path: Path, model: SASRec
) -> None:

    short = items_table().iloc[:-1]

    with pytest.raises(ValueError, match=f"must be exactly 1..{N_ITEMS}"):
        save_model_artifact(tmp_path, model, short, np.zeros(N_ITEMS + 1))
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_the_model_card_round_trips_and_is_optional(tmp_path: Path) -> None:
    assert load_model_card(tmp_path) is None
    card = ModelCard("sasrec", {"events": "events@abc"}, {"epochs": 3}, {"best": 2})

    save_model_card(tmp_path, card)

    loaded = load_model_card(tmp_path)
    assert loaded == card
    assert "recommendation" in loaded.intended_use


def test_data_versions_prefer_the_store_stage_refs(tmp_path: Path) -> None:
    (tmp_path / "events.parquet").write_bytes(b"x")
    assert set(data_versions(tmp_path)) == {"events"}
    (tmp_path / "versions.json").write_text('{"events": "events@0123"}')

    assert data_versions(tmp_path) == {"events": "events@0123"}


def test_a_garbled_model_card_raises(tmp_path: Path) -> None:
    (tmp_path / MODEL_CARD_FILE).write_text("{not json")

    with pytest.raises(ArtifactError, match="not a valid model card"):
        load_model_card(tmp_path)
