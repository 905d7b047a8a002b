"""The retention policy of every pruning command: keep the newest versions and
everything still served.

This is the rule ``shopml assets prune`` applies to asset versions
(:func:`shopml.assets.prune_versions`: the ``keep_last`` newest versions of each asset,
and never a live one), as a function the pruning of search bundles
(:func:`shopml.search_bundles.prune_search_bundles`) applies too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def check_keep_last(keep_last: int) -> int:
    """Return ``keep_last`` if at least 1: retention never deletes the newest entry.

    Raises:
        ValueError: ``keep_last`` is below 1.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be at least 1")
    return keep_last


def expired(
    entries: Sequence[T], keep_last: int, is_protected: Callable[[T], bool]
) -> list[T]:
    """The entries retention deletes, oldest first.

    Args:
        entries: one group (the versions of one asset, the search bundles), oldest
            first.
        keep_last: how many of the newest entries are kept (at least 1).
        is_protected: whether an entry is live (served, or what a served one came
            from); a protected entry is kept however old.

    Returns:
        Every entry but the ``keep_last`` newest, less the protected ones.

    Raises:
        ValueError: ``keep_last`` is below 1.
    """
    check_keep_last(keep_last)
    return [entry for entry in entries[:-keep_last] if not is_protected(entry)]
