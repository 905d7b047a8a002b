"""The lifecycle pipeline: compiled for Kubeflow, and run whole through kfp.local."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import yaml
from google.protobuf import json_format
from kfp import compiler
from kfp.pipeline_spec import pipeline_spec_pb2

from components.deploy import stop_local
from pipelines.lifecycle import lifecycle_pipeline
from shopml.assets import asset_store_from_settings
from shopml.config import load_settings
from shopml.datasets import load_amazon_scientific
from shopml.runner import run_local_pipeline

pytestmark = pytest.mark.integration

STAGES = (
    "ingest",
    "clean",
    "store",
    "features",
    "train",
    "evaluate",
    "search-index",
    "search-eval",
    "deploy",
    "monitor",
)


def _compile(tmp_path: Path) -> tuple[pipeline_spec_pb2.PipelineSpec, dict[str, Any]]:
    path = tmp_path / "lifecycle.yaml"
    compiler.Compiler().compile(lifecycle_pipeline, str(path))
    pipeline_doc, platform_doc = yaml.safe_load_all(path.read_text())
    spec = pipeline_spec_pb2.PipelineSpec()
    json_format.ParseDict(pipeline_doc, spec)
    return spec, platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_compiled_pipeline_loads_back_and_names_every_stage(tmp_path: Path) -> None:
    spec, _ = _compile(tmp_path)
    tasks = set(spec.root.dag.tasks)
    assert tasks == set(STAGES)
    assert spec.pipeline_info.name == "shopml-lifecycle"
    parameters = spec.root.input_definitions.parameters
    assert parameters["source"].default_value.string_value == "movielens-100k"
    assert set(spec.root.output_definitions.parameters) == {"endpoint", "evaluation"}
    assert all(p.description for p in parameters.values()), (
        "every parameter is described"
    )


def test_compiled_pipeline_asks_for_a_gpu_and_retries(tmp_path: Path) -> None:
    spec, _ = _compile(tmp_path)
    executors = spec.deployment_spec["executors"]
    train = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert train["resourceType"] == "nvidia.com/gpu"
    assert "gpus" in train["resourceCount"]  # the CPU fallback: gpus=0

    tasks = spec.root.dag.tasks
    retried = {
        name for name, task in tasks.items() if task.retry_policy.max_retry_count
    }
    assert retried == {"ingest", "store", "features", "deploy"}
    uncached = {name for name, t in tasks.items() if not t.caching_options.enable_cache}
    assert uncached == {"ingest", "deploy", "monitor"}


def test_every_task_gets_settings_secrets_and_scratch(tmp_path: Path) -> None:
    _, executors = _compile(tmp_path)
    assert set(executors) == {f"exec-{stage}" for stage in STAGES}
    for name, config in executors.items():
        secret_envs = {
            e["envVar"] for s in config["secretAsEnv"] for e in s["keyToEnv"]
        }
        assert "SHOPML_S3_SECRET_KEY" in secret_envs, name
        assert config["configMapAsEnv"][0]["configMapName"] == "shopml-settings", name
        assert config["emptyDirMounts"][0]["mountPath"] == "/tmp/shopml", name
    assert executors["exec-train"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # The clean pod writes its user buckets where Dask workers can read them.
    (claim,) = executors["exec-clean"]["pvcMount"]
    assert claim["constant"] == "shopml-work"
    assert claim["mountPath"] == "/mnt/shopml-work"


def test_lifecycle_runs_every_stage_on_a_real_slice(
    shared_data: Path, tmp_path: Path
) -> None:
    events, catalog = load_amazon_scientific(
        shared_data / "amazon-scientific-2018-5core", max_users=300
    )
    events_csv, catalog_csv = tmp_path / "events.csv", tmp_path / "catalog.csv"
    events.to_csv(events_csv, index=False)
    catalog.to_csv(catalog_csv, index=False)

    settings = load_settings()
    run = run_local_pipeline(
        settings,
        {
            "source": "files",
            "events_uri": str(events_csv),
            "catalog_uri": str(catalog_csv),
            "epochs": 5,
            # Five epochs on 300 users cannot beat ItemKNN; the gate's bar is tested in
            # test_evaluation. Here the gate only has to see a model that ranks at all.
            "min_lift": -1.0,
            "monitor_users": 5,
        },
    )
    try:
        # Every stage left real output behind.
        # Raw and quarantined rows stay in the restricted raw zone: the task outputs
        # of ingest and clean are refs, never rows.
        for task, name in (("ingest", "raw"), ("clean", "quarantine")):
            folder = run.output(task, name)
            assert [p.name for p in folder.iterdir()] == ["versions.json"], folder
        raw_refs = json.loads(
            (run.output("ingest", "raw") / "versions.json").read_text()
        )
        assets = asset_store_from_settings(settings)
        raw = assets.read_table(*raw_refs["events"].split("@"))
        assert raw.num_rows == len(events)
        assert assets.get("raw_events").zone == "raw"
        assert assets.get("quarantine_events").zone == "raw"
        curated = pq.read_table(run.output("store", "stored") / "events.parquet")
        assert 0 < curated.num_rows <= raw.num_rows
        assert all(u.startswith("u_") for u in curated.column("user_id").to_pylist())
        versions = json.loads(
            (run.output("store", "stored") / "versions.json").read_text()
        )
        assert {"events", "catalog"} <= set(versions)
        assert any(run.output("features", "features").iterdir())
        assert (run.output("train", "model") / "manifest.json").is_file()
        assert set(run.evaluation["models"]) >= {"sasrec", "popularity"}
        assert run.output("evaluate", "report").stat().st_size > 1000
        assert run.output("monitor", "report").stat().st_size > 1000
        assert (run.output("search-index", "index") / "manifest.json").is_file()
        assert any(run.output("search-eval", "queries").iterdir())

        # The deployed endpoint answers with k items for a real user.
        user = raw.column("user_id")[0].as_py()
        response = httpx.post(
            f"{run.endpoint}:predict", json={"instances": [{"user_id": user, "k": 5}]}
        )
        assert response.status_code == 200
        assert len(response.json()["predictions"][0]["item_ids"]) == 5
    finally:
        info = json.loads((settings.home / "runs" / "server.json").read_text())
        stop_local(int(info["pid"]))
