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
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import dask
import dask.local
import dask.threaded

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
    if scheduler not in LOCAL_SCHEDULERS:
        raise ValueError(
            f"scheduler {scheduler!r} is unknown; use one of {list(LOCAL_SCHEDULERS)} "
            "or set an address for a Dask cluster"
        )
    name = getattr(func, "__name__", "task")
    tasks = [
        dask.delayed(func, pure=True, name=f"{name}-{i}")(*args)
        for i, args in enumerate(arguments)
    ]
    started = time.monotonic()
    if address:
        results = _compute_on_cluster(tasks, address)
        where = f"cluster {address}"
    else:
        workers = num_workers or os.cpu_count() or 1
        # The scheduler's function rather than its name: a name makes Dask import
        # distributed (about a second) to look for a default client.
        get = dask.threaded.get if scheduler == "threads" else dask.local.get_sync
        results = list(dask.compute(*tasks, scheduler=get, num_workers=workers))
        where = f"in-process scheduler={scheduler} workers={workers}"
    logger.info(
        "dask tasks=%d func=%s on %s in %.1f s",
        len(tasks),
        name,
        where,
        time.monotonic() - started,
    )
    return results


def _compute_on_cluster(tasks: list[Any], address: str) -> list[Any]:
    """Compute the graph through a ``distributed.Client`` connected to ``address``."""
    from distributed import Client

    with Client(address, set_as_default=False, timeout="30s") as client:
        return list(dask.compute(*tasks, scheduler=client))


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
