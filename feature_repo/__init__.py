"""The Feast feature repository of shopml: names shared by definitions and clients.

``definitions.py`` declares the Feast objects (it imports Feast, which is slow); this
module holds only the names and feature lists, so the online client and the features
stage can refer to them without importing Feast. The Feast CLI skips ``__init__.py``.
"""

PROJECT = "shopml"

# Entities and their join keys.
USER = "user"
USER_JOIN_KEY = "user_id"
ITEM = "item"
ITEM_JOIN_KEY = "item_id"

# Column every offline feature table carries for point-in-time joins.
TIMESTAMP_FIELD = "event_timestamp"

# Feature views.
USER_RECENT_ITEMS = "user_recent_items"
USER_ACTIVITY = "user_activity"
ITEM_STATS = "item_stats"
FEATURE_VIEWS = (USER_RECENT_ITEMS, USER_ACTIVITY, ITEM_STATS)

# Push source that feeds new events into ``user_recent_items`` online.
USER_RECENT_ITEMS_PUSH = "user_recent_items_push"

# Feature services.
RECOMMENDER_TRAINING = "recommender_training"
RECOMMENDER_SERVING = "recommender_serving"
SEARCH_SERVING = "search_serving"

# Event types of the canonical events table and the activity windows (days; None = all).
EVENT_TYPES = ("view", "click", "cart", "purchase", "search", "rate")
WINDOWS: dict[str, int | None] = {"7d": 7, "30d": 30, "all": None}

# Features of ``user_recent_items``: the last item ids, newest last, and their count.
ITEM_SEQ = "item_seq"
ITEM_SEQ_LEN = "item_seq_len"

# Feature of ``user_activity``: every distinct item the user ever touched, so serving
# never recommends one of them, however long ago (``item_seq`` holds only the last N).
SEEN_ITEMS = "seen_items"
MAX_SEEN_ITEMS = (
    10_000  # a user beyond this is a bot or a buyer account: keep the newest
)


def user_activity_count_features() -> list[str]:
    """Names of the integer count features of ``user_activity``.

    Returns:
        ``n_events_<window>`` then ``n_<event_type>_<window>`` for every window.
    """
    names = [f"n_events_{window}" for window in WINDOWS]
    names += [
        f"n_{event_type}_{window}" for event_type in EVENT_TYPES for window in WINDOWS
    ]
    return names


# Float features of ``user_activity``; value served when a user has no row.
USER_ACTIVITY_FLOAT_DEFAULTS: dict[str, float] = {
    "days_since_last_event": -1.0,  # -1 means: no event seen for this user
    "avg_price": 0.0,  # mean price of the items the user touched; 0 without prices
}
USER_ACTIVITY_INT_FEATURES = [*user_activity_count_features(), "n_distinct_categories"]

# Features of ``item_stats``.
ITEM_COUNT_FEATURES = [
    *(f"n_events_{window}" for window in WINDOWS),
    "n_users_all",
    *(f"n_{event_type}_all" for event_type in EVENT_TYPES),
]
ITEM_FLOAT_FEATURES = ["conversion_rate", "avg_rating", "price"]
ITEM_STRING_FEATURES = ["title", "category"]
