"""Dask graph helpers: in-process schedulers, streamed results, prefetch, errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from shopml.processing import count_buckets, iter_task_results, prefetch, run_tasks


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


def fail_on_three(x: int) -> int:
    if x == 3:
        raise KeyError(f"task {x} failed")
    return x


def record_start(x: int, started: list[int]) -> int:
    started.append(x)
    return x


def test_results_stream_while_later_tasks_still_run() -> None:
    """The first result is handed over before the last task has started."""
    started: list[int] = []
    results = iter_task_results(
        record_start, [(x, started) for x in range(40)], num_workers=1
    )
    assert next(results) == 0
    assert len(started) < 40
    assert list(results) == list(range(1, 40))
    assert started == list(range(40))  # tasks start in argument order


def test_a_failing_task_raises_its_error_in_the_consumer() -> None:
    with pytest.raises(KeyError, match="task 3 failed"):
        list(iter_task_results(fail_on_three, [(x,) for x in range(6)]))


def produce(n: int) -> Iterator[int]:
    for x in range(n):
        if x == 5:
            raise OSError("disk gone at item 5")
        yield x


def test_prefetch_yields_every_item_in_order() -> None:
    assert list(prefetch(iter(range(100)), 2)) == list(range(100))


def test_prefetch_raises_the_producers_error_where_it_happened() -> None:
    seen = []
    with pytest.raises(OSError, match="disk gone at item 5"):
        for item in prefetch(produce(10), 1):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_abandoned_prefetch_stops_its_thread() -> None:
    items = prefetch(iter(range(1_000)), 1)
    assert next(items) == 0
    items.close()
    assert not [t for t in threading.enumerate() if t.name == "shopml-prefetch"]
