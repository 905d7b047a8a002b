"""Non-neural baselines that SASRec must beat, scored under the same contract.

Every baseline offers ``full_sort_scores(item_seq) -> [B, n_items + 1]`` with column 0
(padding) at ``-inf``, like :class:`shopml.models.sasrec.SASRec`, so the evaluation and
the model servers treat them alike. Only popularity exists today; item-KNN and matrix
factorisation would be added here as further classes with ``fit`` and
``full_sort_scores``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class PopularityRecommender:
    """Ranks every user's candidates by how often each item was interacted with.

    Args:
        n_items: number of real items; indices are ``1..n_items``, 0 is padding.
    """

    def __init__(self, n_items: int) -> None:
        if n_items < 1:
            raise ValueError(f"n_items={n_items} must be at least 1")
        self.n_items = n_items
        self.popularity = np.zeros(n_items + 1, dtype=np.float32)

    def fit(self, item_seqs: Iterable[np.ndarray]) -> PopularityRecommender:
        """Count interactions per item.

        Args:
            item_seqs: training histories, item indices in ``1..n_items``.

        Returns:
            This recommender, fitted.

        Raises:
            ValueError: an index is outside ``1..n_items``.
        """
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        for item_seq in item_seqs:
            seq = np.asarray(item_seq, dtype=np.int64)
            if seq.size and (seq.min() < 1 or seq.max() > self.n_items):
                raise ValueError(
                    f"item index out of range: min={seq.min()}, max={seq.max()}; "
                    f"expected 1..{self.n_items}"
                )
            counts += np.bincount(seq, minlength=self.n_items + 1)
        self.popularity = counts.astype(np.float32)
        logger.debug("popularity fitted on %d interactions", int(counts.sum()))
        return self

    def full_sort_scores(self, item_seq: Tensor) -> Tensor:
        """The same popularity scores for every history.

        Args:
            item_seq: long [B, L]; only B is used.

        Returns:
            float [B, n_items + 1], column 0 is ``-inf``.
        """
        scores = torch.from_numpy(self.popularity).to(item_seq.device).clone()
        scores[0] = float("-inf")
        return scores.unsqueeze(0).expand(item_seq.size(0), -1)
