"""The item co-occurrence graph that SASRec's ``cooccurrence_mix`` smooths items over.

Two items are linked when the same users interacted with both. The strength of a link
is the cosine over users with a shrink term, the similarity of item-based
collaborative filtering (Sarwar et al., WWW 2001):
``sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink)``. Each item keeps its
``k`` strongest links, normalised to sum to 1, as a fixed-width table that
``torch.nn.functional.embedding_bag`` reads in one call. An item with no link (never
seen in training, or seen only by users who saw nothing else) is its own only
neighbour, so smoothing leaves it as it is.

The table is sparse work throughout: the item-by-item product touches only pairs
that co-occur, and the top ``k`` of every row are taken by one sort, so it scales with
the co-occurrences, not with the square of the catalog. Their number is the sum over
users of their distinct items squared: 0.3 M on Amazon Scientific, 20 M on
MovieLens-100K, where the table takes about a second. Histories of thousands of
items per user would want truncating, or a distributed join, first; neither is
built here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from shopml.models.histories import check_item_seqs, user_item_pairs

DEFAULT_SHRINK = 10.0
ROW_BLOCK = 1024  # items whose co-occurrences are held in memory at once


def item_similarity_topk(
    item_seqs: Iterable[np.ndarray],
    n_items: int,
    k: int,
    shrink: float = DEFAULT_SHRINK,
) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``k`` most similar co-occurring items, with their similarities.

    The neighbour table of ItemKNN (:class:`shopml.models.baselines.ItemKNNRecommender`)
    and, normalised, of SASRec's graph smoothing (:func:`cooccurrence_neighbors`).

    Args:
        item_seqs: training histories, item indices in ``1..n_items``; repeats of an
            item in one history count once.
        n_items: number of real items; row 0 (padding) links to nothing.
        k: neighbours kept per item.
        shrink: added to the cosine denominator; damps links seen by few users.

    Returns:
        ``(index, similarity)``: int64 and float64 ``[n_items + 1, k]``. Row ``i``
        lists item ``i``'s co-occurring items, strongest first (ties by index); unused
        slots hold index 0 and similarity 0. An item is never its own neighbour.

    Raises:
        ValueError: ``k`` is below 1, ``shrink`` is negative or an index is outside
            ``1..n_items``.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if shrink < 0:
        raise ValueError(f"shrink={shrink} must be non-negative")
    n = n_items + 1
    seqs = check_item_seqs(item_seqs, n_items)
    users, items = user_item_pairs(seqs)
    item_user = sparse.csr_matrix(
        (np.ones(len(items)), (items, users)), shape=(n, max(len(seqs), 1))
    )
    degree = np.asarray(item_user.sum(axis=1)).ravel()  # [n] users per item
    user_item = item_user.T.tocsr()
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.zeros((n, k), dtype=np.float64)
    # A block of items at a time, so memory holds one block's co-occurrences.
    for start in range(0, n, ROW_BLOCK):
        co = (item_user[start : start + ROW_BLOCK] @ user_item).tocoo()
        _keep_strongest(co, start, degree, shrink, index, similarity)
    return index, similarity


def cooccurrence_neighbors(
    item_seqs: Sequence[np.ndarray],
    n_items: int,
    k: int,
    shrink: float = DEFAULT_SHRINK,
) -> tuple[Tensor, Tensor]:
    """The links of :func:`item_similarity_topk`, as weights that sum to 1 per item.

    Args:
        item_seqs: training histories, item indices in ``1..n_items``.
        n_items: number of real items; row 0 (padding) links to nothing.
        k: neighbours kept per item.
        shrink: added to the cosine denominator.

    Returns:
        ``(index, weight)``: long and float ``[n_items + 1, k]``, strongest first,
        unused slots index 0 and weight 0. An item without a link has itself,
        weight 1.

    Raises:
        ValueError: as :func:`item_similarity_topk`.
    """
    index, weight = item_similarity_topk(item_seqs, n_items, k, shrink)
    total = weight.sum(axis=1, keepdims=True)
    weight = np.divide(weight, total, out=np.zeros_like(weight), where=total > 0)
    lonely = np.flatnonzero(total[:, 0] == 0)
    lonely = lonely[lonely > 0]  # padding stays empty
    index[lonely, 0] = lonely
    weight[lonely, 0] = 1.0
    return torch.from_numpy(index), torch.from_numpy(weight.astype(np.float32))


def _keep_strongest(
    co: sparse.coo_matrix,
    start: int,
    degree: np.ndarray,
    shrink: float,
    index: np.ndarray,
    similarity: np.ndarray,
) -> None:
    """Write the ``k`` strongest links of a block of rows into ``index`` /
    ``similarity``.

    ``co`` holds the co-counts of items ``start..start + co.shape[0] - 1`` (rows)
    with every item (columns); ``k`` is the width of ``index``.
    """
    rows = co.row.astype(np.int64) + start
    columns = co.col.astype(np.int64)
    off_diagonal = rows != columns
    rows, columns = rows[off_diagonal], columns[off_diagonal]
    sim = co.data[off_diagonal] / (
        np.sqrt(degree[rows] * degree[columns]) + shrink + 1e-12
    )
    # Strongest first within each row; ties by column for a deterministic table.
    order = np.lexsort((columns, -sim, rows))
    rows, columns, sim = rows[order], columns[order], sim[order]
    first = np.searchsorted(rows, rows)  # where each row's run starts
    rank = np.arange(len(rows)) - first
    kept = rank < index.shape[1]
    index[rows[kept], rank[kept]] = columns[kept]
    similarity[rows[kept], rank[kept]] = sim[kept]
