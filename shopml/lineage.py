"""OpenLineage run events for every stage: what a run read, what it wrote, how good it was.

A stage core calls :func:`start_run` with its inputs when it starts (a ``START`` event)
and :meth:`StageRun.complete` with its outputs when it ends (``COMPLETE``), or
:meth:`StageRun.fail` (``FAIL``). Datasets carry the OpenLineage schema facet, output
statistics (rows, bytes), input data-quality metrics (rows, bytes, null counts per
column) and, when a stage measured them, data-quality assertions (one per check of
:mod:`shopml.quality`, with its figure and threshold).

Where events go:

* by default, one JSON line per event appended to ``$SHOPML_HOME/lineage/events.jsonl``
  (openlineage-python's file transport);
* to Marquez (or any OpenLineage HTTP endpoint) when ``SHOPML_OPENLINEAGE_URL`` is set,
  e.g. ``http://marquez:5000``;
* nowhere when ``SHOPML_LINEAGE=0``.

Lineage is optional: a failing emit logs one warning per process and never fails the
stage.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

if TYPE_CHECKING:
    from openlineage.client import OpenLineageClient

    from shopml.assets import AssetVersion

logger = logging.getLogger(__name__)

#: Namespace of shopml jobs (stages) in OpenLineage.
JOB_NAMESPACE = "shopml"
#: Namespace of versioned assets; files use ``file``.
ASSET_NAMESPACE = "shopml-assets"
PRODUCER = "https://github.com/shopml/shopml"
EVENTS_FILE = "events.jsonl"

_state: dict[str, Any] = {"client": None, "key": None, "warned": False}


@dataclass(frozen=True)
class LineageDataset:
    """A dataset as lineage sees it.

    Attributes:
        name: a path or ``zone/name`` of an asset.
        namespace: ``file`` for paths, :data:`ASSET_NAMESPACE` for assets.
        fields: ``(column, type)`` pairs, in order.
        rows: row count, when known.
        bytes: size in bytes, when known.
        null_counts: column -> nulls, when known.
        version: the asset version, when it is one.
    """

    name: str
    namespace: str = "file"
    fields: tuple[tuple[str, str], ...] = ()
    rows: int | None = None
    bytes: int | None = None
    null_counts: dict[str, int] = field(default_factory=dict)
    version: str | None = None


def parquet_dataset(path: Path) -> LineageDataset:
    """Describe a Parquet file from its footer alone (schema, rows, nulls, size)."""
    metadata = pq.read_metadata(path)
    schema = metadata.schema.to_arrow_schema()
    nulls: dict[str, int] = {}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            column = row_group.column(index)
            stats = column.statistics
            if stats is not None and stats.has_null_count:
                name = column.path_in_schema
                nulls[name] = nulls.get(name, 0) + int(stats.null_count)
    return LineageDataset(
        name=str(Path(path).resolve()),
        fields=tuple((f.name, str(f.type)) for f in schema),
        rows=metadata.num_rows,
        bytes=Path(path).stat().st_size,
        null_counts=nulls,
    )


def asset_dataset(asset: AssetVersion) -> LineageDataset:
    """Describe a stored asset version (name ``zone/name``, with its version)."""
    return LineageDataset(
        name=f"{asset.zone}/{asset.name}",
        namespace=ASSET_NAMESPACE,
        fields=tuple((c["name"], c["type"]) for c in asset.schema),
        rows=asset.rows,
        bytes=asset.bytes,
        version=asset.version,
    )


@dataclass
class StageRun:
    """One run of a stage, between its START and its COMPLETE or FAIL event.

    Attributes:
        job: the stage name (``ingest``, ``clean``, ...).
        inputs: what the run reads.
        run_id: the OpenLineage run id (a UUID).
    """

    job: str
    inputs: list[LineageDataset]
    run_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def complete(
        self,
        outputs: list[LineageDataset],
        *,
        quality: dict[str, Any] | None = None,
    ) -> None:
        """Emit COMPLETE with the outputs.

        Args:
            outputs: what the run wrote.
            quality: a :func:`shopml.quality.quality_summary`; its checks become
                data-quality assertions on the input of the same table name.
        """
        _emit(self, "COMPLETE", outputs, quality)

    def fail(self, error: BaseException) -> None:
        """Emit FAIL with the error message as a run facet."""
        _emit(self, "FAIL", [], None, error=error)


def start_run(job: str, inputs: list[LineageDataset]) -> StageRun:
    """Emit START for a stage and return the run to complete or fail later.

    Args:
        job: the stage name.
        inputs: what the run reads.

    Returns:
        The run; emitting never raises.
    """
    run = StageRun(job=job, inputs=list(inputs))
    _emit(run, "START", [], None)
    return run


def lineage_path() -> Path:
    """The file the default transport appends events to."""
    home = Path(os.environ.get("SHOPML_HOME") or ".shopml").expanduser().resolve()
    return home / "lineage" / EVENTS_FILE


def read_events(path: Path | None = None) -> list[dict[str, Any]]:
    """Every event written by the file transport, oldest first (none if no file)."""
    path = path or lineage_path()
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _emit(
    run: StageRun,
    state: str,
    outputs: list[LineageDataset],
    quality: dict[str, Any] | None,
    error: BaseException | None = None,
) -> None:
    if os.environ.get("SHOPML_LINEAGE", "1").strip().lower() in {"0", "false", "off"}:
        return
    try:
        event = _run_event(run, state, outputs, quality, error)
        _client().emit(event)
    except Exception as err:
        if not _state["warned"]:
            _state["warned"] = True
            logger.warning(
                "lineage emit failed (%s: %s); the stage goes on without lineage, "
                "further failures are logged at DEBUG",
                type(err).__name__,
                err,
            )
        else:
            logger.debug("lineage emit failed again: %s", err)


def _client() -> OpenLineageClient:
    """The client for the current settings, built once per transport target."""
    from openlineage.client import OpenLineageClient
    from openlineage.client.transport.file import FileConfig, FileTransport
    from openlineage.client.transport.http import HttpConfig, HttpTransport

    url = os.environ.get("SHOPML_OPENLINEAGE_URL") or ""
    key = url or str(lineage_path())
    if _state["client"] is None or _state["key"] != key:
        if url:
            transport: Any = HttpTransport(HttpConfig(url=url, timeout=2.0))
        else:
            lineage_path().parent.mkdir(parents=True, exist_ok=True)
            transport = FileTransport(
                FileConfig(log_file_path=str(lineage_path()), append=True)
            )
        _state["client"] = OpenLineageClient(transport=transport)
        _state["key"] = key
    client: OpenLineageClient = _state["client"]
    return client


def _run_event(
    run: StageRun,
    state: str,
    outputs: list[LineageDataset],
    quality: dict[str, Any] | None,
    error: BaseException | None,
) -> Any:
    from openlineage.client.event_v2 import Job, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import error_message_run

    run_facets: dict[str, Any] = {}
    if error is not None:
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=str(error), programmingLanguage="python"
        )
    tables = (quality or {}).get("tables", {})
    return RunEvent(
        eventTime=datetime.now(UTC).isoformat(),
        producer=PRODUCER,
        eventType=RunState[state],
        run=Run(runId=run.run_id, facets=run_facets),
        job=Job(namespace=JOB_NAMESPACE, name=run.job),
        inputs=[_input(d, tables.get(_table_of(d))) for d in run.inputs],
        outputs=[_output(d) for d in outputs],
    )


def _table_of(dataset: LineageDataset) -> str:
    return Path(dataset.name).stem if dataset.namespace == "file" else dataset.name


def _dataset_facets(dataset: LineageDataset) -> dict[str, Any]:
    from openlineage.client.facet_v2 import dataset_version_dataset, schema_dataset

    facets: dict[str, Any] = {
        "schema": schema_dataset.SchemaDatasetFacet(
            fields=[
                schema_dataset.SchemaDatasetFacetFields(name=name, type=kind)
                for name, kind in dataset.fields
            ]
        )
    }
    if dataset.version is not None:
        facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
            datasetVersion=dataset.version
        )
    return facets


def _input(dataset: LineageDataset, checks: dict[str, Any] | None) -> Any:
    from openlineage.client.event_v2 import InputDataset
    from openlineage.client.facet_v2 import (
        data_quality_assertions_dataset as assertions,
    )
    from openlineage.client.facet_v2 import data_quality_metrics_input_dataset as dq

    input_facets: dict[str, Any] = {
        "dataQualityMetrics": dq.DataQualityMetricsInputDatasetFacet(
            rowCount=dataset.rows,
            bytes=dataset.bytes,
            columnMetrics={
                name: dq.ColumnMetrics(nullCount=count)
                for name, count in dataset.null_counts.items()
            },
        )
    }
    if checks:
        input_facets["dataQualityAssertions"] = (
            assertions.DataQualityAssertionsDatasetFacet(
                assertions=[
                    assertions.Assertion(
                        assertion=name,
                        success=bool(figures["passed"]),
                        actual=str(figures["share"]),
                        expected=f"<= {figures['threshold']}",
                    )
                    for name, figures in sorted(checks.items())
                    if isinstance(figures, dict)
                ]
            )
        )
    return InputDataset(
        namespace=dataset.namespace,
        name=dataset.name,
        facets=_dataset_facets(dataset),
        inputFacets=input_facets,
    )


def _output(dataset: LineageDataset) -> Any:
    from openlineage.client.event_v2 import OutputDataset
    from openlineage.client.facet_v2 import output_statistics_output_dataset as stats

    return OutputDataset(
        namespace=dataset.namespace,
        name=dataset.name,
        facets=_dataset_facets(dataset),
        outputFacets={
            "outputStatistics": stats.OutputStatisticsOutputDatasetFacet(
                rowCount=dataset.rows, size=dataset.bytes
            )
        },
    )
