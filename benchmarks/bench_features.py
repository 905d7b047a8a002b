"""Latency of reading one user's serving features from Redis on 127.0.0.1.

Run (``make bench-features``)::

    .venv/bin/python benchmarks/bench_features.py [--users 1000] [--reads 3000]

What it does:

1. starts ``redis-server`` on a free port of 127.0.0.1 (no persistence), pinned to CPU
   0 when the machine has two or more; the benchmark process runs on CPU 1
   (``--no-pin`` leaves both to the OS);
2. writes synthetic curated events (``--users`` users with 50-item histories over 2,000
   items), runs the features stage on them (Feast apply + materialize into Redis);
3. reads the ``recommender_serving`` features (the item sequence and 24 activity
   features) of a random user, round-robin over the methods below so that every
   method sees the same machine noise, and prints p50/p90/p99 per method:

   * ``raw HMGET (floor)``: redis-py ``HMGET`` of the same Feast key and fields, no
     decoding. Feast keeps one hash per user, so this is the raw read of that key
     (a plain ``GET`` does not apply to a hash);
   * ``raw HGETALL``: the whole hash of the user, no decoding;
   * ``client.serving_features``: our ``OnlineFeatureClient`` (Redis fast path:
     same ``HMGET``, Feast's value decoding, defaults);
   * ``client.user_sequence``: the recommender's per-request read;
   * ``feast get_online_features``: the same features through Feast, for reference.

Nothing is asserted: the figures and the target (p99 <= 2 ms and <= 3x the floor's
p99) are printed. ``--json FILE`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.features import build_features  # noqa: E402
from feature_repo import RECOMMENDER_SERVING  # noqa: E402
from shopml.config import Settings  # noqa: E402
from shopml.feast_store import feature_store_from_settings  # noqa: E402
from shopml.online_features import (  # noqa: E402
    SERVING_FEATURES,
    OnlineFeatureClient,
    RedisFeatureReader,
)

LOOPBACK = "127.0.0.1"
N_ITEMS = 2000
HISTORY = 50
TARGET_P99_MS = 2.0
TARGET_RATIO = 3.0


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def start_redis(port: int, is_pinned: bool) -> subprocess.Popen[bytes]:
    """redis-server on 127.0.0.1 without persistence, on CPU 0 when pinned."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: run `make services` first")
    command = [binary, "--bind", LOOPBACK, "--port", str(port), "--save", ""]
    command += ["--appendonly", "no"]
    if is_pinned and shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return process
        time.sleep(0.05)
    process.terminate()
    sys.exit(f"redis-server did not listen on {LOOPBACK}:{port} within 10 s")


def write_curated(folder: Path, n_users: int, seed: int) -> list[str]:
    """Synthetic curated events and catalog; returns the user pseudonyms."""
    rng = np.random.default_rng(seed)
    users = [f"u_{index:032x}" for index in range(n_users)]
    start = pd.Timestamp("2024-01-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": np.repeat(users, HISTORY),
            "item_id": rng.integers(1, N_ITEMS + 1, n_users * HISTORY).astype(str),
            "event_type": rng.choice(
                ["view", "click", "cart", "purchase"], n_users * HISTORY
            ),
            "timestamp": start
            + pd.to_timedelta(rng.integers(0, 30 * 86400, n_users * HISTORY), unit="s"),
        }
    )
    catalog = pd.DataFrame(
        {
            "item_id": [str(i) for i in range(1, N_ITEMS + 1)],
            "title": [f"item {i}" for i in range(1, N_ITEMS + 1)],
            "category": [f"c{i % 40}" for i in range(1, N_ITEMS + 1)],
            "price": rng.uniform(1, 100, N_ITEMS).round(2),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    events.to_parquet(folder / "events.parquet", index=False)
    catalog.to_parquet(folder / "catalog.parquet", index=False)
    return users


def measure(
    methods: dict[str, Callable[[str], object]], users: list[str], reads: int
) -> dict[str, np.ndarray]:
    """Milliseconds per call of every method, interleaved call by call."""
    order = random.Random(7)
    picks = [order.choice(users) for _ in range(reads)]
    for user in picks[:200]:  # warm connections, registry cache, imports
        for method in methods.values():
            method(user)

    # The order rotates every read, so no method always runs first after a pause.
    names = list(methods)
    timings = {name: np.empty(reads) for name in names}
    for index, user in enumerate(picks):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter_ns()
            methods[name](user)
            timings[name][index] = (time.perf_counter_ns() - started) / 1e6
    return timings


def report(timings: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Print p50/p99 per method and the target check; return the figures."""
    figures = {
        name: {
            "p50_ms": float(np.percentile(values, 50)),
            "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)),
        }
        for name, values in timings.items()
    }
    floor = figures["raw HMGET (floor)"]["p99_ms"]
    print(f"{'method':32} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p99/floor':>10}")
    for name, figure in figures.items():
        figure["p99_over_floor"] = figure["p99_ms"] / floor
        print(
            f"{name:32} {figure['p50_ms']:8.3f} {figure['p90_ms']:8.3f} "
            f"{figure['p99_ms']:8.3f} "
            f"{figure['p99_over_floor']:10.2f}"
        )
    ours = figures["client.serving_features"]
    meets = ours["p99_ms"] <= TARGET_P99_MS and ours["p99_over_floor"] <= TARGET_RATIO
    print(
        f"target p99 <= {TARGET_P99_MS} ms and <= {TARGET_RATIO}x floor: "
        f"{'met' if meets else 'NOT met'} (client.serving_features p99 "
        f"{ours['p99_ms']:.3f} ms, {ours['p99_over_floor']:.2f}x)"
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--reads", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write figures")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the OS place Redis and the client"
    )
    args = parser.parse_args()

    is_pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
    if is_pinned:
        os.sched_setaffinity(0, {1})
    port = free_port()
    server = start_redis(port, is_pinned)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
            settings = Settings(
                home=Path(tmp) / "home",
                redis_url=f"redis://{LOOPBACK}:{port}/0",
                progress=False,
            )
            users = write_curated(Path(tmp) / "curated", args.users, args.seed)
            started = time.monotonic()
            build_features(Path(tmp) / "curated", settings)
            print(
                f"features stage: {args.users} users in {time.monotonic() - started:.1f} s"
            )
            figures = report(measure(read_methods(settings), users, args.reads))
    finally:
        server.terminate()
        server.wait(timeout=10)

    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, sort_keys=True))
        print(f"wrote {args.json}")


def read_methods(settings: Settings) -> dict[str, Callable[[str], object]]:
    """The reads compared, all on one user id, each on its own connection."""
    store = feature_store_from_settings(settings)
    client = OnlineFeatureClient(store)
    reader = client._redis_reader()  # the fast path the client uses
    if not isinstance(reader, RedisFeatureReader):
        sys.exit("the client did not take the Redis fast path; nothing to compare")
    raw = RedisFeatureReader.from_store(store, [])
    assert raw is not None
    fields = [raw.field(ref) for ref in SERVING_FEATURES]
    connection: Any = raw._client  # redis-py's stubs type keys as str; ours are bytes
    service = store.get_feature_service(RECOMMENDER_SERVING)

    return {
        "raw HMGET (floor)": lambda user: connection.hmget(raw.redis_key(user), fields),
        "raw HGETALL": lambda user: connection.hgetall(raw.redis_key(user)),
        "client.serving_features": client.serving_features,
        "client.user_sequence": client.user_sequence,
        "feast get_online_features": lambda user: store.get_online_features(
            features=service, entity_rows=[{"user_id": user}]
        ).to_dict(),
    }


if __name__ == "__main__":
    main()
