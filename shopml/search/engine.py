"""The query path of product search: retrieve, fuse, filter, personalize.

One query goes through these steps:

1. normalize and tokenize (:mod:`shopml.search.text`); cut an overlong query and say so;
   correct misspelled tokens against the catalog vocabulary;
2. BM25 candidates (read from the bm25s postings of the query tokens only, filters
   applied as a mask) and dense candidates (MiniLM query vector; exact dot products
   for small catalogs or filtered subsets, faiss HNSW beyond ``ann_threshold``);
3. fusion (:mod:`shopml.search.fusion`): a convex combination of normalized BM25 and
   cosine scores (or reciprocal rank fusion); items holding every query token go
   above those missing one, and an item whose normalized title equals the query first;
4. category prior (hybrid mode): a query whose tokens are a category's ("yogurt",
   "fresh fruits") is a browse query; the category's best sellers (the recommender's
   training popularity) join the candidates and the category's items go first, most
   popular first. Without a recommender they keep their fused order;
5. optional personalization: the user's sequence representation from the
   recommender's SASRec scores the candidates, after the items the user bought
   before (most often bought first: "buy it again"); only *relevant* candidates
   (those a retriever scores close to its best match, or the named category's items)
   are reordered, and only among the positions they already hold, so
   personalization never lifts an off-topic item.

An empty query falls back to recommendations from the same SASRec model (training
popularity for a user without history), with the filters applied.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from shopml.search.encoder import TextEncoder
from shopml.search.fusion import (
    category_first,
    convex,
    exact_title_first,
    full_match_first,
    rrf,
)
from shopml.search.index import KeywordMatch, SearchIndex
from shopml.search.text import MAX_QUERY_CHARS, normalize, prepare_query

logger = logging.getLogger(__name__)

MODES = ("hybrid", "keyword", "dense")
FUSIONS = ("rrf", "convex")


class Personalizer(Protocol):
    """Scores items for a user from their history (the recommender's view)."""

    def columns(self, item_ids: Sequence[str]) -> np.ndarray:
        """int64 [len(item_ids)]: the recommender's index of each item, 0 if unknown."""
        ...

    def scores(self, history: Sequence[str]) -> np.ndarray:
        """float [n_items + 1]: next-item scores by recommender index; 0 is padding."""
        ...


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions every returned item satisfies.

    Attributes:
        categories: allowed categories (compared after normalization); empty allows
            every category.
        min_price: lowest price allowed; items without a price are excluded when a
            price bound is set.
        max_price: highest price allowed.
    """

    categories: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_price", "max_price"):
            value = getattr(self, name)
            if value is not None and (not np.isfinite(value) or value < 0):
                raise ValueError(f"{name}={value} must be a finite price >= 0")
        if (
            self.min_price is not None
            and self.max_price is not None
            and self.min_price > self.max_price
        ):
            raise ValueError(
                f"min_price={self.min_price} is above max_price={self.max_price}"
            )

    @property
    def is_empty(self) -> bool:
        """Whether nothing is filtered."""
        return not self.categories and self.min_price is None and self.max_price is None


@dataclass(frozen=True)
class SearchOptions:
    """How a query is answered.

    Attributes:
        mode: ``hybrid`` (BM25 + dense, fused), ``keyword`` or ``dense`` only.
        k: results returned.
        candidates: candidates taken from each retriever before fusion.
        fusion: ``convex`` (weighted sum of normalized scores, OpenSearch's
            normalization processor) or ``rrf`` (reciprocal rank fusion); see
            :mod:`shopml.search.fusion`.
        rrf_k: the constant of reciprocal rank fusion.
        keyword_weight: weight of the BM25 side in the fusion.
        dense_weight: weight of the dense side in the fusion.
        full_match_first: in ``keyword`` and ``hybrid`` modes, candidates holding
            every query token rank above those missing one.
        category_prior: in ``hybrid`` mode, a query naming a category ranks that
            category's items first, best sellers first (see the module docstring).
        personalize: re-rank with the user's history when one is given.
        rerank_depth: how many fused results personalization may reorder.
        personal_weight: share of the personal rank in the re-ranking score (0..1).
        buy_again: the personal order puts items in the user's history first (most
            often bought first), then follows the recommender's scores.
        keyword_relevance: a candidate is relevant when its BM25 score is at least
            this share of the best BM25 score of the query.
        dense_relevance: ... or its cosine similarity at least this share of the best.
        spelling: correct query tokens unknown to the index.
        max_query_chars: longer (normalized) queries are cut.
    """

    mode: str = "hybrid"
    k: int = 10
    candidates: int = 100
    # Chosen by evaluation.tune_fusion on the validation half of the Instacart query
    # set (split_queries; the test half was not used), nDCG@10 + recall@50. Without
    # the category prior, convex beat RRF (k 10, 60) and equal weights beat 0.25, 0.5
    # and 2. With it, every convex setting ties on recall@50 (0.8550, RRF 0.8525-
    # 0.8535) and nDCG@10 spans 0.5374-0.5388: dense weight 0.5 tops it by 0.0007
    # over 1.0, noise on 972 queries, so the weights stay equal; 50 or 100
    # candidates per retriever make no difference (nor 300 without the prior).
    fusion: str = "convex"
    rrf_k: int = 60
    keyword_weight: float = 1.0
    dense_weight: float = 1.0
    full_match_first: bool = True
    category_prior: bool = True
    personalize: bool = True
    rerank_depth: int = 50
    personal_weight: float = 0.5
    buy_again: bool = True
    keyword_relevance: float = 0.5
    dense_relevance: float = 0.85
    spelling: bool = True
    max_query_chars: int = MAX_QUERY_CHARS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; use one of {MODES}")
        if self.fusion not in FUSIONS:
            raise ValueError(
                f"fusion={self.fusion!r} is not supported; use one of {FUSIONS}"
            )
        for name in ("k", "candidates", "rrf_k", "rerank_depth", "max_query_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("keyword_weight", "dense_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
        for name in ("personal_weight", "keyword_relevance", "dense_relevance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")


@dataclass(frozen=True)
class SearchHit:
    """One result.

    Attributes:
        item_id: the item.
        title: its title.
        category: its category, ``None`` when unknown.
        price: its price, ``None`` when unknown.
        score: the fused (or recommendation) score; higher is better.
    """

    item_id: str
    title: str
    category: str | None
    price: float | None
    score: float


@dataclass(frozen=True)
class SearchResponse:
    """The answer to one query.

    Attributes:
        hits: results, best first.
        query: the normalized query actually searched (after cutting).
        corrected_query: the query after spelling correction, when it changed.
        truncated: whether the query was cut to ``max_query_chars``.
        notes: human-readable remarks (truncation, fallback).
        fallback: ``"recommendations"`` when an empty query was answered by the
            recommender, else ``None``.
        personalized: whether the user's history changed the order.
    """

    hits: list[SearchHit]
    query: str
    corrected_query: str | None = None
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    fallback: str | None = None
    personalized: bool = False


@dataclass
class _Candidates:
    """Retrieved rows with their per-retriever scores (NaN where not retrieved)."""

    rows: np.ndarray  # int64 [C], fused order
    fused: np.ndarray  # float64 [C]
    bm25: np.ndarray  # float64 [C]
    cosine: np.ndarray  # float64 [C]
    in_category: np.ndarray  # bool [C]: in the category the query names


def _top(scores: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best (rows, scores), best first, ties broken by row."""
    if len(rows) > n:
        keep = np.argpartition(-scores, n - 1)[:n]
        rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))
    return rows[order], scores[order]


