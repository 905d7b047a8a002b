"""Cluster rollouts through the ``kubernetes`` client against a Kubernetes API emulator.

No real API server can be had here: ``kmock``'s ``KubernetesEmulator`` runs on
127.0.0.1 in a thread of its own and stores what the client creates and merge-patches.
The test plays KServe's controller by patching the status. Checked: the exact objects
and patches sent, the deploy -> canary -> rollback -> canary -> promote sequence, that
repeating a step changes nothing, and ``shopml deploy --dry-run``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from components.deploy import (
    ISVC_GROUP,
    ISVC_PLURAL,
    ISVC_VERSION,
    ClusterTarget,
    deploy_kserve,
    deploy_model,
    wait_for_ready,
)
from shopml.canary import KServeTraffic

pytestmark = pytest.mark.integration

STABLE = "s3://shopml/models/recommender/aaaa"
CANARY_1 = "s3://shopml/models/recommender/bbbb"
CANARY_2 = "s3://shopml/models/recommender/cccc"
TARGET = ClusterTarget(canary_percent=10)


@dataclass
class Emulator:
    """The emulator's URL and a handle to stop it."""

    url: str
    handler: Any
    loop: asyncio.AbstractEventLoop
    stop: asyncio.Event

    def requests(self, method: str) -> list[Any]:
        """Requests the emulator received with this HTTP method, in order."""
        return [r for r in list(self.handler) if str(r.method.value) == method]


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    import kmock

    started = threading.Event()
    box: dict[str, Emulator] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        async with (
            kmock.KubernetesEmulator() as handler,
            kmock.Server(handler, host="127.0.0.1") as server,
        ):
            handler.resources[f"{ISVC_GROUP}/{ISVC_VERSION}/{ISVC_PLURAL}"] = {
                "kind": "InferenceService",
                "namespaced": True,
                "subresources": ["status"],
            }
            url = str(server.url).rstrip("/")
            box["emulator"] = Emulator(url, handler, asyncio.get_running_loop(), stop)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert started.wait(15), "the Kubernetes emulator did not start"
    emulator = box["emulator"]
    try:
        yield emulator
    finally:
        emulator.loop.call_soon_threadsafe(emulator.stop.set)
        thread.join(timeout=10)


@pytest.fixture
def api(emulator: Emulator) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(
        client.ApiClient(client.Configuration(host=emulator.url))
    )


def live(api: Any) -> dict[str, Any]:
    return dict(
        api.get_namespaced_custom_object(
            ISVC_GROUP, ISVC_VERSION, "shopml", ISVC_PLURAL, "recommender"
        )
    )


def controller_marks_ready(api: Any, revision: str) -> None:
    """What KServe's controller would write once the revision serves."""
    api.patch_namespaced_custom_object_status(
        ISVC_GROUP,
        ISVC_VERSION,
        "shopml",
        ISVC_PLURAL,
        "recommender",
        {
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "components": {"predictor": {"latestReadyRevision": revision}},
            }
        },
    )


def annotations(stable: str, canary: str, decision: str) -> dict[str, str]:
    return {
        "shopml.io/stable-storage-uri": stable,
        "shopml.io/canary-storage-uri": canary,
        "shopml.io/rollout-decision": decision,
    }


MODEL_FORMAT = {"name": "shopml-sasrec", "version": "1"}


def test_first_deploy_creates_the_exact_inference_service(
    api: Any, emulator: Emulator
) -> None:
    plan = deploy_kserve(STABLE, TARGET, api=api)
    controller_marks_ready(api, "recommender-predictor-00001")
    ready = wait_for_ready(api, TARGET, timeout_s=10)

    expected = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": "recommender",
            "namespace": "shopml",
            "annotations": annotations(STABLE, "", "initial"),
        },
        "spec": {
            "predictor": {
                "serviceAccountName": "shopml-predictor",
                "model": {
                    "name": "kserve-container",
                    "runtime": "shopml",
                    "modelFormat": MODEL_FORMAT,
                    "storageUri": STABLE,
                },
            }
        },
    }
    assert plan.action == "create"
    assert plan.body == expected
    [created] = emulator.requests("POST")
    assert created.data == expected
    assert ready["spec"] == expected["spec"]
    assert "canaryTrafficPercent" not in ready["spec"]["predictor"]


