"""Training data from the feature store: point-in-time joins and the train stage's split.

``training_examples`` runs a point-in-time join for an entity frame (checked join
keys, timestamps normalized to UTC by the rule in ``prepare_entity_frame``).
``training_cutoffs`` and ``feast_training_split`` turn it into leave-one-out training
histories, and ``split_for_training`` gives the train stage its split with histories
from the events or from Feast. The store comes from ``shopml.feast_store``; Feast is
only imported when a store is built.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from feature_repo import (
    ITEM_SEQ,
    ITEM_SEQ_LEN,
    RECOMMENDER_TRAINING,
    TIMESTAMP_FIELD,
    USER_JOIN_KEY,
)
from shopml.config import Settings, load_settings
from shopml.feast_store import (
    check_join_keys,
    feature_service_join_keys,
    feature_store_from_settings,
)
from shopml.sequences import MIN_EVAL_EVENTS, LeaveOneOutSplit, split_events

if TYPE_CHECKING:
    import feast

logger = logging.getLogger(__name__)


# Where the train stage takes its training histories from (see split_for_training).
TRAINING_SOURCES = ("events", "feast")
# Shift that turns "as of t" (Feast joins rows stamped <= t) into "strictly before t".
_JUST_BEFORE = pd.Timedelta(microseconds=1)


def prepare_entity_frame(
    entity_df: pd.DataFrame, join_keys: Sequence[str]
) -> pd.DataFrame:
    """Check an entity frame's join keys and bring its timestamps to UTC.

    Timestamp rule: timezone-aware timestamps are converted to UTC; timezone-naive
    ones (and ISO-8601 text without an offset) are taken to be UTC already, never local
    time, because every canonical table stores UTC. Other columns (labels) pass
    through.

    Args:
        entity_df: one row per training example: the join keys, ``event_timestamp``
            and any label columns.
        join_keys: the join keys the requested features need.

    Returns:
        A copy with ``event_timestamp`` as ``datetime64[us, UTC]``.

    Raises:
        ValueError: a join key or ``event_timestamp`` is missing, or a timestamp is
            null or unreadable.
    """
    check_join_keys(list(entity_df.columns), join_keys, "entity frame")
    if TIMESTAMP_FIELD not in entity_df.columns:
        raise ValueError(
            f"entity frame lacks {TIMESTAMP_FIELD!r}, the time each example is "
            f"observed at; it has columns {sorted(map(str, entity_df.columns))}"
        )

    frame = entity_df.copy()
    stamps = frame[TIMESTAMP_FIELD]
    try:
        if isinstance(stamps.dtype, pd.DatetimeTZDtype):
            stamps = stamps.dt.tz_convert("UTC")
        elif pd.api.types.is_datetime64_dtype(stamps.dtype):
            stamps = stamps.dt.tz_localize("UTC")
        elif pd.api.types.is_string_dtype(stamps.dtype) and all(
            isinstance(value, str) for value in stamps.dropna()
        ):
            stamps = pd.to_datetime(stamps, utc=True, format="ISO8601")
        else:  # Python datetimes, naive or aware, possibly mixed
            stamps = pd.to_datetime(stamps, utc=True)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"entity frame {TIMESTAMP_FIELD!r} is unreadable: {err}"
        ) from err
    if stamps.isna().any():
        row = int(np.flatnonzero(stamps.isna().to_numpy())[0])
        raise ValueError(
            f"entity frame {TIMESTAMP_FIELD!r} is null at row {row}; every example "
            "needs the time it is observed at"
        )
    frame[TIMESTAMP_FIELD] = stamps.astype("datetime64[us, UTC]")
    return frame


def training_examples(
    store: feast.FeatureStore,
    entity_df: pd.DataFrame,
    *,
    service: str = RECOMMENDER_TRAINING,
) -> pd.DataFrame:
    """Point-in-time training data: each example gets the features as of its time.

    Feast joins, for every entity row, the newest feature row stamped at or before the
    row's ``event_timestamp``, so an example never sees an event after its own time.
    To see only what happened strictly before an event, pass the event time minus one
    microsecond (``training_cutoffs`` does).

    Args:
        store: the feature store with the service applied and its tables written.
        entity_df: join keys, ``event_timestamp`` (see ``prepare_entity_frame`` for the
            timezone rule) and any label columns.
        service: the feature service whose features are joined.

    Returns:
        The entity frame's rows in their original order with the service's features;
        ``item_seq`` is a list of item ids (``[]`` before a user's first event) and
        ``item_seq_len`` an integer.

    Raises:
        ValueError: a join key or timestamp problem (see ``prepare_entity_frame``).
    """
    frame = prepare_entity_frame(
        entity_df, feature_service_join_keys(store, service)
    ).assign(_entity_row=np.arange(len(entity_df)))

    joined = store.get_historical_features(
        entity_df=frame, features=store.get_feature_service(service)
    ).to_df()

    joined = joined.sort_values("_entity_row").drop(columns="_entity_row")
    joined = joined.reset_index(drop=True)
    if ITEM_SEQ in joined.columns:
        joined[ITEM_SEQ] = [
            [] if not isinstance(v, list | np.ndarray) else [str(i) for i in v]
            for v in joined[ITEM_SEQ]
        ]
        joined[ITEM_SEQ_LEN] = joined[ITEM_SEQ].map(len).astype("int64")
    logger.info("point-in-time join service=%s examples=%d", service, len(joined))
    return joined


def training_cutoffs(events: pd.DataFrame) -> pd.DataFrame:
    """Per user, the time its training history ends, for a point-in-time join.

    Events are ordered per user by ``(timestamp, item_id)`` as in
    ``shopml.sequences``. A user with at least 3 item events holds out the last two
    (validation and test targets): the cutoff is one microsecond before the
    validation event, so the history holds only what happened strictly before it.
    Other users are trained on everything: the cutoff is their last event time.

    Args:
        events: canonical events (``user_id``, ``item_id``, ``timestamp`` in UTC).

    Returns:
        ``user_id`` and ``event_timestamp``, one row per user, sorted by user.
    """
    named = events[events["item_id"].notna() & (events["item_id"].astype(str) != "")]
    ordered = named.astype({"user_id": str, "item_id": str}).sort_values(
        ["user_id", "timestamp", "item_id"], kind="stable"
    )
    by_user = ordered.groupby("user_id", sort=True)
    from_last = by_user.cumcount(ascending=False)  # 0: last event, 1: the one before
    size = by_user["item_id"].transform("size")

    is_eval = size >= MIN_EVAL_EVENTS
    valid_rows = ordered[is_eval & (from_last == 1)]
    last_rows = ordered[~is_eval & (from_last == 0)]
    cutoffs = pd.concat(
        [
            valid_rows.assign(
                **{TIMESTAMP_FIELD: valid_rows["timestamp"] - _JUST_BEFORE}
            ),
            last_rows.assign(**{TIMESTAMP_FIELD: last_rows["timestamp"]}),
        ]
    )
    return (
        cutoffs[[USER_JOIN_KEY, TIMESTAMP_FIELD]]
        .sort_values(USER_JOIN_KEY)
        .reset_index(drop=True)
    )


def feast_training_split(
    store: feast.FeatureStore, split: LeaveOneOutSplit, events: pd.DataFrame
) -> LeaveOneOutSplit:
    """Replace a split's training histories by point-in-time sequences from Feast.

    Targets, users and vocabulary stay those of ``split`` (leave-one-out by time);
    each history becomes the ``user_recent_items`` sequence as of the user's cutoff
    (``training_cutoffs``), so it holds at most the features stage's ``max_seq_len``
    newest items, and events sharing the validation event's timestamp are not in it.

    Args:
        store: the feature store built by the features stage from the same events.
        split: the leave-one-out split of ``events``.
        events: the curated events the split was built from.

    Returns:
        A copy of ``split`` with the Feast histories.

    Raises:
        ValueError: the store holds an item the split does not know (it was built
            from other data), or a user the join did not return.
    """
    examples = training_examples(store, training_cutoffs(events))
    sequences = dict(zip(examples[USER_JOIN_KEY], examples[ITEM_SEQ], strict=True))

    train_seqs = []
    for user_id in split.user_ids:
        if user_id not in sequences:
            raise ValueError(f"point-in-time join returned no row for user {user_id}")
        indices = [split.vocab.index_of(item) for item in sequences[user_id]]
        if None in indices:
            unknown = sequences[user_id][indices.index(None)]
            raise ValueError(
                f"feature store item {unknown!r} is not in the training vocabulary; "
                "run the features stage on the same curated data"
            )
        train_seqs.append(np.asarray(indices, dtype=np.int64))

    logger.info(
        "training histories from feast users=%d interactions=%d (events: %d)",
        len(train_seqs),
        sum(len(seq) for seq in train_seqs),
        sum(len(seq) for seq in split.train_seqs),
    )
    return replace(split, train_seqs=train_seqs)


def split_for_training(
    events: pd.DataFrame,
    catalog: pd.DataFrame | None,
    source: str = "events",
    settings: Settings | None = None,
) -> LeaveOneOutSplit:
    """The train stage's leave-one-out split, with histories from ``source``.

    Args:
        events: curated events.
        catalog: curated catalog (its items are ranked too).
        source: ``events``: full training histories from the events table;
            ``feast``: point-in-time histories from the offline feature store (see
            ``feast_training_split``; the features stage must have run on the same
            events).
        settings: where the feature store is; read from the environment when
            ``None``. Only used for ``feast``.

    Returns:
        The split; validation and test targets are the same for both sources.

    Raises:
        ValueError: an unknown ``source``, or Feast data that does not match.
    """
    if source not in TRAINING_SOURCES:
        raise ValueError(
            f"source={source!r} is not a training data source; use one of "
            f"{list(TRAINING_SOURCES)}"
        )
    split = split_events(events, catalog)
    if source == "events":
        return split
    store = feature_store_from_settings(settings or load_settings())
    return feast_training_split(store, split, events)
