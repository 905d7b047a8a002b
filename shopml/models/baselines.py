"""Non-neural baselines that SASRec must beat, scored under the same contract.

Every baseline offers ``fit(item_seqs)`` on training histories and
``full_sort_scores(item_seq) -> [B, n_items + 1]`` with column 0 (padding) at ``-inf``,
like :class:`shopml.models.sasrec.SASRec`, so the evaluation and the model servers treat
them alike. Three exist:

* :class:`PopularityRecommender`: the same ranking for everyone, by interaction count;
* :class:`ItemKNNRecommender`: item-to-item co-occurrence (cosine over users, with
  shrinkage), the classic item-based CF of Sarwar et al. (WWW 2001) with a recency
  weight over the history as in session-kNN (Ludewig & Jannach, 2018);
* :class:`ImplicitALSRecommender`: matrix factorisation of the implicit feedback
  matrix by alternating least squares (Hu, Koren & Volinsky, ICDM 2008). A history is
  folded in with the same least-squares step, so it scores any item sequence, not only
  the users it was trained on.

ItemKNN's neighbours come from the sparse top-k table of
:func:`shopml.models.cooccurrence.item_similarity_topk`, the graph SASRec's
``cooccurrence_mix`` smooths over too; ItemKNN then scores with a dense item-item
matrix, and ALS keeps a [n_items, factors] matrix, so both fit a catalog up to
:data:`MAX_DENSE_ITEMS` items; larger catalogs raise ``NotImplementedError``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from shopml.models.cooccurrence import item_similarity_topk
from shopml.models.histories import check_item_seqs, user_item_pairs

logger = logging.getLogger(__name__)

MAX_DENSE_ITEMS = 50_000
BASELINES = ("popularity", "itemknn", "als")


def _check_n_items(n_items: int, dense: bool = False) -> None:
    if n_items < 1:
        raise ValueError(f"n_items={n_items} must be at least 1")
    if dense and n_items > MAX_DENSE_ITEMS:
        raise NotImplementedError(
            f"n_items={n_items} exceeds {MAX_DENSE_ITEMS}: this baseline keeps a dense "
            "item matrix; a sparse top-k neighbour table is not built yet"
        )


class PopularityRecommender:
    """Ranks every user's candidates by how often each item was interacted with.

    Args:
        n_items: number of real items; indices are ``1..n_items``, 0 is padding.
    """

    name = "popularity"

    def __init__(self, n_items: int) -> None:
        _check_n_items(n_items)
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
        for seq in check_item_seqs(item_seqs, self.n_items):
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


class ItemKNNRecommender:
    """Item-to-item co-occurrence: score = recency-weighted similarity to the history.

    ``sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink)`` over the users U who
    interacted with each item; each item keeps its ``n_neighbors`` most similar items.
    A history ``h_1..h_L`` (newest last) scores item ``j`` as
    ``sum_t decay^(L - t) * sim(h_t, j)``, so recent items weigh more.

    Args:
        n_items: number of real items; indices are ``1..n_items``.
        n_neighbors: neighbours kept per item (the rest of its row is zeroed).
        shrink: added to the cosine denominator; damps pairs seen by few users.
        decay: weight ratio between consecutive history positions, in (0, 1];
            1 weighs the whole history equally (plain item-based CF).

    Raises:
        ValueError: a parameter is out of range.
        NotImplementedError: the catalog is larger than :data:`MAX_DENSE_ITEMS`.
    """

    name = "itemknn"

    def __init__(
        self,
        n_items: int,
        n_neighbors: int = 100,
        shrink: float = 10.0,
        decay: float = 0.8,
    ) -> None:
        _check_n_items(n_items, dense=True)
        if n_neighbors < 1:
            raise ValueError(f"n_neighbors={n_neighbors} must be at least 1")
        if shrink < 0:
            raise ValueError(f"shrink={shrink} must be non-negative")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay={decay} must be in (0, 1]")
        self.n_items = n_items
        self.n_neighbors = n_neighbors
        self.shrink = shrink
        self.decay = decay
        self.similarity = torch.zeros(n_items + 1, n_items + 1)

    def fit(self, item_seqs: Iterable[np.ndarray]) -> ItemKNNRecommender:
        """Compute the pruned item-item cosine similarity from training histories.

        Args:
            item_seqs: training histories, item indices in ``1..n_items``.

        Returns:
            This recommender, fitted.

        Raises:
            ValueError: an index is outside ``1..n_items``.
        """
        index, sim = item_similarity_topk(
            item_seqs, self.n_items, self.n_neighbors, self.shrink
        )
        self.similarity = torch.zeros(self.n_items + 1, self.n_items + 1).scatter_(
            1, torch.from_numpy(index), torch.from_numpy(sim).float()
        )  # unused slots scatter 0 into column 0
        logger.debug("itemknn fitted items=%d", self.n_items)
        return self

    def full_sort_scores(self, item_seq: Tensor) -> Tensor:
        """Recency-weighted sum of the history items' similarity rows.

        Args:
            item_seq: long [B, L] histories, left-padded with 0, newest last.

        Returns:
            float [B, n_items + 1]; column 0 is ``-inf``.
        """
        length = item_seq.size(1)
        exponents = torch.arange(length - 1, -1, -1, device=item_seq.device)
        weights = self.decay ** exponents.float()  # [L], newest = 1
        weights = weights.expand_as(item_seq) * (item_seq > 0)  # [B, L]
        rows = torch.arange(item_seq.size(0), device=item_seq.device)
        rows = rows[:, None].expand_as(item_seq)  # [B, L]
        history = torch.sparse_coo_tensor(
            torch.stack([rows.reshape(-1), item_seq.reshape(-1)]),
            weights.reshape(-1),
            (item_seq.size(0), self.n_items + 1),
            check_invariants=False,
        )  # sparse [B, N]: summed weight of each history item (padding weighs 0)
        similarity = self.similarity.to(item_seq.device)
        scores = torch.sparse.mm(history, similarity)  # [B, N]
        scores[:, 0] = float("-inf")
        return scores


class ImplicitALSRecommender:
    """Implicit-feedback matrix factorisation trained by alternating least squares.

    Each observed (user, item) pair has preference 1 and confidence ``1 + alpha``;
    every other pair preference 0 and confidence 1. Solving for a user's factors with
    the item factors fixed is a ridge regression, which also folds in any new history:
    ``x = (Y^T Y + alpha * Y_h^T Y_h + reg * I)^-1 (1 + alpha) Y_h^T 1`` over the
    history's items h. Items score ``x . y_j``.

    Args:
        n_items: number of real items; indices are ``1..n_items``.
        factors: latent dimension.
        reg: L2 regularisation of both factor matrices.
        alpha: confidence weight of an observed pair.
        iterations: ALS sweeps (users then items).
        seed: seed of the initial item factors.

    Raises:
        ValueError: a parameter is out of range.
        NotImplementedError: the catalog is larger than :data:`MAX_DENSE_ITEMS`.
    """

    name = "als"

    def __init__(
        self,
        n_items: int,
        factors: int = 64,
        reg: float = 10.0,
        alpha: float = 5.0,
        iterations: int = 10,
        seed: int = 42,
    ) -> None:
        _check_n_items(n_items, dense=True)
        for label, value in (("factors", factors), ("iterations", iterations)):
            if value < 1:
                raise ValueError(f"{label}={value} must be at least 1")
        if reg <= 0 or alpha <= 0:
            raise ValueError(f"reg={reg} and alpha={alpha} must both be positive")
        self.n_items = n_items
        self.factors = factors
        self.reg = reg
        self.alpha = alpha
        self.iterations = iterations
        self.seed = seed
        self.item_factors = torch.zeros(n_items + 1, factors)

    def fit(self, item_seqs: Iterable[np.ndarray]) -> ImplicitALSRecommender:
        """Alternate exact least-squares solves for user and item factors.

        Args:
            item_seqs: training histories, item indices in ``1..n_items``.

        Returns:
            This recommender, fitted.

        Raises:
            ValueError: an index is outside ``1..n_items``.
        """
        seqs = check_item_seqs(item_seqs, self.n_items)
        users, items = user_item_pairs(seqs)
        users_t, items_t = torch.from_numpy(users), torch.from_numpy(items)
        gen = torch.Generator().manual_seed(self.seed)
        n = self.n_items + 1
        item_factors = 0.01 * torch.randn(n, self.factors, generator=gen)
        item_factors[0] = 0.0
        for sweep in range(self.iterations):
            user_factors = self._solve(item_factors, items_t, users_t, len(seqs))
            item_factors = self._solve(user_factors, users_t, items_t, n)
            item_factors[0] = 0.0
            logger.debug("als sweep=%d done", sweep + 1)
        self.item_factors = item_factors
        return self

    def _solve(
        self, fixed: Tensor, fixed_index: Tensor, solved_index: Tensor, n_rows: int
    ) -> Tensor:
        """Factors of ``n_rows`` entities given the other side's factors ``fixed``.

        Args:
            fixed: float [M, F] factors held fixed.
            fixed_index: long [P] the fixed side's row of each observed pair.
            solved_index: long [P] the solved side's row of each observed pair.
            n_rows: rows of the result.

        Returns:
            float [n_rows, F].
        """
        f = self.factors
        gram = fixed.T @ fixed + self.reg * torch.eye(f, dtype=fixed.dtype)  # [F, F]
        # Observed pairs as a sparse [R, M] matrix: one product sums their outer
        # products y y^T (for the left side) and their factors (for the right side).
        with warnings.catch_warnings():  # CSR is "beta" in torch, and 5x faster here
            warnings.filterwarnings("ignore", "Sparse CSR", UserWarning)
            observed = torch.sparse_coo_tensor(
                torch.stack([solved_index, fixed_index]),
                torch.full((len(solved_index),), self.alpha, dtype=fixed.dtype),
                (n_rows, fixed.size(0)),
                check_invariants=False,
            ).to_sparse_csr()
        fixed = fixed.contiguous()
        outer = (fixed[:, :, None] * fixed[:, None, :]).reshape(-1, f * f)  # [M, F*F]
        lhs = gram + (observed @ outer).view(n_rows, f, f)  # [R, F, F]
        rhs = (observed @ fixed) * (1.0 + self.alpha) / self.alpha  # [R, F]
        return torch.linalg.solve(lhs, rhs)  # [R, F]

    def full_sort_scores(self, item_seq: Tensor) -> Tensor:
        """Fold each history in as a user and score every item.

        Args:
            item_seq: long [B, L] histories, left-padded with 0, newest last.

        Returns:
            float [B, n_items + 1]; column 0 is ``-inf``.
        """
        device = item_seq.device
        rows = torch.arange(item_seq.size(0), device=device)
        seen = torch.zeros(item_seq.size(0), self.n_items + 1, dtype=torch.bool)
        seen = seen.to(device)
        seen[rows[:, None], item_seq] = True
        seen[:, 0] = False
        users, items = seen.nonzero(as_tuple=True)  # distinct (row, item) pairs
        item_factors = self.item_factors.to(device)
        user_factors = self._solve(
            item_factors.cpu(), items.cpu(), users.cpu(), item_seq.size(0)
        ).to(device)  # [B, F]
        scores = (user_factors @ item_factors.T).float()  # [B, N]
        scores[:, 0] = float("-inf")
        return scores
