"""Live events appended to the users' online sequences through Feast's push source.

``push_events`` reads each user's current ``user_recent_items`` sequence with
``shopml.online_features.OnlineFeatureClient``, appends the new items and pushes the
result to the online store only; the offline table is rebuilt by the features stage
from the curated events. ``shopml events push`` and the serving tests call it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pandas as pd

from feature_repo import (
    ITEM_SEQ,
    ITEM_SEQ_LEN,
    TIMESTAMP_FIELD,
    USER_JOIN_KEY,
    USER_RECENT_ITEMS,
    USER_RECENT_ITEMS_PUSH,
)
from shopml.online_features import (
    FeatureStoreUnavailable,
    OnlineFeatureClient,
    unavailable_errors,
)

if TYPE_CHECKING:
    import feast

logger = logging.getLogger(__name__)


def push_events(
    store: feast.FeatureStore, events: pd.DataFrame, max_seq_len: int = 50
) -> int:
    """Append new events to the users' online sequences through the push source.

    The users' current sequences are read from the online store, the new items are
    appended in ``(timestamp, item_id)`` order, the result is cut to the newest
    ``max_seq_len`` items and pushed online only (the offline table is rebuilt by the
    features stage from the curated events). Events that name no item (a search) are
    skipped, as in the sequences. Events must be newer than what is online: the Redis
    store ignores writes older than the value it holds.

    Args:
        store: the feature store with ``user_recent_items`` applied.
        events: canonical events with at least ``user_id`` (pseudonym), ``item_id`` and
            ``timestamp`` (UTC).
        max_seq_len: the most recent items kept per user.

    Returns:
        The number of users whose sequence was pushed.

    Raises:
        ValueError: a required column is missing or ``max_seq_len`` is below 1.
        FeatureStoreUnavailable: the online store cannot be read or written.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len} must be at least 1")
    missing = {"user_id", "item_id", "timestamp"} - set(events.columns)
    if missing:
        raise ValueError(
            f"events lack column(s) {sorted(missing)}; canonical events needed"
        )
    events = events[events["item_id"].notna() & (events["item_id"].astype(str) != "")]
    if events.empty:
        return 0

    # New items per user in sequence order, appended to what is online now.
    ordered = events.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    grouped = ordered.groupby("user_id", sort=True)
    user_ids = [str(user_id) for user_id in grouped.groups]
    client = OnlineFeatureClient(store, max_seq_len=max_seq_len)
    current = dict(zip(user_ids, client.user_sequences(user_ids), strict=True))
    frame = _merged_sequences(grouped, current, max_seq_len)

    from feast.data_source import PushMode

    try:
        store.push(USER_RECENT_ITEMS_PUSH, frame, to=PushMode.ONLINE)
    except unavailable_errors() as err:
        raise FeatureStoreUnavailable(
            f"cannot push {len(frame)} sequence(s) to {USER_RECENT_ITEMS_PUSH}: {err}"
        ) from err
    logger.info("pushed feature_view=%s users=%d", USER_RECENT_ITEMS, len(frame))
    return len(frame)


def _merged_sequences(
    grouped: Any, current: dict[str, list[str]], max_seq_len: int
) -> pd.DataFrame:
    """Rows for the push source: each user's online sequence plus its new items."""
    records = []
    for user_id, group in grouped:
        items = [*current[str(user_id)], *group["item_id"].astype(str)][-max_seq_len:]
        records.append(
            {
                USER_JOIN_KEY: str(user_id),
                ITEM_SEQ: items,
                ITEM_SEQ_LEN: len(items),
                TIMESTAMP_FIELD: pd.Timestamp(group["timestamp"].max()),
            }
        )
    return pd.DataFrame.from_records(records)
