"""Locust users for ``benchmarks/bench_serve.py``: fixed-rate load on one route.

``bench_serve.py`` runs this file headless (``locust -f ... --headless``) once per
phase; it is not meant to be run by hand. The environment says what to send:

* ``SHOPML_BENCH_PATH``: the route, e.g. ``/v1/models/recommender:predict``;
* ``SHOPML_BENCH_BODIES``: a JSON-lines file of request bodies, POSTed in turn from a
  random start per user; absent or empty: GET requests (health routes);
* ``SHOPML_BENCH_USER_RATE``: requests per second of each user
  (``constant_throughput``), so ``users x rate`` is the offered load; ``0`` sends
  back to back (closed loop, the max-throughput probe);
* ``SHOPML_BENCH_DURATION``: seconds to run once every user has started (spawning
  can take seconds on a busy machine, so Locust's own ``-t`` is only a safety net);
* ``SHOPML_BENCH_SAMPLES``: where to write every request's start time, latency and
  status code (``.npz``: ``samples`` float64 [R, 3] and ``spawned_at``, when every
  user was running) when the run ends. Locust's own percentiles round to whole
  milliseconds; these keep the full resolution.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import gevent  # type: ignore[import-untyped]
import numpy as np
from locust import FastHttpUser, constant, constant_throughput, events, task
from locust.env import Environment
from locust.runners import Runner

PATH = os.environ.get("SHOPML_BENCH_PATH", "/v2/health/ready")
BODIES_FILE = os.environ.get("SHOPML_BENCH_BODIES", "")
USER_RATE = float(os.environ.get("SHOPML_BENCH_USER_RATE", "0"))
SAMPLES_FILE = os.environ.get("SHOPML_BENCH_SAMPLES", "")
DURATION_S = float(os.environ.get("SHOPML_BENCH_DURATION", "10"))


def _read_bodies(path: str) -> list[str]:
    """Request bodies, one JSON document a line, sent as they are."""
    if not path:
        return []
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip()]


BODIES = _read_bodies(BODIES_FILE)
# Rows of (start time as time.time(), latency in ms, status code; 0 = no response).
SAMPLES: list[tuple[float, float, int]] = []
SPAWNED_AT: list[float] = []


@events.request.add_listener
def _record(
    start_time: float,
    response_time: float,
    response: Any = None,
    **_: Any,
) -> None:
    status = getattr(response, "status_code", 0) if response is not None else 0
    SAMPLES.append((start_time, response_time, int(status or 0)))


RUNNER: list[Runner] = []


@events.init.add_listener
def _keep_runner(environment: Environment, **_: Any) -> None:
    if environment.runner is not None:
        RUNNER.append(environment.runner)


@events.spawning_complete.add_listener
def _spawned(**_: Any) -> None:
    SPAWNED_AT.append(time.time())
    if RUNNER:
        gevent.spawn_later(DURATION_S, RUNNER[0].quit)


@events.quitting.add_listener
def _save(**_: Any) -> None:
    if SAMPLES_FILE:
        samples = np.array(SAMPLES, dtype=np.float64).reshape(-1, 3)
        spawned_at = SPAWNED_AT[0] if SPAWNED_AT else samples[:, 0].min(initial=0.0)
        np.savez(SAMPLES_FILE, samples=samples, spawned_at=spawned_at)


class RouteUser(FastHttpUser):
    """Sends ``PATH`` at ``USER_RATE`` requests/s, cycling through ``BODIES``."""

    wait_time = constant_throughput(USER_RATE) if USER_RATE > 0 else constant(0)
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        """Start each user at a random body and a random phase of its period."""
        self.position = random.randrange(len(BODIES)) if BODIES else 0
        if USER_RATE > 0:
            time.sleep(random.uniform(0, 1 / USER_RATE))  # gevent-patched: yields

    @task
    def send(self) -> None:
        """One request; 503 and other errors are recorded, never raised."""
        if not BODIES:
            with self.client.get(PATH, catch_response=True) as response:
                response.success()
            return
        body = BODIES[self.position % len(BODIES)]
        self.position += 1
        with self.client.post(
            PATH,
            data=body,
            headers={"content-type": "application/json"},
            catch_response=True,
        ) as response:
            response.success()