class SearchEngine:
    """Answers product search queries over one index.

    Args:
        index: the loaded search index.
        encoder: the text encoder the index was built with.
        personalizer: the recommender's scorer; ``None`` disables personalization and
            answers empty queries with an empty list.
    """

    def __init__(
        self,
        index: SearchIndex,
        encoder: TextEncoder,
        personalizer: Personalizer | None = None,
    ) -> None:
        if encoder.dim != index.embeddings.shape[1]:
            raise ValueError(
                f"encoder dimension {encoder.dim} differs from the index vectors' "
                f"{index.embeddings.shape[1]}; rebuild the index with this encoder"
            )
        self.index = index
        self.encoder = encoder
        self.personalizer = personalizer
        # Index row -> recommender column, computed once (0: unknown to the model).
        self._columns = (
            personalizer.columns(index.item_ids) if personalizer is not None else None
        )
        # The recommender's scores for a user without history: its training
        # popularity, the category prior's order. float64 [N], -inf if unknown.
        self._popularity = (
            self.personal_scores([], _all_rows(index.n_items))
            if personalizer is not None
            else None
        )

    def personal_scores(self, history: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """float64 [len(rows)] recommender scores of index rows; -inf if unknown.

        Raises:
            ValueError: the engine has no personalizer.
        """
        if self.personalizer is None or self._columns is None:
            raise ValueError("this search engine has no personalizer (recommender)")
        columns = self._columns[rows]
        scores = np.asarray(self.personalizer.scores(history), dtype=np.float64)
        return np.where(columns > 0, scores[columns], -np.inf)

    def search(
        self,
        query: str,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
        history: Sequence[str] | None = None,
    ) -> SearchResponse:
        """Answer one query.

        Args:
            query: the query as typed; blank asks for recommendations.
            filters: restrictions on the results.
            options: retrieval settings; defaults when ``None``.
            history: the user's recent item ids, oldest first, for personalization.

        Returns:
            The response.
        """
        filters = filters or SearchFilters()
        options = options or SearchOptions()
        prepared = prepare_query(query, options.max_query_chars)
        notes = []
        if prepared.truncated:
            notes.append(
                f"query cut from {prepared.original_chars} to {len(prepared.text)} "
                f"characters (limit {options.max_query_chars})"
            )
        mask = self.filter_mask(filters)
        if not prepared.tokens:
            hits = self.recommend(history or [], mask, options.k)
            notes.append("empty query: answered with recommendations")
            return SearchResponse(
                hits, prepared.text, None, prepared.truncated, notes, "recommendations"
            )

        tokens = prepared.tokens
        if options.spelling:
            tokens = self.index.corrector.correct_all(prepared.tokens)
        corrected = " ".join(tokens) if tokens != prepared.tokens else None
        candidates = self._retrieve(prepared.text, tokens, corrected, mask, options)
        rows, personalized = self._personalize(candidates, history, options)
        hits = self._hits(rows[: options.k], candidates, personalized)
        return SearchResponse(
            hits,
            prepared.text,
            corrected,
            prepared.truncated,
            notes,
            None,
            personalized,
        )

    def filter_mask(self, filters: SearchFilters) -> np.ndarray | None:
        """bool [N]: the rows the filters allow; ``None`` when nothing is filtered."""
        if filters.is_empty:
            return None
        mask = np.ones(self.index.n_items, dtype=bool)
        if filters.categories:
            allowed = {normalize(category) for category in filters.categories}
            mask &= np.isin(self.index.categories, list(allowed))
        prices = self.index.prices
        if filters.min_price is not None:
            mask &= prices >= filters.min_price  # NaN prices fail both bounds
        if filters.max_price is not None:
            mask &= prices <= filters.max_price
        return mask

    def keyword_candidates(
        self, tokens: list[str], mask: np.ndarray | None, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """BM25: the ``n`` best (rows, scores) with a positive score."""
        match = self.index.match(tokens, mask)
        rows = match.rows
        return _top(match.scores[rows].astype(np.float64), rows, n)

    @staticmethod
    def _keyword_top(
        match: KeywordMatch, n: int, full_first: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` best matching rows, full matches first when asked, and their BM25."""
        rows = match.rows
        bm25 = match.scores[rows].astype(np.float64)  # [M]
        key = bm25
        if full_first and len(rows):
            key = np.where(match.is_full[rows], bm25 + bm25.max() + 1.0, bm25)
        top, _ = _top(key, rows, n)
        return top, match.scores[top].astype(np.float64)

    def dense_candidates(
        self, text: str, mask: np.ndarray | None, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dense retrieval: the ``n`` best (rows, cosine similarities)."""
        return self._dense_top(self.encoder.encode_query(text), mask, n)

    def _dense_top(
        self, vector: np.ndarray, mask: np.ndarray | None, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` rows closest to the query vector [D], exactly or by HNSW."""
        embeddings = self.index.embeddings
        if mask is not None and not mask.any():
            return _empty()
        exact = self.index.ann is None or (
            mask is not None and mask.sum() <= self.index.config.ann_threshold
        )
        if not exact:
            return self._ann_candidates(vector, mask, n)
        if mask is None:
            return _top(
                (embeddings @ vector).astype(np.float64), _all_rows(len(embeddings)), n
            )
        rows = np.flatnonzero(mask)
        return _top((embeddings[rows] @ vector).astype(np.float64), rows, n)

    def _ann_candidates(
        self, vector: np.ndarray, mask: np.ndarray | None, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        ann: Any = self.index.ann
        params: Any = None
        if mask is not None:
            bitmap = np.packbits(mask, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
            params = faiss.SearchParametersHNSW(  # type: ignore[attr-defined]
                sel=selector, efSearch=max(n, self.index.config.hnsw_ef_search)
            )
        scores, rows = ann.search(vector[None, :], n, params=params)
        keep = rows[0] >= 0
        return rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float64)

    def _retrieve(
        self,
        text: str,
        tokens: list[str],
        corrected: str | None,
        mask: np.ndarray | None,
        options: SearchOptions,
    ) -> _Candidates:
        """Run the retrievers of ``options.mode`` and fuse their lists."""
        n = max(options.candidates, options.k)
        use_keyword = options.mode in {"hybrid", "keyword"}
        use_dense = options.mode in {"hybrid", "dense"}
        match = self.index.match(tokens, mask) if use_keyword else None
        keyword = (
            self._keyword_top(match, n, options.full_match_first)
            if match is not None
            else _empty()
        )
        # The dense side reads the corrected words: MiniLM knows words better than
        # their misspellings. One forward pass per query.
        vector = self.encoder.encode_query(corrected or text) if use_dense else None
        dense = self._dense_top(vector, mask, n) if vector is not None else _empty()

        category = self._named_category(tokens, options)  # its rows, or None
        best_sellers = self._best_sellers(category, mask, n)
        rows = np.union1d(np.union1d(keyword[0], dense[0]), best_sellers)  # [C]
        rows = rows.astype(np.int64)
        bm25 = match.scores[rows].astype(np.float64) if match else _nan(rows)
        cosine = _nan(rows)
        if vector is not None:
            cosine = (self.index.embeddings[rows] @ vector).astype(np.float64)
        fused = self._fuse(rows, keyword[0], dense, bm25, cosine, options)
        if match is not None and options.full_match_first:
            fused = full_match_first(fused, match.is_full[rows])
        in_category = _members(rows, category)
        popularity = None if self._popularity is None else self._popularity[rows]
        fused = category_first(fused, in_category, popularity)
        fused = exact_title_first(rows, fused, self.index.exact_titles.get(text))

        order = np.lexsort((rows, -fused))
        return _Candidates(
            rows[order], fused[order], bm25[order], cosine[order], in_category[order]
        )

    def _named_category(
        self, tokens: list[str], options: SearchOptions
    ) -> np.ndarray | None:
        """int64 rows of the category the query names (hybrid prior on), else None."""
        if options.mode != "hybrid" or not options.category_prior:
            return None
        return self.index.category_rows.get(tuple(tokens))

    def _best_sellers(
        self, category: np.ndarray | None, mask: np.ndarray | None, n: int
    ) -> np.ndarray:
        """int64: the ``n`` most popular allowed rows of ``category`` (none if unknown)."""
        if category is None or self._popularity is None:
            return np.zeros(0, dtype=np.int64)
        if mask is not None:
            category = category[mask[category]]
        return _top(self._popularity[category], category, n)[0]

    @staticmethod
    def _fuse(
        rows: np.ndarray,
        keyword_rows: np.ndarray,
        dense: tuple[np.ndarray, np.ndarray],
        bm25: np.ndarray,
        cosine: np.ndarray,
        options: SearchOptions,
    ) -> np.ndarray:
        """float64 [C] fused scores of ``rows`` by ``options.fusion``."""
        weights = (options.keyword_weight, options.dense_weight)
        if options.fusion == "rrf":
            return rrf(rows, [keyword_rows, dense[0]], weights, options.rrf_k)
        return convex(bm25, cosine, dense[1], weights)

    def _personalize(
        self,
        candidates: _Candidates,
        history: Sequence[str] | None,
        options: SearchOptions,
    ) -> tuple[np.ndarray, bool]:
        """Reorder relevant candidates in the top ``rerank_depth`` by personal rank."""
        rows = candidates.rows.astype(np.int64)
        if not (options.personalize and history and self.personalizer):
            return rows, False
        depth = min(options.rerank_depth, len(rows))
        relevant = np.flatnonzero(_relevant(candidates, options)[:depth])
        if len(relevant) < 2:
            return rows, False

        personal = self.personal_scores(history, rows[relevant])  # [R]
        bought = (
            self._times_bought(history, rows[relevant])
            if options.buy_again
            else np.zeros(len(relevant))
        )
        # Rank within the relevant set: text order (as fused) and personal order.
        text_rank = np.arange(1, len(relevant) + 1)
        personal_rank = np.empty(len(relevant), dtype=np.int64)
        personal_rank[np.lexsort((text_rank, -personal, -bought))] = text_rank
        c = 10.0  # a small rank constant: a few places of difference matter
        score = (1 - options.personal_weight) / (c + text_rank)
        score = score + options.personal_weight / (c + personal_rank)
        new_order = relevant[np.lexsort((text_rank, -score))]

        reordered = rows.copy()
        reordered[relevant] = rows[new_order]
        return reordered, not np.array_equal(reordered, rows)

    def _times_bought(self, history: Sequence[str], rows: np.ndarray) -> np.ndarray:
        """float64 [len(rows)]: how often each row's item occurs in ``history``."""
        counts = Counter(self.index.row_of.get(str(item_id)) for item_id in history)
        return np.array([counts.get(int(row), 0) for row in rows], dtype=np.float64)

    def recommend(
        self, history: Sequence[str], mask: np.ndarray | None, k: int
    ) -> list[SearchHit]:
        """The recommender's best items among those the filters allow.

        Args:
            history: the user's recent item ids (may be empty: popularity).
            mask: allowed rows, ``None`` for all.
            k: how many items.

        Returns:
            Up to ``k`` hits scored by the recommender; ``[]`` without one.
        """
        if self.personalizer is None:
            return []
        scores = self.personal_scores(history, np.arange(self.index.n_items))
        allowed = np.isfinite(scores) if mask is None else np.isfinite(scores) & mask
        rows = np.flatnonzero(allowed)
        rows, best = _top(scores[rows], rows, k)
        return [
            self._hit(int(row), float(score))
            for row, score in zip(rows, best, strict=True)
        ]

    def _hits(
        self, rows: np.ndarray, candidates: _Candidates, personalized: bool
    ) -> list[SearchHit]:
        by_row = dict(
            zip(candidates.rows.tolist(), candidates.fused.tolist(), strict=True)
        )
        hits = [self._hit(int(row), by_row[int(row)]) for row in rows]
        if personalized:
            # Reordered lists keep descending scores: scores follow the new positions.
            ordered = sorted((hit.score for hit in hits), reverse=True)
            hits = [
                SearchHit(h.item_id, h.title, h.category, h.price, s)
                for h, s in zip(hits, ordered, strict=True)
            ]
        return hits

    def _hit(self, row: int, score: float) -> SearchHit:
        price = self.index.prices[row]
        return SearchHit(
            item_id=self.index.item_ids[row],
            title=self.index.titles[row],
            category=self.index.raw_categories[row],
            price=None if np.isnan(price) else float(price),
            score=score,
        )


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, dtype=np.int64), np.zeros(0)


def _nan(rows: np.ndarray) -> np.ndarray:
    return np.full(len(rows), np.nan)


def _all_rows(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _members(rows: np.ndarray, category: np.ndarray | None) -> np.ndarray:
    """bool [len(rows)]: whether each row is in ``category`` (sorted rows)."""
    if category is None or not len(category):
        return np.zeros(len(rows), dtype=bool)
    position = np.searchsorted(category, rows).clip(max=len(category) - 1)
    return np.asarray(category[position] == rows)


def _relevant(candidates: _Candidates, options: SearchOptions) -> np.ndarray:
    """bool [C]: candidates near a retriever's best match or in the named category."""
    relevant = candidates.in_category.copy()
    for scores, share in (
        (candidates.bm25, options.keyword_relevance),
        (candidates.cosine, options.dense_relevance),
    ):
        if np.isfinite(scores).any():
            best = np.nanmax(scores)
            relevant |= np.nan_to_num(scores, nan=-np.inf) >= share * best
    return relevant
