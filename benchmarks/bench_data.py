"""Benchmark of the data stages: ingest -> clean -> store of synthetic events.

Prints events per second, the peak RSS of each phase and the ratio to a plain pyarrow
read + write of the same file (the practical limit), measured in the same run, with
the load average before and after (the machine may be shared). Each phase runs in its
own process, so its peak RSS is its own; memory is flat when the peaks of 1 M and
10 M events are alike.

    .venv/bin/python benchmarks/bench_data.py --events 10000000   # make bench-data
    .venv/bin/python benchmarks/bench_data.py --events 1000000 --keep /tmp/bench
    .venv/bin/python benchmarks/bench_data.py --events 1000000 --scheduler sync
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
PHASES = ("baseline", "ingest", "clean", "store")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _baseline(work: Path, scheduler: str) -> dict[str, float]:
    started = time.perf_counter()
    table = pq.read_table(work / "synth" / "events.parquet")
    pq.write_table(table, work / "baseline.parquet")
    return {"seconds": time.perf_counter() - started, "rows": table.num_rows}


def _ingest(work: Path, scheduler: str) -> dict[str, float]:
    from components.ingest import ingest_sources

    started = time.perf_counter()
    result = ingest_sources(
        "files", work / "raw",
        events_path=str(work / "synth" / "events.parquet"),
        catalog_path=str(work / "synth" / "catalog.parquet"),
    )  # fmt: skip
    return {"seconds": time.perf_counter() - started, "rows": result.rows["events"]}


def _clean(work: Path, scheduler: str) -> dict[str, float]:
    from components.clean import CleanConfig, clean_tables
    from shopml.security import Pseudonymizer

    started = time.perf_counter()
    cleaned = clean_tables(
        work / "raw", work / "curated", work / "quarantine", Pseudonymizer(b"bench"),
        CleanConfig(scheduler=scheduler),
    )  # fmt: skip
    report = cleaned.tables["events"]
    return {
        "seconds": time.perf_counter() - started,
        "rows": report.rows_in,
        "kept": report.rows_kept,
        "quarantined": report.rows_quarantined,
    }


def _store(work: Path, scheduler: str) -> dict[str, float]:
    from components.store import store_tables
    from shopml.assets import AssetStore
    from shopml.storage import LocalStore

    started = time.perf_counter()
    stored = store_tables(
        work / "curated",
        work / "quarantine",
        AssetStore(LocalStore(work / "store")),
        producer="bench",
        inputs=[],
    )
    return {
        "seconds": time.perf_counter() - started,
        "rows": float(stored["events"].rows or 0),
    }


def _run_phase(phase: str, work: Path, scheduler: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--phase", phase, "--work", str(work)]
    command += ["--scheduler", scheduler]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _report(figures: dict[str, dict[str, float]], rows: float) -> None:
    base = figures["baseline"]
    pipe = sum(figures[p]["seconds"] for p in PHASES[1:])
    print(f"events                 {rows:,.0f}")
    print(
        f"pyarrow read+write     {rows / base['seconds']:>12,.0f} events/s  "
        f"({base['seconds']:.1f} s, peak RSS {base['peak_rss_mib']:,.0f} MiB)"
    )
    for phase in PHASES[1:]:
        f = figures[phase]
        print(
            f"  {phase:<20} {rows / f['seconds']:>12,.0f} events/s  "
            f"({f['seconds']:.1f} s, peak RSS {f['peak_rss_mib']:,.0f} MiB)"
        )
    peak = max(figures[p]["peak_rss_mib"] for p in PHASES[1:])
    print(
        f"ingest->clean->store   {rows / pipe:>12,.0f} events/s  "
        f"({pipe:.1f} s; peak RSS {peak:,.0f} MiB)"
    )
    print(f"ratio to pyarrow       {base['seconds'] / pipe:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    parser.add_argument("--phase", choices=PHASES, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--scheduler", choices=["threads", "sync"], default="threads")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    if args.phase is not None:
        run = {"baseline": _baseline, "ingest": _ingest, "clean": _clean}.get(
            args.phase, _store
        )
        measured = run(args.work, args.scheduler)
        print(json.dumps(measured | {"peak_rss_mib": _peak_rss_mib()}))
        return

    from shopml.synth import SynthConfig, write_synthetic

    with tempfile.TemporaryDirectory(prefix="shopml-bench-") as tmp:
        work = args.keep or Path(tmp)
        write_synthetic(work / "synth", SynthConfig(n_events=args.events))
        print(f"load average before    {_load()}")
        figures = {p: _run_phase(p, work, args.scheduler) for p in PHASES}
        print(f"load average after     {_load()}")
    _report(figures, figures["clean"]["rows"])


if __name__ == "__main__":
    main()
