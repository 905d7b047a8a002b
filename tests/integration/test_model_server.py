"""The recommender behind a real KServe ModelServer on 127.0.0.1, over HTTP.

One server without a feature store is shared by the module (it takes a few seconds to
start); the user path runs its own server on a Feast SQLite online store materialized by
the features stage, and the monitor stage probes it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from components.deploy import (
    DeploymentError,
    LocalDeployment,
    deploy,
    deploy_local,
    deploy_model,
    stop_local,
)
from components.monitor import (
    MonitorCheckError,
    monitor,
    probe_endpoint,
    render_report,
    run_monitor,
    split_endpoint,
)
from tests.unit.test_recommender import item_id, write_tiny_artifact

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_artifact(tmp_path_factory.mktemp("artifact") / "model")


@pytest.fixture(scope="module")
def served(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalDeployment]:
    """A server without feature store, in a SHOPML_HOME of its own."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("SHOPML_")]:
            patch.delenv(name)
        patch.setenv("SHOPML_HOME", str(tmp_path_factory.mktemp("server-home")))
        deployment = deploy_local(
            model_dir, use_feature_store=False, timeout_s=START_TIMEOUT_S
        )
    try:
        yield deployment
    finally:
        stop_local(deployment)


def listening_addresses(pid: int) -> set[str]:
    """``ip:port`` of every TCP socket the process listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                host_hex, port_hex = local.split(":")
                host = (
                    socket.inet_ntoa(bytes.fromhex(host_hex)[::-1])
                    if len(host_hex) == 8
                    else host_hex
                )
                addresses.add(f"{host}:{int(port_hex, 16)}")
    return addresses


def v2_items_body(history: list[str], k: int) -> dict[str, Any]:
    return {
        "id": "it-1",
        "inputs": [
            {
                "name": "item_ids",
                "shape": [len(history)],
                "datatype": "BYTES",
                "data": history,
            },
            {"name": "k", "shape": [1], "datatype": "INT32", "data": [k]},
        ],
    }


# --- serving over HTTP --------------------------------------------------------------


def test_server_listens_on_loopback_only_and_opens_no_grpc(
    served: LocalDeployment,
) -> None:
    assert listening_addresses(served.pid) == {f"127.0.0.1:{served.port}"}


def test_server_record_names_pid_and_endpoint(served: LocalDeployment) -> None:
    record = json.loads(
        (served.log_path.parents[1] / "runs" / "server.json").read_text()
    )

    assert record["pid"] == served.pid
    assert record["endpoint"] == f"http://127.0.0.1:{served.port}/v1/models/recommender"
    assert httpx.get(record["endpoint"]).json() == {
        "name": "recommender",
        "ready": True,
    }


def test_v1_and_v2_over_http_agree_and_exclude_the_history(
    served: LocalDeployment,
) -> None:
    history = [item_id(1), item_id(2), "unknown-item"]

    v1 = httpx.post(
        f"{served.endpoint}:predict",
        json={"instances": [{"item_ids": history, "k": 5}]},
    )
    v2 = httpx.post(
        f"{served.url}/v2/models/recommender/infer", json=v2_items_body(history, 5)
    )

    assert v1.status_code == 200, v1.text
    assert v2.status_code == 200, v2.text
    [prediction] = v1.json()["predictions"]
    outputs = {output["name"]: output for output in v2.json()["outputs"]}
    assert v2.json()["id"] == "it-1"
    assert len(prediction["item_ids"]) == 5
    assert not set(prediction["item_ids"]) & set(history)
    assert outputs["item_ids"]["shape"] == [1, 5]
    assert outputs["item_ids"]["data"] == prediction["item_ids"]
    assert outputs["titles"]["data"] == prediction["titles"]
    assert prediction["unknown_item_ids"] == ["unknown-item"]
    assert outputs["unknown_item_ids"]["data"] == ["unknown-item"]


@pytest.mark.parametrize(
    ("route", "content", "headers", "expected"),
    [
        pytest.param(
            "v1",
            json.dumps({"rows": []}),
            {"content-type": "application/json"},
            "'instances' is missing",
            id="v1-no-instances",
        ),
        pytest.param(
            "v1",
            json.dumps(v2_items_body(["101"], 3)),
            {"content-type": "application/json"},
            "this is a v2 body",
            id="v2-body-on-v1-route",
        ),
        pytest.param(
            "v1",
            json.dumps({"instances": [{"item_ids": ["101"], "k": 0}]}),
            {"content-type": "application/json"},
            "instances[0].k=0 must be between 1 and 100",
            id="v1-k-zero",
        ),
        pytest.param(
            "v1",
            json.dumps({"instances": [{"item_ids": ["101"]}]}),
            {"content-type": "text/plain"},
            "content-type 'text/plain'",
            id="v1-not-json",
        ),
        pytest.param(
            "v1",
            "{not json",
            {"content-type": "application/json"},
            "Unrecognized",
            id="v1-bad-json",
        ),
        pytest.param(
            "v2",
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "user_id",
                            "shape": [1],
                            "datatype": "BYTES",
                            "data": ["1"],
                        },
                        {
                            "name": "item_ids",
                            "shape": [1],
                            "datatype": "BYTES",
                            "data": ["2"],
                        },
                    ]
                }
            ),
            {"content-type": "application/json"},
            "exactly one of the inputs user_id or item_ids",
            id="v2-both-inputs",
        ),
        pytest.param(
            "v2",
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "item_ids",
                            "shape": [2, 2],
                            "datatype": "BYTES",
                            "data": ["1"],
                        }
                    ]
                }
            ),
            {"content-type": "application/json"},
            "does not fit its shape [2, 2]",
            id="v2-bad-shape",
        ),
    ],
)
def test_malformed_requests_get_400_naming_the_field(
    served: LocalDeployment,
    route: str,
    content: str,
    headers: dict[str, str],
    expected: str,
) -> None:
    url = (
        f"{served.endpoint}:predict"
        if route == "v1"
        else f"{served.url}/v2/models/recommender/infer"
    )

    response = httpx.post(url, content=content, headers=headers)

    assert response.status_code == 400
    assert expected in response.json()["error"]


def test_client_mistakes_are_logged_in_one_line_without_what_the_client_sent(
    served: LocalDeployment,
) -> None:
    secret = "Leak.Canary+srv@Example.COM"
    bad_v2 = {
        "inputs": [{"name": "user_id", "datatype": secret, "shape": [1], "data": ["x"]}]
    }
    before = served.log_path.read_text()

    responses = [
        httpx.post(f"{served.url}/v2/models/recommender/infer", json=bad_v2),
        httpx.post(f"{served.url}/v1/models/{secret}:predict", json={"instances": []}),
        httpx.post(f"{served.endpoint}:predict", json={"instances": [{secret: 1}]}),
    ]

    assert [r.status_code for r in responses] == [400, 404, 400]
    assert secret.lower() not in responses[0].text.lower()
    assert "<not a v2 datatype>" in responses[0].json()["error"]
    assert secret.lower() not in responses[2].text.lower()
    deadline = time.monotonic() + 5
    while (
        served.log_path.read_text().count("rejected request")
        < len(before.split("rejected request")) + 2
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    new_lines = served.log_path.read_text()[len(before) :]
    assert secret.lower() not in new_lines.lower()
    assert "Traceback" not in new_lines
    assert new_lines.count("rejected request: InvalidInput (400)") == 2
    assert new_lines.count("rejected request: ModelNotFound (404)") == 1


def test_user_rows_on_a_server_without_feature_store_fail_the_monitor(
    served: LocalDeployment,
) -> None:
    result = probe_endpoint(served.url, "recommender", ["196", "186"], None, k=5)

    assert result.error_rate == 1.0
    assert all(call.status_code == 500 for call in result.calls)
    assert "without a feature store" in (result.calls[0].error or "")
    with pytest.raises(MonitorCheckError, match=r"error_rate=1\.000"):
        result.raise_for_failures()


# --- readiness and deploy targets ---------------------------------------------------


def test_missing_model_dir_never_becomes_ready(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError) as raised:
        deploy_local(
            tmp_path / "absent", use_feature_store=False, timeout_s=START_TIMEOUT_S
        )

    message = str(raised.value)
    assert "exited with status 1 before it was ready" in message
    assert "manifest.json is missing" in message
    assert not (tmp_path / "home" / "runs" / "server.json").exists()


def test_stop_local_leaves_a_pid_that_is_not_a_model_server_alone() -> None:
    # A stale server.json may name a pid the system has since given to another process.
    other = subprocess.Popen(["sleep", "30"])
    try:
        stop_local(other.pid)
        assert other.poll() is None
    finally:
        other.terminate()
        other.wait(timeout=10)


def test_cluster_target_needs_a_storage_uri_and_unknown_targets_are_rejected(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="target='kserve' needs storage_uri"):
        deploy_model(tmp_path, target="kserve")
    with pytest.raises(ValueError, match="target='k8s' is not a deploy target"):
        deploy_model(tmp_path, target="k8s")


def test_cluster_model_location_comes_from_the_model_asset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from components.deploy import _asset_storage_uri

    with pytest.raises(ValueError, match="set SHOPML_S3_ENDPOINT"):
        _asset_storage_uri("recommender@abc123")
    monkeypatch.setenv("SHOPML_S3_ENDPOINT", "127.0.0.1:9")
    monkeypatch.setenv("SHOPML_S3_ACCESS_KEY", "a")
    monkeypatch.setenv("SHOPML_S3_SECRET_KEY", "b")
    monkeypatch.setenv("SHOPML_S3_BUCKET", "assets")
    assert (
        _asset_storage_uri("recommender@abc123")
        == "s3://assets/models/recommender/abc123"
    )


def test_split_endpoint_rejects_a_url_without_model_path() -> None:
    assert split_endpoint("http://127.0.0.1:9/v1/models/rec") == (
        "http://127.0.0.1:9",
        "rec",
    )
    with pytest.raises(ValueError, match="is not a v1 model URL"):
        split_endpoint("http://127.0.0.1:9/")


def test_components_declare_their_artifacts() -> None:
    deploy_inputs = deploy.component_spec.inputs
    monitor_spec = monitor.component_spec

    assert set(deploy_inputs) == {
        "model",
        "features",
        "target",
        "port",
        "storage_uri",
        "canary_percent",
        "search",
    }
    assert deploy.component_spec.outputs["Output"].type == "String"
    assert set(monitor_spec.inputs) == {"endpoint", "raw", "curated", "n_users"}
    assert set(monitor_spec.outputs) == {"metrics", "report"}


# --- the user path on a Feast online store ------------------------------------------

RAW_USERS = ["196", "186", "22"]
T0 = datetime(1997, 12, 1, tzinfo=UTC)


def write_user_tables(root: Path, pseudonymize: Any) -> tuple[Path, Path]:
    """Raw and curated events for three users; '22' has no curated events at all."""
    histories = {"196": [1, 2, 3, 4], "186": [10, 11]}
    rows = [
        (user, item_id(index), "rate", T0 + timedelta(hours=position), 4.0)
        for user, items in histories.items()
        for position, index in enumerate(items)
    ]
    columns = ["user_id", "item_id", "event_type", "timestamp", "value"]
    raw = pd.DataFrame([*rows, ("22", item_id(5), "rate", T0, 3.0)], columns=columns)
    curated = pd.DataFrame(rows, columns=columns)
    curated["user_id"] = curated["user_id"].map(pseudonymize)
    catalog = pd.DataFrame(
        {
            "item_id": [item_id(i) for i in range(1, 31)],
            "title": [f"Title {i}" for i in range(1, 31)],
        }
    )

    raw_dir, curated_dir = root / "raw", root / "curated"
    raw_dir.mkdir(parents=True)
    curated_dir.mkdir(parents=True)
    raw.to_parquet(raw_dir / "events.parquet", index=False)
    curated.to_parquet(curated_dir / "events.parquet", index=False)
    catalog.to_parquet(curated_dir / "catalog.parquet", index=False)
    return raw_dir, curated_dir


def test_user_path_on_feast_sqlite_store_and_monitor(
    model_dir: Path, tmp_path: Path
) -> None:
    from components.features import build_features
    from shopml.config import load_settings
    from shopml.security import load_pseudonymizer

    settings = load_settings()
    pseudonymizer = load_pseudonymizer(settings)
    raw_dir, curated_dir = write_user_tables(
        tmp_path / "data", pseudonymizer.pseudonymize
    )
    # The online sequence keeps only the last 2 of user 196's 4 items: the 2 older
    # ones must still never be recommended (they come from the seen-items feature).
    build_features(curated_dir, settings, max_seq_len=2)
    deployment = deploy_local(model_dir, timeout_s=START_TIMEOUT_S)
    try:
        response = httpx.post(
            f"{deployment.endpoint}:predict",
            json={
                "instances": [
                    {"user_id": "196", "k": 26},
                    {"user_id": "nobody", "k": 3},
                ]
            },
            timeout=30,
        )
        result = run_monitor(
            deployment.endpoint, raw_dir, curated_dir, pseudonymizer, n_users=3
        )
    finally:
        # Stopped by the pid in server.json, as `shopml run` does from another process.
        record = json.loads((settings.home / "runs" / "server.json").read_text())
        stop_local(record["pid"])
        assert deployment.process is not None
        deployment.process.poll()  # the handle learns its child is gone (no warning)

    assert response.status_code == 200, response.text
    known, unknown = response.json()["predictions"]
    # 30 items, 4 seen: the 26 left are exactly the unseen ones.
    assert sorted(known["item_ids"]) == [item_id(i) for i in range(5, 31)]
    assert unknown["item_ids"] == [item_id(30), item_id(29), item_id(28)]
    assert result.error_rate == 0.0
    assert result.sanity_failures == []
    assert len(result.calls) == 6
    assert result.metrics()["latency_p99_ms"] > 0
    assert "data:image/png;base64," in render_report(result, deployment.endpoint)
    with pytest.raises(ProcessLookupError):
        os.kill(record["pid"], 0)