def test_canary_rollback_canary_promote_leaves_traffic_where_decided(
    api: Any, emulator: Emulator
) -> None:
    traffic = KServeTraffic(api, TARGET)
    deploy_kserve(STABLE, TARGET, api=api)

    # A new version goes out as a 10 % canary; the stable one keeps the rest.
    canary = deploy_kserve(CANARY_1, TARGET, api=api)
    assert canary.body == {
        "metadata": {"annotations": annotations(STABLE, CANARY_1, "canary")},
        "spec": {
            "predictor": {
                "canaryTrafficPercent": 10,
                "model": {
                    "name": "kserve-container",
                    "runtime": "shopml",
                    "modelFormat": MODEL_FORMAT,
                    "storageUri": CANARY_1,
                },
            }
        },
    }
    assert traffic.canary_percent() == 10

    # Rolled back: 0 % to the canary, the stable version recorded as pinned.
    assert traffic.apply("rollback") is True
    assert traffic.apply("rollback") is False  # repeated: nothing sent
    after_rollback = live(api)
    assert after_rollback["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert after_rollback["metadata"]["annotations"] == annotations(
        STABLE, CANARY_1, "rolled-back"
    )

    # The next canary starts from the same stable version, then wins.
    deploy_kserve(CANARY_2, TARGET, api=api)
    assert traffic.canary_percent() == 10
    assert traffic.apply("promote") is True
    assert traffic.apply("promote") is False
    final = live(api)

    patches = [request.data for request in emulator.requests("PATCH")]
    assert patches[1] == {
        "metadata": {"annotations": annotations(STABLE, CANARY_1, "rolled-back")},
        "spec": {"predictor": {"canaryTrafficPercent": 0}},
    }
    assert patches[3] == {
        "metadata": {"annotations": annotations(CANARY_2, "", "promoted")},
        "spec": {"predictor": {"canaryTrafficPercent": 100}},
    }
    assert len(patches) == 4  # canary, rollback, canary, promote: no repeats
    assert final["spec"]["predictor"]["canaryTrafficPercent"] == 100
    assert final["spec"]["predictor"]["model"]["storageUri"] == CANARY_2
    assert final["metadata"]["annotations"] == annotations(CANARY_2, "", "promoted")


def test_redeploying_the_live_version_changes_nothing(
    api: Any, emulator: Emulator
) -> None:
    deploy_kserve(STABLE, TARGET, api=api)
    deploy_kserve(CANARY_1, TARGET, api=api)

    again = deploy_kserve(CANARY_1, TARGET, api=api)
    stable_again = deploy_kserve(STABLE, TARGET, api=api)

    assert again.action == "unchanged"
    assert stable_again.action == "unchanged"
    assert len(emulator.requests("PATCH")) == 1


def test_deploy_model_kserve_target_returns_the_cluster_endpoint(
    api: Any, tmp_path: Path
) -> None:
    endpoint = deploy_model(
        tmp_path, target="kserve", storage_uri=STABLE, cluster=TARGET, api=api
    )

    assert endpoint == (
        "http://recommender-predictor.shopml.svc.cluster.local/v1/models/recommender"
    )
    assert live(api)["spec"]["predictor"]["model"]["storageUri"] == STABLE


def test_shopml_deploy_dry_run_prints_the_patch_and_sends_nothing(
    api: Any,
    emulator: Emulator,
    tmp_path: Path,
) -> None:
    import json

    import typer

    from shopml.cli_serving import deploy

    deploy_kserve(STABLE, TARGET, api=api)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": emulator.url}}],
                "users": [{"name": "emu", "user": {}}],
                "contexts": [
                    {"name": "emu", "context": {"cluster": "emu", "user": "emu"}}
                ],
                "current-context": "emu",
            }
        )
    )
    app = typer.Typer()
    app.command()(deploy)

    result = CliRunner().invoke(
        app,
        [
            "--storage-uri", CANARY_1, "--canary-percent", "25", "--dry-run",
            "--kubeconfig", str(kubeconfig),
        ],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "# would patch inferenceservice shopml/recommender" in result.output
    printed = json.loads(result.output.split("\n", 1)[1])
    assert printed["body"]["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert printed["stable"] == STABLE
    assert emulator.requests("PATCH") == []
    assert live(api)["spec"]["predictor"]["model"]["storageUri"] == STABLE
