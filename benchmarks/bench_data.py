"""Benchmark of the data stages: ingest -> clean -> store of synthetic events.

Prints, per phase, events per second, CPU seconds and peak RSS, and the ratio of the
whole to a plain pyarrow read + write of the same file (the practical limit),
measured in the same run, with the load average before and after (the machine may
be shared: wall-clock figures swell with the load, CPU seconds much less, so the
ratios are reported on both). Each phase runs in its own process, so its peak RSS
is its own; the synthetic data is written in a process of its own too. Memory is
flat when the peaks at 2 M, 10 M and 20 M events are alike.

    .venv/bin/python benchmarks/bench_data.py --events 10000000   # make bench-data
    .venv/bin/python benchmarks/bench_data.py --events 1000000 --keep /tmp/bench
    .venv/bin/python benchmarks/bench_data.py --events 1000000 --scheduler sync
    .venv/bin/python benchmarks/bench_data.py --events 1000000 --rows-per-bucket 500000
    .venv/bin/python benchmarks/bench_data.py --events 10000000 --partition-threads 1
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
PHASES = ("synth", "baseline", "ingest", "clean", "store")
PIPELINE = ("ingest", "clean", "store")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """CPU time of this process (user + system, every thread): the phase's work."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _synth(work: Path, args: argparse.Namespace) -> dict[str, float]:
    from shopml.synth import SynthConfig, write_synthetic

    written = write_synthetic(work / "synth", SynthConfig(n_events=args.events))
    return {"rows": written.rows["events"]}


def _baseline(work: Path, args: argparse.Namespace) -> dict[str, float]:
    table = pq.read_table(work / "synth" / "events.parquet")
    pq.write_table(table, work / "baseline.parquet")
    return {"rows": table.num_rows}


def _ingest(work: Path, args: argparse.Namespace) -> dict[str, float]:
    from components.ingest import ingest_sources

    result = ingest_sources(
        "files", work / "raw",
        events_path=str(work / "synth" / "events.parquet"),
        catalog_path=str(work / "synth" / "catalog.parquet"),
    )  # fmt: skip
    return {"rows": result.rows["events"]}


def _clean(work: Path, args: argparse.Namespace) -> dict[str, float]:
    from components.clean import CleanConfig, clean_tables
    from shopml.security import Pseudonymizer

    config = CleanConfig(
        scheduler=args.scheduler, partition_threads=args.partition_threads
    )
    if args.rows_per_bucket:
        config = replace(config, rows_per_bucket=args.rows_per_bucket)
    cleaned = clean_tables(
        work / "raw", work / "curated", work / "quarantine", Pseudonymizer(b"bench"),
        config,
    )  # fmt: skip
    report = cleaned.tables["events"]
    return {
        "rows": report.rows_in,
        "kept": report.rows_kept,
        "quarantined": report.rows_quarantined,
    }


def _store(work: Path, args: argparse.Namespace) -> dict[str, float]:
    from components.store import store_tables
    from shopml.assets import AssetStore
    from shopml.storage import LocalStore

    stored = store_tables(
        work / "curated",
        work / "quarantine",
        AssetStore(LocalStore(work / "store")),
        producer="bench",
        inputs=[],
    )
    return {"rows": float(stored["events"].rows or 0)}


RUNNERS = {
    "synth": _synth,
    "baseline": _baseline,
    "ingest": _ingest,
    "clean": _clean,
    "store": _store,
}


#: What each phase imports: its stage module (with kfp, pandas, dask) and OpenLineage.
PHASE_MODULES: dict[str, tuple[str, ...]] = {
    "synth": ("shopml.synth",),
    "baseline": (),
    "ingest": ("components.ingest",),
    "clean": ("components.clean", "shopml.security"),
    "store": ("components.store", "shopml.assets", "shopml.storage"),
}
_LINEAGE_MODULES = (
    "openlineage.client.event_v2",
    "openlineage.client.facet_v2",
    "openlineage.client.transport.file",
    "openlineage.client.transport.http",
)


def _import_modules(phase: str) -> float:
    """Import what a phase imports (about 1 s, mostly kfp and pandas); returns seconds.

    A stage's process pays it once, whatever the data's size; the timed figures are
    about the work that grows with the events, and the import time is printed apart.
    """
    started = time.perf_counter()
    for name in (*PHASE_MODULES[phase], *_LINEAGE_MODULES):
        importlib.import_module(name)
    return time.perf_counter() - started


def _measure(phase: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Run one phase here; wall and CPU seconds cover the work, not the imports."""
    imports = _import_modules(phase)
    started, cpu_before = time.perf_counter(), _cpu_seconds()
    measured = RUNNERS[phase](work, args)
    return measured | {
        "seconds": time.perf_counter() - started,
        "cpu": _cpu_seconds() - cpu_before,
        "peak_rss_mib": _peak_rss_mib(),
        "import_seconds": imports,
    }


def _run_phase(phase: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--phase", phase, "--work", str(work)]
    command += ["--events", str(args.events), "--scheduler", args.scheduler]
    command += ["--rows-per-bucket", str(args.rows_per_bucket)]
    command += ["--partition-threads", str(args.partition_threads)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.splitlines()[-1]))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _line(label: str, rows: float, f: dict[str, float]) -> str:
    return (
        f"{label:<22} {rows / f['seconds']:>12,.0f} events/s  "
        f"({f['seconds']:6.1f} s, {f['cpu']:6.1f} CPU s, "
        f"peak RSS {f['peak_rss_mib']:,.0f} MiB)"
    )


def _report(figures: dict[str, dict[str, float]], rows: float) -> None:
    base = figures["baseline"]
    print(f"events                 {rows:,.0f}")
    print(_line("synth (not timed)", rows, figures["synth"]))
    print(_line("pyarrow read+write", rows, base))
    for phase in PIPELINE:
        print(_line(f"  {phase}", rows, figures[phase]))
    whole = {
        "seconds": sum(figures[p]["seconds"] for p in PIPELINE),
        "cpu": sum(figures[p]["cpu"] for p in PIPELINE),
        "peak_rss_mib": max(figures[p]["peak_rss_mib"] for p in PIPELINE),
    }
    print(_line("ingest->clean->store", rows, whole))
    imports = sum(figures[p]["import_seconds"] for p in PIPELINE)
    print(f"imports (not timed)    {imports:.1f} s over the three stage processes")
    print(
        f"ratio to pyarrow       {base['seconds'] / whole['seconds']:.3f} wall, "
        f"{base['cpu'] / whole['cpu']:.3f} CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    parser.add_argument("--phase", choices=PHASES, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--scheduler", choices=["threads", "sync"], default="threads")
    parser.add_argument(
        "--rows-per-bucket", type=int, default=0, help="0: CleanConfig's default"
    )
    parser.add_argument(
        "--partition-threads", type=int, default=2, help="threads cutting buckets"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    if args.phase is not None:
        print(json.dumps(_measure(args.phase, args.work, args)))
        return

    with tempfile.TemporaryDirectory(prefix="shopml-bench-") as tmp:
        work = args.keep or Path(tmp)
        print(f"load average before    {_load()}")
        figures = {p: _run_phase(p, work, args) for p in PHASES}
        print(f"load average after     {_load()}")
    _report(figures, figures["clean"]["rows"])


if __name__ == "__main__":
    main()
