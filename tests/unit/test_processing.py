"""Dask graph helpers: in-process schedulers, bucket counts, errors."""

from __future__ import annotations

import pytest

from shopml.processing import count_buckets, run_tasks


def square_plus(x: int, y: int) -> int:
    return x * x + y


@pytest.mark.parametrize("scheduler", ["threads", "sync"], ids=["threads", "sync"])
def test_results_come_back_in_argument_order(scheduler: str) -> None:
    arguments = [(x, 1) for x in range(7)]
    assert run_tasks(square_plus, arguments, scheduler=scheduler) == [
        1, 2, 5, 10, 17, 26, 37,
    ]  # fmt: skip


def test_unknown_scheduler_is_rejected() -> None:
    with pytest.raises(ValueError, match="scheduler 'processes' is unknown"):
        run_tasks(square_plus, [(1, 1)], scheduler="processes")


def test_no_tasks_give_no_results() -> None:
    assert run_tasks(square_plus, []) == []


@pytest.mark.parametrize(
    ("rows", "per_bucket", "expected"),
    [(0, 10, 1), (10, 10, 1), (11, 10, 2), (10_000_000, 1_000_000, 10)],
)
def test_bucket_count_keeps_buckets_near_the_target(
    rows: int, per_bucket: int, expected: int
) -> None:
    assert count_buckets(rows, per_bucket) == expected


def test_bucket_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rows_per_bucket=0"):
        count_buckets(10, 0)
