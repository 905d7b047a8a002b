"""Full-ranking evaluation shared by every model: accuracy, coverage, bias, segments.

Protocol (docs/architecture.md): each evaluated user has one held-out target; the model
scores **all** items, the items already in the user's history are excluded, and the
target's 0-based rank r among the rest gives HR@K = [r < K], NDCG@K = 1/log2(r + 2) and
MRR@K = 1/(r + 1) when r < K, else 0. Ties are broken by item index, as a stable sort of
the scores would. A target that repeats a history item is excluded with the history, so
it counts as a miss (no model is shown where the target hides).

Beyond accuracy, :func:`evaluate_ranking` reports for every cut-off K the catalog
coverage (share of items that reach at least one user's top K) and the popularity bias
(mean popularity percentile of the recommended items, 1.0 = always the most popular
item, ~0.5 = indifferent to popularity), and the accuracy per segment: users with short
and long histories, and targets that are cold-start items (seen at most a few times in
the histories).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from shopml.models.sasrec import left_pad
from shopml.sequences import LeaveOneOutSplit, Stage

logger = logging.getLogger(__name__)

DEFAULT_KS = (10, 20)
METRICS = ("hr", "ndcg", "mrr")
COLD_ITEM_MAX_COUNT = 5
SEGMENTS = ("short_history", "long_history", "cold_item", "warm_item")

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


def _check_stage(stage: str) -> None:
    if stage not in ("valid", "test"):
        raise ValueError(f"stage={stage!r} is not supported; use 'valid' or 'test'")


def _rank_batches(
    score_fn: ScoreFn,
    histories: list[np.ndarray],
    targets: np.ndarray,
    n_columns: int,
    top_k: int,
    *,
    max_seq_len: int,
    batch_size: int,
    device: torch.device | str,
) -> tuple[np.ndarray, np.ndarray]:
    """Score users in batches: target ranks, int [U], and top items, int [U, top_k].

    Raises:
        ValueError: ``score_fn`` returns the wrong shape.
    """
    all_ranks: list[np.ndarray] = []
    all_top: list[np.ndarray] = [np.zeros((0, top_k), dtype=np.int64)]
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
            exclude = history_mask(batch, n_columns)  # [B, N]
            batch_targets = torch.as_tensor(targets[start : start + batch_size])
            all_ranks.append(target_ranks(scores, batch_targets, exclude).numpy())
            if top_k:
                masked = scores.masked_fill(exclude, float("-inf"))
                masked[:, 0] = float("-inf")
                all_top.append(masked.topk(top_k, dim=1).indices.numpy())
    ranks = np.concatenate(all_ranks) if all_ranks else np.zeros(0, dtype=np.int64)
    return ranks, np.concatenate(all_top)


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
    _check_stage(stage)
    _, histories, targets = split.eval_users(stage)
    ranks, _ = _rank_batches(
        score_fn,
        histories,
        targets,
        split.n_items + 1,
        0,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=device,
    )
    result = metrics_from_ranks(ranks, ks)
    logger.debug("evaluated stage=%s users=%d %s", stage, len(ranks), result)
    return result


@dataclass(frozen=True)
class SegmentRules:
    """How evaluated users are split into segments.

    Attributes:
        short_history_max: histories with at most this many items are
            ``short_history``, the others ``long_history``; ``None`` takes the median
            history length of the users evaluated, so each holds about half of them.
        cold_item_max_count: a target seen at most this many times in all users'
            histories of the stage is a ``cold_item`` (0: strict cold start); the
            others are ``warm_item``.
    """

    short_history_max: int | None = None
    cold_item_max_count: int = COLD_ITEM_MAX_COUNT


@dataclass
class RankingEvaluation:
    """Every figure of one model on one stage of the split.

    Attributes:
        metrics: ``hr_10``, ``ndcg_10``, ``mrr_10``, ``coverage_10``,
            ``popularity_bias_10`` and the same at the other cut-offs.
        segments: ``short_history``, ``long_history``, ``cold_item``, ``warm_item``
            -> accuracy metrics plus ``n_users``.
        n_users: users evaluated.
        short_history_max: the history length that separated short from long.
    """

    metrics: dict[str, float]
    segments: dict[str, dict[str, float]] = field(default_factory=dict)
    n_users: int = 0
    short_history_max: int = 0


def item_counts(histories: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Int64 [n_items + 1]: interactions per item in ``histories`` (padding 0)."""
    counts = np.zeros(n_items + 1, dtype=np.int64)
    for seq in histories:
        counts += np.bincount(np.asarray(seq, dtype=np.int64), minlength=n_items + 1)
    counts[0] = 0
    return counts


