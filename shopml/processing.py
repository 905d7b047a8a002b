"""Dask execution of the data stages: one graph, in-process or on a cluster.

A data stage splits its work into independent tasks (one per bucket of users, see
:mod:`shopml.clean_events`) and hands them to :func:`run_tasks`, which builds the
same ``dask.delayed`` graph whatever runs it:

* no address (the default): Dask's in-process scheduler (``threads`` by default;
  pyarrow and numpy release the GIL for the heavy parts, so two threads keep two
  cores busy; ``sync`` runs the tasks one after another, for debugging);
* an address (``Settings.dask_address``, env ``SHOPML_DASK_ADDRESS``, e.g. the
  scheduler Service of a ``DaskCluster`` made by the Dask Kubernetes operator):
  a ``distributed.Client`` to that scheduler computes the very same graph.

Tasks receive paths and return small results; workers of a remote cluster must see
the paths the stage passes them (a volume mounted at the same path in the stage's
pod and the workers, see ``clean_tables(work_dir=...)``).

:func:`iter_task_results` hands results over in order as they finish, so a stage
can write the output of early tasks while later ones run (two cores busy instead
of one), and :func:`prefetch` reads the next chunk of a stream in a thread while
the current one is processed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import dask
import dask.base
import dask.local
import dask.threaded
from dask.callbacks import Callback

logger = logging.getLogger(__name__)

#: In-process schedulers :func:`run_tasks` accepts.
LOCAL_SCHEDULERS: tuple[str, ...] = ("threads", "sync")

T = TypeVar("T")


def run_tasks(
    func: Callable[..., T],
    arguments: Sequence[tuple[Any, ...]],
    *,
    address: str | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
) -> list[T]:
    """Run ``func`` once per argument tuple as one Dask graph; results in order.

    Args:
        func: a module-level function (a cluster imports it by name), pure: the same
            arguments give the same result.
        arguments: one positional-argument tuple per task.
        address: a Dask scheduler (``tcp://host:8786``); None computes in-process.
        scheduler: in-process scheduler, ``threads`` or ``sync``; ignored with an
            address.
        num_workers: threads of the ``threads`` scheduler; None uses the CPU count.

    Returns:
        ``func``'s results, in the order of ``arguments``.

    Raises:
        ValueError: ``scheduler`` is not one of :data:`LOCAL_SCHEDULERS`.
        OSError: the scheduler at ``address`` cannot be reached.
    """
    return list(
        iter_task_results(
            func,
            arguments,
            address=address,
            scheduler=scheduler,
            num_workers=num_workers,
        )
    )


def iter_task_results(
    func: Callable[..., T],
    arguments: Sequence[tuple[Any, ...]],
    *,
    address: str | None = None,
    scheduler: str = "threads",
    num_workers: int | None = None,
) -> Iterator[T]:
    """Like :func:`run_tasks`, yielding each result as soon as it and those before
    it are done, so the caller can consume early results while later tasks run.

    The graph runs in a background thread (in-process) or on the cluster; tasks are
    named so that Dask starts them in the order of ``arguments`` (its schedulers run
    independent tasks in descending key order, so the keys count down).

    Args:
        func: as for :func:`run_tasks`.
        arguments: as for :func:`run_tasks`.
        address: as for :func:`run_tasks`.
        scheduler: as for :func:`run_tasks`.
        num_workers: as for :func:`run_tasks`.

    Yields:
        ``func``'s results, in the order of ``arguments``.

    Raises:
        ValueError: ``scheduler`` is not one of :data:`LOCAL_SCHEDULERS`.
        OSError: the scheduler at ``address`` cannot be reached.
    """
    if scheduler not in LOCAL_SCHEDULERS:
        raise ValueError(
            f"scheduler {scheduler!r} is unknown; use one of {list(LOCAL_SCHEDULERS)} "
            "or set an address for a Dask cluster"
        )
    name = getattr(func, "__name__", "task")
    # One token per graph: callbacks of graphs run at once in this process differ.
    token, last = dask.base.tokenize(func, list(arguments))[:12], len(arguments) - 1
    keys = [f"{name}-{token}-{last - i:06d}" for i in range(len(arguments))]
    tasks = [
        dask.delayed(func, pure=True)(*args, dask_key_name=key)
        for key, args in zip(keys, arguments, strict=True)
    ]
    started = time.monotonic()
    if address:
        yield from _iter_on_cluster(tasks, address)
        where = f"cluster {address}"
    else:
        workers = num_workers or os.cpu_count() or 1
        yield from _iter_in_process(tasks, keys, scheduler, workers)
        where = f"in-process scheduler={scheduler} workers={workers}"
    logger.info(
        "dask tasks=%d func=%s on %s in %.1f s",
        len(tasks),
        name,
        where,
        time.monotonic() - started,
    )


def _iter_in_process(
    tasks: list[Any], keys: list[str], scheduler: str, workers: int
) -> Iterator[Any]:
    """Compute the graph in a background thread; yield results in task order.

    A Dask callback hands each finished task's result over as it completes.
    """
    if not tasks:
        return
    position = {key: i for i, key in enumerate(keys)}
    finished: queue.Queue[tuple[int, Any]] = queue.Queue()

    def on_done(key: Any, result: Any, *_: Any) -> None:
        if key in position:
            finished.put((position[key], result))

    def compute() -> None:
        # The scheduler's function rather than its name: a name makes Dask import
        # distributed (about a second) to look for a default client.
        get = dask.threaded.get if scheduler == "threads" else dask.local.get_sync
        try:
            with Callback(posttask=on_done):
                dask.compute(*tasks, scheduler=get, num_workers=workers)
        except BaseException as err:  # handed to the consumer, raised there
            finished.put((-1, _Failure(err)))

    thread = threading.Thread(target=compute, name="shopml-dask", daemon=True)
    thread.start()
    try:
        held: dict[int, Any] = {}
        for index in range(len(tasks)):
            while index not in held:
                done, result = finished.get()
                if isinstance(result, _Failure):
                    raise result.error
                held[done] = result
            yield held.pop(index)
    finally:
        thread.join()


def _iter_on_cluster(tasks: list[Any], address: str) -> Iterator[Any]:
    """Compute the graph through a ``distributed.Client``; yield results in order."""
    from distributed import Client

    with Client(address, set_as_default=False, timeout="30s") as client:
        futures = client.compute(tasks)
        for future in futures:
            yield future.result()


def count_buckets(rows: int, rows_per_bucket: int) -> int:
    """How many buckets keep each one near ``rows_per_bucket`` rows (at least one).

    Args:
        rows: rows to split.
        rows_per_bucket: the target size of a bucket.

    Returns:
        ``ceil(rows / rows_per_bucket)``, at least 1.

    Raises:
        ValueError: ``rows_per_bucket`` is below 1.
    """
    if rows_per_bucket < 1:
        raise ValueError(f"rows_per_bucket={rows_per_bucket} must be at least 1")
    return max(1, math.ceil(rows / rows_per_bucket))


_DONE = object()


def prefetch(items: Iterator[T], depth: int) -> Generator[T, None, None]:
    """Yield ``items``, pulling up to ``depth`` of them ahead in a background thread.

    pyarrow releases the GIL while it reads, parses and writes, so a producer and a
    consumer of chunks overlap on two cores. An exception of the producer is raised
    here, at the item where it happened. Abandoning the generator stops the thread
    after its current item.

    Args:
        items: the producer (a generator: it runs in the thread).
        depth: items held ready beyond the one being consumed (at least 1).

    Yields:
        The items, in order.
    """
    ready: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put(item)
        except BaseException as err:  # handed to the consumer, raised there
            ready.put(_Failure(err))
            return
        ready.put(_DONE)

    thread = threading.Thread(target=produce, name="shopml-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.05)
        thread.join()


@dataclass(frozen=True)
class _Failure:
    error: BaseException
