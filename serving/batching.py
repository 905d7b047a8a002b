"""Request micro-batching for the model servers: concurrent requests share one pass.

:class:`MicroBatcher` queues the rows of every request, waits at most ``max_wait_ms``
for more to arrive (or until ``max_batch_size`` rows are queued), and runs them together
in one call. A batch whose call fails is retried request by request, so one bad request
never fails its neighbours.

Where the call runs: a batch whose cost (the sum of ``row_cost`` over its rows) is at
most ``inline_max_cost`` runs on the event loop itself; any other batch runs on one
worker thread. The default (``inline_max_cost=0``) sends every batch to the thread, for
a batch function that blocks on I/O. On a one-core server the worker thread buys no
parallelism, only hand-offs and GIL contention with the loop, so cheap compute-only
batches (the recommender's usual one-row top-10) are better inline. Measured at 300
req/s on the 100k-item catalog (``make bench-serve`` setting, busy 2-core machine,
three runs each): inline used 2.47-2.57 ms of server CPU per request against 2.55-2.79
ms on the thread, p99 3.7-7.6 ms against 4.0-8.4 ms; at saturation the two were within
noise. But an inline batch stalls everything else on the loop, health checks
included, for as long as it runs: a 256-row ``:explain`` took 1.6 s, and eight of them
held ``/v2/health/ready`` for 8.2 s. Heavy batches therefore go to the thread, where
the loop keeps answering between the GIL hand-offs.

The queue belongs to the event loop it was first used on; a new loop (each
``asyncio.run`` in tests) gets a new queue and worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

# No wait by default: requests that arrive while a batch runs form the next batch, so
# batches grow with the load and a lone request is never delayed.
DEFAULT_MAX_WAIT_MS = 0.0

RowT = TypeVar("RowT")
ResultT = TypeVar("ResultT")


@dataclass
class _Pending(Generic[RowT, ResultT]):
    """One request waiting in the queue: its rows and the future of its results."""

    rows: list[RowT]
    future: asyncio.Future[list[ResultT]]
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchStats:
    """What one batch looked like, handed to the ``on_batch`` callback.

    Attributes:
        requests: requests in the batch.
        rows: rows in the batch.
        queue_s: longest time a request of the batch waited in the queue.
        run_s: time the batch function took.
    """

    requests: int
    rows: int
    queue_s: float
    run_s: float


class MicroBatcher(Generic[RowT, ResultT]):
    """Collects rows of concurrent requests and runs them in one call.

    Args:
        run_batch: maps a list of rows to one result per row, in order; it is never
            called concurrently.
        max_batch_size: rows that end the wait at once (a larger request still runs
            whole, alone).
        max_wait_ms: longest time the first queued request waits for company; with
            0, a batch is whatever queued while the previous one ran.
        on_batch: called after every batch with its figures (metrics).
        inline_max_cost: batches costing at most this run on the event loop
            (compute-only ``run_batch``); costlier ones run on the worker thread.
            0 runs every batch on the thread.
        row_cost: the cost of one row; 1 by default, so the cost is the row count.

    Raises:
        ValueError: ``max_batch_size`` below 1, ``max_wait_ms`` or
            ``inline_max_cost`` below 0.
    """

    def __init__(
        self,
        run_batch: Callable[[list[RowT]], list[ResultT]],
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        on_batch: Callable[[BatchStats], None] | None = None,
        inline_max_cost: float = 0.0,
        row_cost: Callable[[RowT], float] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be at least 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms} must be 0 or more")
        if inline_max_cost < 0:
            raise ValueError(f"inline_max_cost={inline_max_cost} must be 0 or more")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self.inline_max_cost = inline_max_cost
        self.row_cost = row_cost
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Pending[RowT, ResultT]] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, rows: Sequence[RowT]) -> list[ResultT]:
        """Queue the rows of one request and wait for their results.

        Args:
            rows: the request's rows.

        Returns:
            One result per row, in order.

        Raises:
            Exception: whatever ``run_batch`` raised for this request alone.
        """
        queue = self._queue_for_running_loop()
        future: asyncio.Future[list[ResultT]] = (
            asyncio.get_running_loop().create_future()
        )
        await queue.put(_Pending(list(rows), future))
        return await future

    def _queue_for_running_loop(self) -> asyncio.Queue[_Pending[RowT, ResultT]]:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop or self._worker is None:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._work(self._queue))
        elif self._worker.done():
            self._worker = loop.create_task(self._work(self._queue))
        return self._queue

    async def _work(self, queue: asyncio.Queue[_Pending[RowT, ResultT]]) -> None:
        """Take a batch off the queue, run it (inline or on the worker), repeat."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(queue)
            started = time.perf_counter()
            if self.runs_inline(batch):
                outcomes = self._run(batch)
                # Let the loop serve others (health checks) before the next batch:
                # a full queue would otherwise chain inline batches without a break.
                await asyncio.sleep(0)
            else:
                outcomes = await loop.run_in_executor(self._executor, self._run, batch)
            run_s = time.perf_counter() - started
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():
                    continue  # the request was cancelled (client gone)
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
            if self.on_batch is not None:
                self.on_batch(
                    BatchStats(
                        requests=len(batch),
                        rows=sum(len(p.rows) for p in batch),
                        queue_s=started - min(p.queued_at for p in batch),
                        run_s=run_s,
                    )
                )

    async def _collect(
        self, queue: asyncio.Queue[_Pending[RowT, ResultT]]
    ) -> list[_Pending[RowT, ResultT]]:
        """The first waiting request plus whatever arrives within ``max_wait_s``."""
        batch = [await queue.get()]
        if self.inline_max_cost > 0 and queue.empty():
            # Let requests already read by the loop reach the queue: after an inline
            # batch they are parsed in the same turn as the first one.
            await asyncio.sleep(0)
        rows = len(batch[0].rows)
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch_size:
            # Take what is already queued without waiting, then wait until the deadline.
            if queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                pending = queue.get_nowait()
            batch.append(pending)
            rows += len(pending.rows)
        return batch

    def cost(self, rows: Sequence[RowT]) -> float:
        """The cost of some rows: their count, or the sum of ``row_cost``."""
        if self.row_cost is None:
            return float(len(rows))
        return sum(self.row_cost(row) for row in rows)

    def runs_inline(self, batch: Sequence[_Pending[RowT, ResultT]]) -> bool:
        """Whether a batch is cheap enough to run on the event loop."""
        if self.inline_max_cost <= 0:
            return False
        cost = 0.0
        for pending in batch:
            cost += self.cost(pending.rows)
            if cost > self.inline_max_cost:
                return False
        return True

    def _run(
        self, batch: list[_Pending[RowT, ResultT]]
    ) -> list[list[ResultT] | BaseException]:
        """Run the whole batch; if that fails, run each request alone."""
        rows = [row for pending in batch for row in pending.rows]
        try:
            results = self.run_batch(rows)
        except Exception as err:
            if len(batch) == 1:
                return [err]
            logger.debug("batch of %d requests failed; retrying one by one", len(batch))
            return [self._run_alone(pending.rows) for pending in batch]

        outcomes: list[list[ResultT] | BaseException] = []
        start = 0
        for pending in batch:
            outcomes.append(results[start : start + len(pending.rows)])
            start += len(pending.rows)
        return outcomes

    def _run_alone(self, rows: list[RowT]) -> list[ResultT] | BaseException:
        try:
            return self.run_batch(rows)
        except Exception as err:
            return err
