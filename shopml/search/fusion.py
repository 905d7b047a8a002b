"""Fusion of the keyword and dense candidate lists into one ranking.

Two fusion functions, chosen by :attr:`SearchOptions.fusion
<shopml.search.engine.SearchOptions>`:

* ``convex`` (the default): a weighted sum of normalized scores, BM25 divided by the
  query's best BM25 score (its theoretical minimum is 0) and the cosine similarity
  min-max scaled over the dense list, as OpenSearch's normalization processor does.
  Bruch, Gai and Ingber ("An Analysis of Fusion Functions for Hybrid Retrieval", ACM
  TOIS 2023) find it beats reciprocal rank fusion once its weight is tuned on a few
  queries; it keeps how far apart two scores are, where RRF keeps only the order;
* ``rrf``: reciprocal rank fusion (Cormack et al., SIGIR 2009),
  ``sum over retrievers of weight / (rrf_k + rank)``.

On top of either, :func:`full_match_first` puts candidates holding every query token
above those missing one (a shop search's "all words first, then any word"),
:func:`category_first` answers a query that names a category with that category's
items, best sellers first (a browse query: which of an aisle's hundreds of items is
meant the text cannot tell, and popularity is the best unpersonalized guess), and
:func:`exact_title_first` puts an item whose whole title is the query above all.
"""

from __future__ import annotations

import numpy as np


def rrf(
    rows: np.ndarray, ranked: list[np.ndarray], weights: tuple[float, float], k: int
) -> np.ndarray:
    """Weighted reciprocal rank fusion over ``rows``.

    Args:
        rows: int64 [C] sorted candidate rows (the union of the lists).
        ranked: each retriever's rows, best first (subsets of ``rows``).
        weights: one weight per retriever.
        k: the RRF rank constant.

    Returns:
        float64 [C] fused scores.
    """
    fused = np.zeros(len(rows))
    for found, weight in zip(ranked, weights, strict=True):
        position = np.searchsorted(rows, found)  # rows is sorted (union1d)
        fused[position] += weight / (k + np.arange(1, len(found) + 1))
    return fused


def convex(
    bm25: np.ndarray,
    cosine: np.ndarray,
    dense_list: np.ndarray,
    weights: tuple[float, float],
) -> np.ndarray:
    """Weighted sum of normalized BM25 and cosine scores.

    Args:
        bm25: float64 [C] BM25 scores of the candidates (0 or NaN: no match).
        cosine: float64 [C] cosine similarities of the candidates (NaN: not computed).
        dense_list: float64 [D] the dense retriever's own top scores; they set the
            min-max range of the cosine side.
        weights: ``(keyword, dense)`` weights.

    Returns:
        float64 [C] fused scores; a missing side contributes 0.
    """
    fused = np.zeros(len(bm25))
    best = np.nanmax(bm25) if np.isfinite(bm25).any() else 0.0
    if best > 0:
        fused += weights[0] * np.nan_to_num(bm25 / best)
    if len(dense_list) and np.isfinite(cosine).any():
        low, high = float(dense_list.min()), float(dense_list.max())
        spread = high - low if high > low else 1.0
        scaled = np.clip((cosine - low) / spread, 0.0, 1.0)
        fused += weights[1] * np.nan_to_num(scaled)
    return fused


def full_match_first(fused: np.ndarray, is_full: np.ndarray) -> np.ndarray:
    """Lift candidates holding every query token above all the others.

    Args:
        fused: float64 [C] fused scores.
        is_full: bool [C] whether each candidate holds every query token.

    Returns:
        float64 [C] scores whose order is (full match, fused score).
    """
    if not len(fused) or not is_full.any() or is_full.all():
        return fused
    lift = float(fused.max() - fused.min()) + 1.0
    return np.where(is_full, fused + lift, fused)


def category_first(
    fused: np.ndarray, in_category: np.ndarray, popularity: np.ndarray | None
) -> np.ndarray:
    """Lift the items of the category a query names above all others, best sellers first.

    Args:
        fused: float64 [C] fused scores.
        in_category: bool [C] whether each candidate belongs to the named category.
        popularity: float64 [C] each candidate's popularity (``-inf``: unknown), or
            ``None``: the category's items keep their fused order.

    Returns:
        float64 [C] scores whose order is: the category's items by (popularity,
        fused score), then the other candidates by fused score.
    """
    if not len(fused) or not in_category.any():
        return fused
    members = np.flatnonzero(in_category)
    if popularity is None:
        order = members[np.argsort(-fused[members], kind="stable")]
    else:
        order = members[np.lexsort((-fused[members], -popularity[members]))]
    lifted = fused.copy()
    lifted[order] = float(fused.max()) + np.arange(len(order), 0, -1, dtype=np.float64)
    return lifted


def exact_title_first(
    rows: np.ndarray, fused: np.ndarray, exact: list[int] | None
) -> np.ndarray:
    """Lift the items whose normalized title equals the query above every other.

    Args:
        rows: int64 [C] candidate rows.
        fused: float64 [C] their scores.
        exact: rows whose title is the query, if any.

    Returns:
        float64 [C] scores.
    """
    if not exact or not len(rows):
        return fused
    is_exact = np.isin(rows, exact)
    lift = float(fused.max() - fused.min()) + 1.0
    return np.where(is_exact, fused + lift, fused)
