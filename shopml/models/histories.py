"""Training histories as the baselines and the co-occurrence graph read them.

A history is one user's item indices in ``1..n_items`` (0 is padding and never an
item), oldest first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def check_item_seqs(item_seqs: Iterable[np.ndarray], n_items: int) -> list[np.ndarray]:
    """The histories as int64 arrays, every index checked against ``1..n_items``.

    Raises:
        ValueError: an index is outside ``1..n_items``; the message names the
            history.
    """
    seqs = [np.asarray(seq, dtype=np.int64) for seq in item_seqs]
    for row, seq in enumerate(seqs):
        if seq.size and (seq.min() < 1 or seq.max() > n_items):
            raise ValueError(
                f"item_seqs[{row}] holds an item index out of range "
                f"(min={seq.min()}, max={seq.max()}); expected 1..{n_items}"
            )
    return seqs


def user_item_pairs(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user row, item) pairs of the histories; repeats count once."""
    users = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    items = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
    pairs = np.unique(np.stack([users, items], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]
