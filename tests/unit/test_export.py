"""The inference export: item matrix + exported encoder, and int8 quantization."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shopml.models.export import (
    ENCODER_FILE,
    ITEM_MATRIX_FILE,
    InferenceModel,
    export_inference,
)
from shopml.models.sasrec import SASRec, SASRecConfig, left_pad

N_ITEMS = 40
MAX_SEQ_LEN = 12


def tiny_model() -> SASRec:
    torch.manual_seed(0)
    config = SASRecConfig(n_items=N_ITEMS, max_seq_len=MAX_SEQ_LEN, hidden_size=32)
    return SASRec(config).eval()


def histories() -> torch.Tensor:
    return left_pad([[1, 2, 3], [5], list(range(1, 30))], MAX_SEQ_LEN)


def test_the_export_scores_like_the_model(tmp_path: Path) -> None:
    model = tiny_model()

    export_inference(model, tmp_path)
    loaded = InferenceModel.load(tmp_path)

    assert (tmp_path / ENCODER_FILE).is_file()
    assert (tmp_path / ITEM_MATRIX_FILE).is_file()
    assert loaded.max_seq_len == MAX_SEQ_LEN
    with torch.no_grad():
        expected = model.full_sort_scores(histories())
    assert torch.allclose(loaded.full_sort_scores(histories()), expected, atol=1e-5)
    # the batch size is dynamic: one history works as well as three
    single = loaded.full_sort_scores(histories()[:1])
    assert torch.allclose(single, expected[:1], atol=1e-5)


def test_int8_quantization_keeps_the_ranking_close() -> None:
    model = tiny_model()

    quantized = InferenceModel.from_model(model, quantize=True)

    with torch.no_grad():
        expected = model.full_sort_scores(histories())
    scores = quantized.full_sort_scores(histories())
    assert torch.isneginf(scores[:, 0]).all()
    assert (scores[:, 1:] - expected[:, 1:]).abs().max() < 0.1
    assert torch.nn.quantized.dynamic.Linear in {
        type(m) for m in quantized.encoder.modules()
    }


def test_loading_an_incomplete_export_names_the_missing_file(tmp_path: Path) -> None:
    export_inference(tiny_model(), tmp_path)
    (tmp_path / ITEM_MATRIX_FILE).unlink()

    with pytest.raises(FileNotFoundError, match=r"item_matrix\.npy"):
        InferenceModel.load(tmp_path)
