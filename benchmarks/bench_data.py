"""Benchmark of the data stages: ingest -> clean -> store of synthetic events.

Prints events per second, peak RSS of each phase and the ratio to a plain pyarrow
read + write of the same file (the practical limit), measured in the same run. Each
phase runs in its own process so peak RSS is its own.

    .venv/bin/python benchmarks/bench_data.py --events 10000000   # make bench-data
    .venv/bin/python benchmarks/bench_data.py --events 1000000 --keep /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _baseline(work: Path) -> dict[str, float]:
    started = time.perf_counter()
    table = pq.read_table(work / "synth" / "events.parquet")
    pq.write_table(table, work / "baseline.parquet")
    return {"seconds": time.perf_counter() - started, "rows": table.num_rows}


def _pipeline(work: Path) -> dict[str, float]:
    from components.clean import clean_tables
    from components.ingest import ingest_sources
    from components.store import store_tables
    from shopml.assets import AssetStore
    from shopml.security import Pseudonymizer
    from shopml.storage import LocalStore

    synth, times = work / "synth", {}
    started = time.perf_counter()
    ingest_sources(
        "files", work / "raw",
        events_path=str(synth / "events.parquet"),
        catalog_path=str(synth / "catalog.parquet"),
    )  # fmt: skip
    times["ingest"] = time.perf_counter() - started
    cleaned = clean_tables(
        work / "raw", work / "curated", work / "quarantine", Pseudonymizer(b"bench")
    )
    times["clean"] = time.perf_counter() - started - times["ingest"]
    assets = AssetStore(LocalStore(work / "store"))
    store_tables(
        work / "curated", work / "quarantine", assets, producer="bench", inputs=[]
    )
    times["seconds"] = time.perf_counter() - started
    times["store"] = times["seconds"] - times["ingest"] - times["clean"]
    times["rows"] = cleaned.tables["events"].rows_in
    return times


def _run_phase(phase: str, work: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--phase", phase, "--work", str(work)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    parser.add_argument("--phase", choices=["baseline", "pipeline"], default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    if args.phase is not None:
        sys.path.insert(0, str(REPO))
        figures = (
            _baseline(args.work) if args.phase == "baseline" else _pipeline(args.work)
        )
        print(json.dumps(figures | {"peak_rss_mib": _peak_rss_mib()}))
        return

    sys.path.insert(0, str(REPO))
    from shopml.synth import SynthConfig, write_synthetic

    with tempfile.TemporaryDirectory(prefix="shopml-bench-") as tmp:
        work = args.keep or Path(tmp)
        write_synthetic(work / "synth", SynthConfig(n_events=args.events))
        base = _run_phase("baseline", work)
        pipe = _run_phase("pipeline", work)

    rows = pipe["rows"]
    print(f"events                 {rows:,.0f}")
    print(
        f"pyarrow read+write     {rows / base['seconds']:>12,.0f} events/s  "
        f"({base['seconds']:.1f} s, peak RSS {base['peak_rss_mib']:,.0f} MiB)"
    )
    print(
        f"ingest->clean->store   {rows / pipe['seconds']:>12,.0f} events/s  "
        f"({pipe['seconds']:.1f} s = ingest {pipe['ingest']:.1f} + clean "
        f"{pipe['clean']:.1f} + store {pipe['store']:.1f}; peak RSS "
        f"{pipe['peak_rss_mib']:,.0f} MiB)"
    )
    print(f"ratio to pyarrow       {base['seconds'] / pipe['seconds']:.3f}")


if __name__ == "__main__":
    main()
