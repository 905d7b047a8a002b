"""Inference export of SASRec: a precomputed item matrix plus an exported encoder.

Serving a SASRec needs two things per request: encode the history into one vector
(the Transformer) and score every item (a matrix product). The export writes both
halves so a server needs neither the training code nor the text tower:

* ``item_matrix.npy``: float32 [n_items + 1, H], every item's representation (id
  embedding, plus projected text when the model has a text tower), row 0 padding;
* ``encoder.pt2``: the history encoder as a ``torch.export`` program with a dynamic
  batch size, mapping long [B, max_seq_len] histories to float [B, H].

:func:`quantize_int8` makes an int8 dynamically-quantized copy of the encoder's linear
layers (weights int8, activations quantized per batch) for CPU serving; quantized
modules cannot be exported, so a server applies it when it loads the model.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from shopml.models.sasrec import SASRec

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt2"
ITEM_MATRIX_FILE = "item_matrix.npy"
MAX_BATCH = 4096


class HistoryEncoder(nn.Module):
    """SASRec's history encoder with the item table frozen in: [B, L] -> [B, H].

    Args:
        model: a trained SASRec; its item table is computed once, in eval mode.
    """

    table: Tensor

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model.eval()
        with torch.no_grad():
            table = model.item_table().detach().clone()
        self.register_buffer("table", table)

    def forward(self, item_seq: Tensor) -> Tensor:
        """Map long [B, L] left-padded histories to float [B, H] (last position)."""
        return self.model.forward(item_seq, self.table)[:, -1, :]


class InferenceModel:
    """Scores histories with an encoder and a precomputed item matrix.

    Args:
        encoder: maps long [B, max_seq_len] to float [B, H].
        item_matrix: float [n_items + 1, H].
        max_seq_len: history width the encoder expects.
    """

    def __init__(
        self, encoder: nn.Module, item_matrix: Tensor, max_seq_len: int
    ) -> None:
        self.encoder = encoder
        self.item_matrix = item_matrix
        self.max_seq_len = max_seq_len

    @classmethod
    def from_model(cls, model: SASRec, quantize: bool = False) -> InferenceModel:
        """Build from a trained model in memory, optionally int8-quantized."""
        encoder: nn.Module = HistoryEncoder(model)
        item_matrix = encoder.get_buffer("table").clone()
        if quantize:
            encoder = quantize_int8(encoder)
        return cls(encoder, item_matrix, model.config.max_seq_len)

    @classmethod
    def load(cls, folder: Path) -> InferenceModel:
        """Load what :func:`export_inference` wrote.

        Raises:
            FileNotFoundError: a file of the export is missing.
        """
        for name in (ENCODER_FILE, ITEM_MATRIX_FILE):
            if not (Path(folder) / name).is_file():
                raise FileNotFoundError(f"{Path(folder) / name} is missing")
        program = torch.export.load(Path(folder) / ENCODER_FILE)
        item_matrix = torch.from_numpy(np.load(Path(folder) / ITEM_MATRIX_FILE))
        encoder = program.module()
        max_seq_len = int(program.example_inputs[0][0].shape[1])
        return cls(encoder, item_matrix, max_seq_len)

    def full_sort_scores(self, item_seq: Tensor) -> Tensor:
        """Float [B, n_items + 1] scores of long [B, max_seq_len]; column 0 ``-inf``."""
        with torch.no_grad():
            hidden = self.encoder(item_seq)  # [B, H]
            scores = hidden @ self.item_matrix.T  # [B, N]
        scores[:, 0] = float("-inf")
        return scores


def export_inference(model: SASRec, folder: Path) -> Path:
    """Write the item matrix and the exported encoder of ``model`` into ``folder``.

    Args:
        model: a trained SASRec (moved to the CPU, put in eval mode).
        folder: created if needed.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = HistoryEncoder(model.cpu())
    example = torch.zeros((2, model.config.max_seq_len), dtype=torch.long)
    example[:, -1] = 1
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(
        encoder, (example,), dynamic_shapes={"item_seq": {0: batch}}
    )
    torch.export.save(program, folder / ENCODER_FILE)
    np.save(folder / ITEM_MATRIX_FILE, encoder.get_buffer("table").numpy())
    logger.info("inference export written path=%s", folder)
    return folder


def quantize_int8(encoder: nn.Module) -> nn.Module:
    """An int8 dynamically-quantized copy of every ``nn.Linear`` of ``encoder`` (CPU).

    Uses ``torch.ao.quantization.quantize_dynamic``, which torch marks deprecated in
    favour of the separate torchao package (not a dependency of shopml); its
    deprecation warnings are silenced here, and this is the one place to switch.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        quantized: nn.Module = torch.ao.quantization.quantize_dynamic(
            encoder, {nn.Linear}, dtype=torch.qint8
        )
    return quantized