def popularity_percentiles(counts: np.ndarray) -> np.ndarray:
    """Float [n_items + 1]: each item's popularity percentile in [0, 1].

    The least popular item gets 0, the most popular 1; equal counts share their
    average. Index 0 (padding) gets 0.
    """
    values = counts[1:]
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    _, inverse, sizes = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / sizes)[inverse]  # ties averaged
    out = np.zeros(len(counts), dtype=np.float64)
    out[1:] = ranks / max(len(values) - 1, 1)
    return out


def beyond_accuracy(
    top_items: np.ndarray, counts: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """Catalog coverage and popularity bias of every user's top-K lists.

    Args:
        top_items: int [U, >= max(ks)] recommended items per user, best first.
        counts: int [n_items + 1] interactions per item in the histories.
        ks: cut-offs.

    Returns:
        ``{"coverage_10": ..., "popularity_bias_10": ..., ...}``.
    """
    n_items = len(counts) - 1
    percentile = popularity_percentiles(counts)
    result: dict[str, float] = {}
    for k in ks:
        top = top_items[:, :k]
        shown = np.unique(top[top > 0])
        result[metric_name("coverage", k)] = float(len(shown) / max(n_items, 1))
        bias = float(percentile[top].mean()) if top.size else 0.0
        result[metric_name("popularity_bias", k)] = bias
    return result


def segment_metrics(
    ranks: np.ndarray,
    masks: dict[str, np.ndarray],
    ks: Sequence[int],
) -> dict[str, dict[str, float]]:
    """Accuracy metrics and user count of every segment (a bool mask over users)."""
    return {
        name: {**metrics_from_ranks(ranks[mask], ks), "n_users": float(mask.sum())}
        for name, mask in masks.items()
    }


def segment_masks(
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    counts: np.ndarray,
    rules: SegmentRules,
) -> tuple[dict[str, np.ndarray], int]:
    """Bool masks over users per segment, and the short-history threshold used."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    short_max = rules.short_history_max
    if short_max is None:
        short_max = int(np.median(lengths)) if len(lengths) else 0
    is_cold = counts[targets] <= rules.cold_item_max_count
    masks = {
        "short_history": lengths <= short_max,
        "long_history": lengths > short_max,
        "cold_item": is_cold,
        "warm_item": ~is_cold,
    }
    return masks, short_max


def evaluate_ranking(
    score_fn: ScoreFn,
    split: LeaveOneOutSplit,
    stage: Stage = "test",
    ks: Sequence[int] = DEFAULT_KS,
    *,
    rules: SegmentRules | None = None,
    max_seq_len: int = 50,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> RankingEvaluation:
    """Accuracy, coverage, popularity bias and per-segment accuracy of one scorer.

    Popularity and cold-start counts come from every user's histories of the stage
    (what a model could have learned from), never from the targets.

    Args:
        score_fn: as for :func:`evaluate_scorer`.
        split: the leave-one-out split.
        stage: ``"valid"`` or ``"test"``.
        ks: cut-offs.
        rules: segment thresholds; defaults when ``None``.
        max_seq_len: width of the histories given to ``score_fn``.
        batch_size: users per call of ``score_fn``.
        device: where the histories are placed before ``score_fn`` is called.

    Returns:
        The figures; see :class:`RankingEvaluation`.

    Raises:
        ValueError: ``stage`` is unknown or ``score_fn`` returns the wrong shape.
    """
    _check_stage(stage)
    rules = rules or SegmentRules()
    _, histories, targets = split.eval_users(stage)
    ranks, top_items = _rank_batches(
        score_fn,
        histories,
        targets,
        split.n_items + 1,
        min(max(ks), split.n_items),
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=device,
    )
    counts = item_counts(split.histories(stage), split.n_items)
    masks, short_max = segment_masks(histories, targets, counts, rules)

    metrics = metrics_from_ranks(ranks, ks)
    metrics.update(beyond_accuracy(top_items, counts, ks))
    return RankingEvaluation(
        metrics=metrics,
        segments=segment_metrics(ranks, masks, ks),
        n_users=len(ranks),
        short_history_max=short_max,
    )
