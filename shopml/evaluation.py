"""Full-ranking evaluation shared by every model: HR@K, NDCG@K and MRR@K.

Protocol (docs/architecture.md): each evaluated user has one held-out target; the model
scores **all** items, the items already in the user's history are excluded, and the
target's 0-based rank r among the rest gives HR@K = [r < K], NDCG@K = 1/log2(r + 2) and
MRR@K = 1/(r + 1) when r < K, else 0. Ties are broken by item index, as a stable sort of
the scores would. A target that repeats a history item is excluded with the history, so
it counts as a miss (no model is shown where the target hides).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from shopml.models.sasrec import left_pad
from shopml.sequences import LeaveOneOutSplit, Stage

logger = logging.getLogger(__name__)

DEFAULT_KS = (10, 20)
METRICS = ("hr", "ndcg", "mrr")

ScoreFn = Callable[[Tensor], Tensor]


def metric_name(metric: str, k: int) -> str:
    """The key of a metric in result dictionaries, e.g. ``ndcg_10``."""
    return f"{metric}_{k}"


def history_mask(histories: Sequence[np.ndarray], n_columns: int) -> Tensor:
    """Bool [B, N]: True at every item a user has already interacted with."""
    mask = torch.zeros((len(histories), n_columns), dtype=torch.bool)
    for row, seq in enumerate(histories):
        mask[row, torch.as_tensor(seq, dtype=torch.long)] = True
    return mask


def target_ranks(scores: Tensor, targets: Tensor, exclude: Tensor) -> Tensor:
    """0-based rank of each target among the items that are not excluded.

    Args:
        scores: float [B, N], column 0 is padding and never ranked.
        targets: long [B], the held-out item index of each row.
        exclude: bool [B, N], items removed from the ranking (the history).

    Returns:
        long [B]; a target that is itself excluded gets rank N (a miss at every K).
    """
    scores = scores.float().masked_fill(exclude, float("-inf"))
    scores[:, 0] = float("-inf")
    target_scores = scores.gather(1, targets[:, None])  # [B, 1]
    columns = torch.arange(scores.size(1), device=scores.device)[None, :]  # [1, N]

    # Items ahead of the target: higher score, or equal score and a lower index.
    ahead = (scores > target_scores) | (
        (scores == target_scores) & (columns < targets[:, None])
    )
    ranks = ahead.sum(dim=1)
    is_excluded = exclude.gather(1, targets[:, None]).squeeze(1)
    return ranks.masked_fill(is_excluded, scores.size(1))


def metrics_from_ranks(
    ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR@K over users from 0-based target ranks.

    Args:
        ranks: int [U] 0-based ranks.
        ks: cut-offs.

    Returns:
        ``{"hr_10": ..., "ndcg_10": ..., "mrr_10": ..., ...}``; zeros when ``ranks`` is
        empty.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    result: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        n = max(len(ranks), 1)
        result[metric_name("hr", k)] = float(hit.sum() / n)
        result[metric_name("ndcg", k)] = float((hit / np.log2(ranks + 2)).sum() / n)
        result[metric_name("mrr", k)] = float((hit / (ranks + 1)).sum() / n)
    return result


def evaluate_scorer(
    score_fn: ScoreFn,
    split: LeaveOneOutSplit,
    stage: Stage = "test",
    ks: Sequence[int] = DEFAULT_KS,
    *,
    max_seq_len: int = 50,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Rank all items for every user with a ``stage`` target and average the metrics.

    Args:
        score_fn: maps long [B, max_seq_len] left-padded histories (on ``device``) to
            float [B, n_items + 1] scores, e.g. ``model.full_sort_scores``.
        split: the leave-one-out split.
        stage: ``"valid"`` (history = training items) or ``"test"`` (history = training
            items + the validation item).
        ks: cut-offs for HR, NDCG and MRR.
        max_seq_len: width of the histories given to ``score_fn``.
        batch_size: users per call of ``score_fn``.
        device: where the histories are placed before ``score_fn`` is called.

    Returns:
        ``{"hr_10": ..., "ndcg_10": ..., "mrr_10": ..., "hr_20": ...}``.

    Raises:
        ValueError: ``stage`` is unknown or ``score_fn`` returns the wrong shape.
    """
    if stage not in ("valid", "test"):
        raise ValueError(f"stage={stage!r} is not supported; use 'valid' or 'test'")
    _, histories, targets = split.eval_users(stage)
    n_columns = split.n_items + 1

    all_ranks: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(histories), batch_size):
            batch = histories[start : start + batch_size]
            item_seq = left_pad(batch, max_seq_len).to(device)  # [B, L]
            scores = score_fn(item_seq).float().cpu()  # [B, N]
            if scores.shape != (len(batch), n_columns):
                raise ValueError(
                    f"score_fn returned shape {tuple(scores.shape)}, expected "
                    f"({len(batch)}, {n_columns}) = (batch, n_items + 1)"
                )
            batch_targets = torch.as_tensor(targets[start : start + batch_size])
            ranks = target_ranks(scores, batch_targets, history_mask(batch, n_columns))
            all_ranks.append(ranks.numpy())

    ranks_all = np.concatenate(all_ranks) if all_ranks else np.zeros(0, dtype=np.int64)
    result = metrics_from_ranks(ranks_all, ks)
    logger.debug("evaluated stage=%s users=%d %s", stage, len(ranks_all), result)
    return result
