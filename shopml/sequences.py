"""Per-user, time-ordered item sequences and the leave-one-out evaluation split.

Events are ordered per user by ``(timestamp, item_id)``: equal timestamps are broken by
item id, a rule that depends on nothing in the labels. Items are indexed ``1..N`` in
item-id order over the catalog and the events (0 is padding). Leave-one-out: the last
item of each user is the test target, the one before it the validation target, the rest
the training history; users with fewer than 3 events are used for training only.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

Stage = Literal["valid", "test"]
MIN_EVAL_EVENTS = 3
PADDING_ID = ""


@dataclass
class ItemVocab:
    """Maps item ids to model indices ``1..n_items``; index 0 is padding.

    Attributes:
        item_ids: index -> item_id; ``item_ids[0] == ""`` stands for padding.
    """

    item_ids: list[str]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.item_ids or self.item_ids[0] != PADDING_ID:
            raise ValueError(
                'item_ids[0] must be "" (padding); build with build_item_vocab'
            )
        self._index = {item_id: i for i, item_id in enumerate(self.item_ids) if i > 0}

    @property
    def n_items(self) -> int:
        """Number of real items."""
        return len(self.item_ids) - 1

    def index_of(self, item_id: str) -> int | None:
        """The index of ``item_id``, or ``None`` if unknown."""
        return self._index.get(item_id)

    def indices(self, item_ids: pd.Series) -> np.ndarray:
        """Indices of a column of known item ids, int64.

        Raises:
            KeyError: an id is not in the vocabulary.
        """
        mapped = item_ids.map(self._index)
        if mapped.isna().any():
            unknown = item_ids[mapped.isna()].iloc[0]
            raise KeyError(f"item_id {unknown!r} is not in the item vocabulary")
        return mapped.to_numpy(dtype=np.int64)


@dataclass
class UserSequences:
    """Every user's full item-index sequence, oldest first.

    Attributes:
        user_ids: one id per user, sorted.
        item_seqs: int64 arrays of item indices, aligned with ``user_ids``.
    """

    user_ids: list[str]
    item_seqs: list[np.ndarray]


@dataclass
class LeaveOneOutSplit:
    """Training histories and the validation and test targets of every user.

    Attributes:
        vocab: the item vocabulary.
        user_ids: sorted user ids.
        train_seqs: per user, the training history (int64 item indices, oldest first).
        valid_items: per user, the validation target index, 0 for training-only users.
        test_items: per user, the test target index, 0 for training-only users.
    """

    vocab: ItemVocab
    user_ids: list[str]
    train_seqs: list[np.ndarray]
    valid_items: np.ndarray
    test_items: np.ndarray

    @property
    def n_items(self) -> int:
        """Number of real items."""
        return self.vocab.n_items

    def histories(self, stage: Stage) -> list[np.ndarray]:
        """What every user has seen before the ``stage`` target.

        ``valid``: the training history; ``test``: training history plus the validation
        item. Training-only users get their training history in both cases.
        """
        if stage == "valid":
            return list(self.train_seqs)
        if stage == "test":
            return [
                np.append(seq, valid) if valid > 0 else seq
                for seq, valid in zip(self.train_seqs, self.valid_items, strict=True)
            ]
        raise ValueError(f"stage={stage!r} is not supported; use 'valid' or 'test'")

    def eval_users(
        self, stage: Stage
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Users that have a ``stage`` target: (row numbers, histories, targets)."""
        targets = self.valid_items if stage == "valid" else self.test_items
        histories = self.histories(stage)
        rows = np.flatnonzero(targets > 0)
        return rows, [histories[i] for i in rows], targets[rows]


def _require_columns(frame: pd.DataFrame, columns: Collection[str], name: str) -> None:
    missing = sorted(set(columns) - set(frame.columns))
    if missing:
        raise ValueError(
            f"{name} is missing columns {missing}; see docs/architecture.md"
        )


def _item_events(
    events: pd.DataFrame, event_types: Collection[str] | None
) -> pd.DataFrame:
    """Events that name an item, optionally of some event types only."""
    _require_columns(
        events, ("user_id", "item_id", "event_type", "timestamp"), "events"
    )
    keep = events["item_id"].notna() & (events["item_id"].astype(str) != "")
    if event_types is not None:
        keep &= events["event_type"].isin(list(event_types))
    return events.loc[keep, ["user_id", "item_id", "timestamp"]]


