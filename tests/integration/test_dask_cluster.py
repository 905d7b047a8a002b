"""The clean stage on a real Dask cluster (LocalCluster on 127.0.0.1) through
``SHOPML_DASK_ADDRESS``: the same graph, the same files as the in-process run."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components.clean import CleanConfig, clean_tables
from components.ingest import ingest_sources
from shopml.config import load_settings
from shopml.security import Pseudonymizer
from shopml.synth import SynthConfig, write_synthetic

pytestmark = pytest.mark.integration

distributed = pytest.importorskip("distributed")

NOW = datetime(2025, 1, 1, tzinfo=UTC)
PSEUDO = Pseudonymizer(b"cluster-key")


@pytest.fixture
def dask_scheduler() -> Iterator[str]:
    """A scheduler and one two-thread worker in this process, on loopback TCP."""
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        yield str(cluster.scheduler_address)


def test_cluster_run_writes_the_files_of_the_in_process_run(
    tmp_path: Path, dask_scheduler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = {"duplicate": 0.02, "near_duplicate": 0.02, "bot_user": 0.01}
    files = write_synthetic(
        tmp_path / "synth", SynthConfig(n_events=8_000, faults=faults)
    )
    ingest_sources(
        "files",
        tmp_path / "raw",
        events_path=str(files.events),
        catalog_path=str(files.catalog),
    )
    config = CleanConfig(now=NOW, rows_per_bucket=2_000)
    local = clean_tables(
        tmp_path / "raw", tmp_path / "l" / "c", tmp_path / "l" / "q", PSEUDO, config
    )

    monkeypatch.setenv("SHOPML_DASK_ADDRESS", dask_scheduler)
    address = load_settings().dask_address
    assert address is not None and address.startswith("tcp://127.0.0.1:")
    remote = clean_tables(
        tmp_path / "raw", tmp_path / "r" / "c", tmp_path / "r" / "q", PSEUDO, config,
        dask_address=address, work_dir=tmp_path / "work",
    )  # fmt: skip

    assert remote.tables == local.tables
    assert local.tables["events"].reasons["bot_user"] > 0
    for kind in ("events", "catalog"):
        for folder in ("c", "q"):
            first = (tmp_path / "l" / folder / f"{kind}.parquet").read_bytes()
            second = (tmp_path / "r" / folder / f"{kind}.parquet").read_bytes()
            assert first == second, f"{folder}/{kind} differs"
    assert not (tmp_path / "work" / "events").exists()  # buckets are removed
    assert pq.read_metadata(tmp_path / "r" / "c" / "events.parquet").num_rows == (
        local.tables["events"].rows_kept
    )
