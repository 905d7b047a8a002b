"""Personalization of search by the recommender: SASRec's view of a user's next item.

:class:`SASRecPersonalizer` wraps the *same* loaded :class:`~shopml.artifact.ModelArtifact`
the recommender serves (no copy of weights or item embeddings): a user's history of item
ids goes through SASRec's forward pass, and the last position's representation is scored
against the shared item embedding table (``full_sort_scores``). A user without known
history gets the artifact's training popularity, the recommender's own fallback.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shopml.artifact import ModelArtifact
from shopml.models.sasrec import left_pad


class SASRecPersonalizer:
    """Next-item scores of the recommender's SASRec model, by model index.

    Args:
        artifact: the loaded model artifact, shared with the recommender.
    """

    def __init__(self, artifact: ModelArtifact) -> None:
        self.artifact = artifact

    def columns(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64 [len(item_ids)]: each item's model index, 0 for items it never saw."""
        index_of = self.artifact.index_of
        return np.fromiter(
            (index_of(item_id) or 0 for item_id in item_ids),
            dtype=np.int64,
            count=len(item_ids),
        )

    def scores(self, history: Sequence[str]) -> np.ndarray:
        """Score every model item as the user's next one.

        Args:
            history: the user's item ids, oldest first; unknown ids are skipped.

        Returns:
            float32 [n_items + 1]; column 0 (padding) is ``-inf``. Popularity when no
            history item is known to the model.
        """
        known = [
            index
            for index in (self.artifact.index_of(item_id) for item_id in history)
            if index is not None
        ]
        if not known:
            scores = self.artifact.popularity.astype(np.float32).copy()
            scores[0] = -np.inf
            return scores
        item_seq = left_pad([known], self.artifact.config.max_seq_len)  # [1, L]
        with torch.inference_mode():
            scores_t = self.artifact.model.full_sort_scores(item_seq)[0]  # [N + 1]
        return scores_t.float().numpy()