def build_item_vocab(
    events: pd.DataFrame,
    catalog: pd.DataFrame | None = None,
    event_types: Collection[str] | None = None,
) -> ItemVocab:
    """Index every item of the catalog and the events, in item-id order.

    Args:
        events: canonical events table.
        catalog: canonical catalog table; its items are ranked even if nobody saw them.
        event_types: only count events of these types; all types when ``None``.

    Returns:
        The vocabulary, items sorted by their id string.
    """
    ids = set(_item_events(events, event_types)["item_id"].astype(str))
    if catalog is not None:
        _require_columns(catalog, ("item_id",), "catalog")
        ids |= set(catalog["item_id"].dropna().astype(str))
    ids.discard(PADDING_ID)
    return ItemVocab(item_ids=[PADDING_ID, *sorted(ids)])


def build_user_sequences(
    events: pd.DataFrame, vocab: ItemVocab, event_types: Collection[str] | None = None
) -> UserSequences:
    """Each user's item indices ordered by ``(timestamp, item_id)``.

    Args:
        events: canonical events table.
        vocab: the item vocabulary; every event item must be in it.
        event_types: only use events of these types; all types when ``None``.

    Returns:
        The sequences, users sorted by id.
    """
    frame = _item_events(events, event_types).astype({"user_id": str, "item_id": str})
    frame = frame.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    frame["index"] = vocab.indices(frame["item_id"])

    user_ids: list[str] = []
    item_seqs: list[np.ndarray] = []
    for user_id, group in frame.groupby("user_id", sort=True):
        user_ids.append(str(user_id))
        item_seqs.append(group["index"].to_numpy(dtype=np.int64))
    return UserSequences(user_ids=user_ids, item_seqs=item_seqs)


def leave_one_out(sequences: UserSequences, vocab: ItemVocab) -> LeaveOneOutSplit:
    """Split every sequence into training history, validation and test target.

    Args:
        sequences: full per-user sequences.
        vocab: the item vocabulary they index into.

    Returns:
        The split; users with fewer than 3 events have targets 0 (training only).
    """
    n_users = len(sequences.user_ids)
    valid_items = np.zeros(n_users, dtype=np.int64)
    test_items = np.zeros(n_users, dtype=np.int64)
    train_seqs: list[np.ndarray] = []
    for row, seq in enumerate(sequences.item_seqs):
        if len(seq) < MIN_EVAL_EVENTS:
            train_seqs.append(seq)
            continue
        train_seqs.append(seq[:-2])
        valid_items[row], test_items[row] = seq[-2], seq[-1]

    logger.info(
        "leave-one-out split users=%d eval_users=%d items=%d train_interactions=%d",
        n_users,
        int((test_items > 0).sum()),
        vocab.n_items,
        sum(len(s) for s in train_seqs),
    )
    return LeaveOneOutSplit(
        vocab, list(sequences.user_ids), train_seqs, valid_items, test_items
    )


def split_events(
    events: pd.DataFrame,
    catalog: pd.DataFrame | None = None,
    event_types: Collection[str] | None = None,
) -> LeaveOneOutSplit:
    """Vocabulary, sequences and leave-one-out split in one call.

    Args:
        events: canonical events table.
        catalog: canonical catalog table, or ``None`` to index event items only.
        event_types: only use events of these types; all types when ``None``.

    Returns:
        The leave-one-out split.
    """
    vocab = build_item_vocab(events, catalog, event_types)
    return leave_one_out(build_user_sequences(events, vocab, event_types), vocab)


def cold_start_split(
    split: LeaveOneOutSplit, fraction: float, seed: int = 0
) -> tuple[LeaveOneOutSplit, np.ndarray]:
    """A split where some test targets are items that never occur before the test.

    Draws ``fraction`` of the distinct test-target items as cold items and removes
    every interaction with them from the training histories; a validation target
    that is cold is dropped (that user is not validated). Test targets are unchanged,
    so users whose target is cold measure pure item cold start (no model has seen the
    item in any history).

    Args:
        split: a leave-one-out split.
        fraction: share of the distinct test-target items made cold, in (0, 1).
        seed: seed of the draw.

    Returns:
        The new split (same vocabulary and users) and the sorted cold item indices.

    Raises:
        ValueError: ``fraction`` is outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction} must be in (0, 1)")
    targets = np.unique(split.test_items[split.test_items > 0])
    rng = np.random.default_rng(seed)
    n_cold = max(1, round(len(targets) * fraction))
    cold = np.sort(rng.choice(targets, size=n_cold, replace=False))

    train_seqs = [seq[~np.isin(seq, cold)] for seq in split.train_seqs]
    valid_items = np.where(np.isin(split.valid_items, cold), 0, split.valid_items)
    logger.info(
        "cold-start split cold_items=%d cold_test_users=%d",
        len(cold),
        int(np.isin(split.test_items, cold).sum()),
    )
    return (
        LeaveOneOutSplit(
            split.vocab,
            list(split.user_ids),
            train_seqs,
            valid_items,
            split.test_items.copy(),
        ),
        cold,
    )
