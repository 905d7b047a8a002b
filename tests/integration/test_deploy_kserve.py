"""Cluster rollouts through the ``kubernetes`` client against a Kubernetes API emulator.

No real API server can be had here: ``kmock``'s ``KubernetesEmulator`` runs on
127.0.0.1 in a thread of its own and stores what the client creates and merge-patches.
The test plays KServe's controller by patching the status. Checked: the exact objects
and patches sent, the deploy -> canary -> rollback -> canary -> promote sequence, that
repeating a step changes nothing, and ``shopml deploy --dry-run`` (the patch it prints,
and an error naming the server when the API server fails). The ``search``
InferenceService is rolled out from a search bundle published in a real S3 server
(moto, 127.0.0.1): the exact object, the bundle's files, the audit log and the live
pointers are checked, a re-run publishes and patches nothing, and old bundles are
pruned while the ones the InferenceService serves are kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from components.deploy import (
    ISVC_GROUP,
    ISVC_PLURAL,
    ISVC_VERSION,
    ClusterTarget,
    bundle_version,
    deploy_kserve,
    deploy_model,
    search_target,
    wait_for_ready,
)
from shopml.assets import AssetStore, AssetVersion, asset_store_from_settings
from shopml.canary import KServeTraffic
from shopml.config import load_settings
from tests.services import KubeEmulator, S3Server, run_kube_emulator

pytestmark = pytest.mark.integration

STABLE = "s3://shopml/models/recommender/aaaa"
CANARY_1 = "s3://shopml/models/recommender/bbbb"
CANARY_2 = "s3://shopml/models/recommender/cccc"
# Serverless, where KServe runs canaries (the base manifests say RawDeployment).
TARGET = ClusterTarget(canary_percent=10, deployment_mode="Serverless")


@pytest.fixture
def emulator() -> Iterator[KubeEmulator]:
    import kmock

    info = kmock.ResourceInfo(
        kind="InferenceService", namespaced=True, subresources={"status"}
    )
    with run_kube_emulator({f"{ISVC_GROUP}/{ISVC_VERSION}/{ISVC_PLURAL}": info}) as emu:
        yield emu


@pytest.fixture
def api(emulator: KubeEmulator) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(
        client.ApiClient(client.Configuration(host=emulator.url))
    )


def live(api: Any, name: str = "recommender") -> dict[str, Any]:
    return dict(
        api.get_namespaced_custom_object(
            ISVC_GROUP, ISVC_VERSION, "shopml", ISVC_PLURAL, name
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


def rollout_annotations(stable: str, canary: str, decision: str) -> dict[str, str]:
    return {
        "shopml.io/stable-storage-uri": stable,
        "shopml.io/canary-storage-uri": canary,
        "shopml.io/rollout-decision": decision,
    }


MODEL_FORMAT = {"name": "shopml-sasrec", "version": "1"}
# manifests/base/serving/inferenceservice.*.yaml: what every created predictor has.
PREDICTOR_FIELDS = {
    "minReplicas": 1,
    "maxReplicas": 1,
    "securityContext": {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
}
SERVERLESS = {"serving.kserve.io/deploymentMode": "Serverless"}
# manifests/base/serving/inferenceservice.*.yaml
RESOURCES = {
    "requests": {"cpu": "500m", "memory": "1Gi"},
    "limits": {"cpu": "2", "memory": "2Gi"},
}


def test_first_deploy_creates_the_exact_inference_service(
    api: Any, emulator: KubeEmulator
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
            "annotations": SERVERLESS | rollout_annotations(STABLE, "", "initial"),
        },
        "spec": {
            "predictor": {
                "serviceAccountName": "shopml-predictor",
                **PREDICTOR_FIELDS,
                "model": {
                    "name": "kserve-container",
                    "runtime": "shopml",
                    "modelFormat": MODEL_FORMAT,
                    "storageUri": STABLE,
                    "resources": RESOURCES,
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
    api: Any, emulator: KubeEmulator
) -> None:
    traffic = KServeTraffic(api, TARGET)
    deploy_kserve(STABLE, TARGET, api=api)

    # A new version goes out as a 10 % canary; the stable one keeps the rest.
    canary = deploy_kserve(CANARY_1, TARGET, api=api)
    assert canary.body == {
        "metadata": {"annotations": rollout_annotations(STABLE, CANARY_1, "canary")},
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
    assert after_rollback["metadata"]["annotations"] == SERVERLESS | (
        rollout_annotations(STABLE, CANARY_1, "rolled-back")
    )

    # The next canary starts from the same stable version, then wins.
    deploy_kserve(CANARY_2, TARGET, api=api)
    assert traffic.canary_percent() == 10
    assert traffic.apply("promote") is True
    assert traffic.apply("promote") is False
    final = live(api)

    patches = [request.data for request in emulator.requests("PATCH")]
    assert patches[1] == {
        "metadata": {
            "annotations": rollout_annotations(STABLE, CANARY_1, "rolled-back")
        },
        "spec": {"predictor": {"canaryTrafficPercent": 0}},
    }
    assert patches[3] == {
        "metadata": {"annotations": rollout_annotations(CANARY_2, "", "promoted")},
        "spec": {"predictor": {"canaryTrafficPercent": 100}},
    }
    assert len(patches) == 4  # canary, rollback, canary, promote: no repeats
    assert final["spec"]["predictor"]["canaryTrafficPercent"] == 100
    assert final["spec"]["predictor"]["model"]["storageUri"] == CANARY_2
    assert final["metadata"]["annotations"] == SERVERLESS | rollout_annotations(
        CANARY_2, "", "promoted"
    )


def test_redeploying_the_live_version_changes_nothing(
    api: Any, emulator: KubeEmulator
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


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": server}}],
                "users": [{"name": "emu", "user": {}}],
                "contexts": [
                    {"name": "emu", "context": {"cluster": "emu", "user": "emu"}}
                ],
                "current-context": "emu",
            }
        )
    )
    return path


def invoke_deploy(*args: str) -> Any:
    import typer

    from shopml.cli_serving import deploy

    app = typer.Typer()
    app.command()(deploy)
    return CliRunner().invoke(app, list(args))


def test_shopml_deploy_dry_run_prints_the_patch_and_sends_nothing(
    api: Any,
    emulator: KubeEmulator,
    tmp_path: Path,
) -> None:
    deploy_kserve(STABLE, TARGET, api=api)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)

    result = invoke_deploy(
        "--storage-uri", CANARY_1, "--canary-percent", "25", "--dry-run",
        "--kubeconfig", str(kubeconfig),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "# would patch inferenceservice shopml/recommender" in result.output
    printed = json.loads(result.output.split("\n", 1)[1])
    assert printed["body"]["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert printed["stable"] == STABLE
    assert emulator.requests("PATCH") == []
    assert live(api)["spec"]["predictor"]["model"]["storageUri"] == STABLE


def test_shopml_deploy_dry_run_with_a_failing_api_server_is_an_error_naming_it(
    emulator: KubeEmulator, tmp_path: Path
) -> None:
    emulator.handler["get"] << 503
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)

    result = invoke_deploy(
        "--storage-uri", CANARY_1, "--dry-run", "--kubeconfig", str(kubeconfig)
    )

    assert result.exit_code == 1, result.output
    assert emulator.url in result.output
    assert "503" in result.output
    assert "would create" not in result.output  # no silent fallback to a create
    assert emulator.requests("POST") == emulator.requests("PATCH") == []


# --- the search InferenceService and its bundle -------------------------------------


@pytest.fixture
def s3_assets(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> AssetStore:
    """The audited asset store on the S3 server, as the deploy stage opens it."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return asset_store_from_settings(load_settings())


def store_folder(
    assets: AssetStore, name: str, root: Path, files: dict[str, bytes]
) -> AssetVersion:
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return assets.put_dir(name, "models", root, owner="t", producer="t", inputs=[])


MODEL_FILES = {"model.pt": b"weights-1", "config.json": b"{}", "manifest.json": b"{}"}
INDEX_FILES = {
    "index.json": b'{"n_items": 2}',
    "bm25/vocab.index.json": b"{}",
    "embeddings.npy": b"\x93NUMPY",
}


def test_search_rollout_publishes_the_bundle_and_creates_the_exact_isvc(
    api: Any, emulator: KubeEmulator, s3_assets: AssetStore, tmp_path: Path
) -> None:
    model = store_folder(s3_assets, "recommender", tmp_path / "m", MODEL_FILES)
    index = store_folder(s3_assets, "search-index", tmp_path / "i", INDEX_FILES)
    bundle = bundle_version(model.ref, index.ref)
    bucket = load_settings().s3.bucket  # type: ignore[union-attr]
    uri = f"s3://{bucket}/serving/search/{bundle}"

    endpoint = deploy_model(
        tmp_path, target="kserve", model_asset=model.ref, cluster=TARGET, api=api,
        search=True,
    )  # fmt: skip

    assert endpoint.endswith("/v1/models/recommender")
    search = live(api, "search")
    assert search["metadata"]["annotations"] == SERVERLESS | rollout_annotations(
        uri, "", "initial"
    )
    assert search["spec"] == {
        "predictor": {
            "serviceAccountName": "shopml-predictor",
            **PREDICTOR_FIELDS,
            "model": {
                "name": "kserve-container",
                "runtime": "shopml-search",
                "modelFormat": {"name": "shopml-search", "version": "1"},
                "storageUri": uri,
                "resources": RESOURCES,
            },
        }
    }
    # The bundle holds the recommender under model/, the index under index/.
    prefix = f"serving/search/{bundle}/"
    expected = {f"model/{k}": v for k, v in MODEL_FILES.items()} | {
        f"index/{k}": v for k, v in INDEX_FILES.items()
    }
    keys = s3_assets.store.list(prefix)
    assert sorted(keys) == sorted(
        [prefix + k for k in expected] + [prefix + "bundle.json"]
    )
    for relative, data in expected.items():
        assert s3_assets.store.get_bytes(prefix + relative) == data
    record = json.loads(s3_assets.store.get_bytes(prefix + "bundle.json"))
    published_at = datetime.fromisoformat(record.pop("published_at"))
    assert record == {"model": model.ref, "index": index.ref, "version": bundle}
    assert published_at.utcoffset() == timedelta(0)
    # Both models live (retention keeps them); both rollouts audited.
    for name, version in (("recommender", model), ("search-index", index)):
        pointer = json.loads(s3_assets.store.get_bytes(f"models/{name}/_live"))
        assert pointer["version"] == version.version
    assert s3_assets.audit is not None
    events = [(e.action, e.asset, e.outcome) for e in s3_assets.audit.events()]
    assert ("deploy.bundle", f"search-bundle@{bundle}", "success") in events
    assert ("deploy.rollout", model.ref, "success") in events
    assert ("deploy.rollout", f"search-bundle@{bundle}", "success") in events
    rollout = [e for e in s3_assets.audit.events() if e.action == "deploy.rollout"][-1]
    assert rollout.details["inferenceservice"] == "shopml/search"
    assert rollout.details["rollout"] == "create"


def test_search_redeploy_publishes_nothing_and_a_new_model_is_a_canary(
    api: Any, emulator: KubeEmulator, s3_assets: AssetStore, tmp_path: Path
) -> None:
    model = store_folder(s3_assets, "recommender", tmp_path / "m", MODEL_FILES)
    index = store_folder(s3_assets, "search-index", tmp_path / "i", INDEX_FILES)
    bundle = bundle_version(model.ref, index.ref)
    deploy_model(
        tmp_path, target="kserve", model_asset=model.ref, cluster=TARGET, api=api,
        search=True,
    )  # fmt: skip
    keys_before = s3_assets.store.list("serving/")
    assert s3_assets.audit is not None
    seen = len(s3_assets.audit.events())

    # The same pair again: no new bundle, no request that changes the cluster.
    deploy_model(
        tmp_path, target="kserve", model_asset=model.ref, cluster=TARGET, api=api,
        search=True,
    )  # fmt: skip
    assert s3_assets.store.list("serving/") == keys_before
    assert emulator.requests("PATCH") == []
    assert len(emulator.requests("POST")) == 2  # recommender, search
    again = s3_assets.audit.events()[seen:]
    assert [(e.action, e.asset, e.outcome) for e in again] == [
        ("deploy.rollout", model.ref, "unchanged"),
        ("deploy.bundle", f"search-bundle@{bundle}", "unchanged"),
        ("deploy.rollout", f"search-bundle@{bundle}", "unchanged"),
    ]

    # A new recommender version: a new bundle, rolled out as a 10 % canary.
    files = {**MODEL_FILES, "model.pt": b"weights-2"}
    new_model = store_folder(s3_assets, "recommender", tmp_path / "m2", files)
    deploy_model(
        tmp_path, target="kserve", model_asset=new_model.ref, cluster=TARGET, api=api,
        search=True,
    )  # fmt: skip
    bucket = load_settings().s3.bucket  # type: ignore[union-attr]
    old_uri = f"s3://{bucket}/serving/search/{bundle}"
    new_uri = f"s3://{bucket}/serving/search/{bundle_version(new_model.ref, index.ref)}"
    search = live(api, "search")
    assert search["metadata"]["annotations"] == SERVERLESS | rollout_annotations(
        old_uri, new_uri, "canary"
    )
    assert search["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert search["spec"]["predictor"]["model"]["storageUri"] == new_uri
    assert search["spec"]["predictor"]["model"]["resources"] == RESOURCES
    new_prefix = new_uri.split(f"{bucket}/", 1)[1]
    assert s3_assets.store.get_bytes(f"{new_prefix}/model/model.pt") == b"weights-2"


def test_search_rollout_without_an_index_changes_nothing(
    api: Any, emulator: KubeEmulator, s3_assets: AssetStore, tmp_path: Path
) -> None:
    model = store_folder(s3_assets, "recommender", tmp_path / "m", MODEL_FILES)

    with pytest.raises(KeyError, match="search-index"):
        deploy_model(
            tmp_path, target="kserve", model_asset=model.ref, cluster=TARGET, api=api,
            search=True,
        )  # fmt: skip

    assert emulator.requests("POST") == []
    assert s3_assets.store.list("serving/") == []


def test_old_search_bundles_are_pruned_but_never_a_served_one(
    api: Any, emulator: KubeEmulator, s3_assets: AssetStore, tmp_path: Path
) -> None:
    index = store_folder(s3_assets, "search-index", tmp_path / "i", INDEX_FILES)
    bundles = []

    def deploy_version(n: int) -> None:
        files = {**MODEL_FILES, "model.pt": b"weights-%d" % n}
        model = store_folder(s3_assets, "recommender", tmp_path / f"m{n}", files)
        bundles.append(bundle_version(model.ref, index.ref))
        deploy_model(
            tmp_path, target="kserve", model_asset=model.ref, cluster=TARGET,
            api=api, search=True, keep_search_bundles=1,
        )  # fmt: skip

    def stored() -> set[str]:
        return {key.split("/")[2] for key in s3_assets.store.list("serving/search/")}

    # Four versions, none promoted: the first bundle is still the stable one.
    for n in range(1, 5):
        deploy_version(n)
    assert live(api, "search")["metadata"]["annotations"][
        "shopml.io/stable-storage-uri"
    ].endswith(bundles[0])
    # Kept: the stable (1), the canary and newest (4), and the bundle of the
    # recommender marked live before this deploy (3); 2 is served by nothing.
    assert stored() == {bundles[0], bundles[2], bundles[3]}

    # Once the canary is promoted, the old stable bundle goes at the next deploy.
    assert KServeTraffic(api, search_target()).apply("promote") is True
    deploy_version(5)
    assert stored() == {bundles[3], bundles[4]}
    assert s3_assets.audit is not None
    deleted = [
        e.asset for e in s3_assets.audit.events() if e.action == "deploy.bundle.delete"
    ]
    assert deleted == [f"search-bundle@{bundles[i]}" for i in (1, 0, 2)]


def test_shopml_bundles_prune_reads_the_cluster_and_spares_what_it_serves(
    api: Any, emulator: KubeEmulator, s3_assets: AssetStore, tmp_path: Path
) -> None:
    import typer

    from shopml.cli_serving import bundles_app

    index = store_folder(s3_assets, "search-index", tmp_path / "i", INDEX_FILES)
    bundles = []
    for n in range(1, 4):
        files = {**MODEL_FILES, "model.pt": b"weights-%d" % n}
        model = store_folder(s3_assets, "recommender", tmp_path / f"m{n}", files)
        bundles.append(bundle_version(model.ref, index.ref))
        deploy_model(
            tmp_path, target="kserve", model_asset=model.ref, cluster=TARGET,
            api=api, search=True, keep_search_bundles=10,
        )  # fmt: skip
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)
    app = typer.Typer()
    app.add_typer(bundles_app, name="bundles")
    prune = ["bundles", "prune", "--keep", "1", "--kubeconfig", str(kubeconfig)]

    planned = CliRunner().invoke(app, [*prune, "--dry-run"])
    keys_before = s3_assets.store.list("serving/search/")
    done = CliRunner().invoke(app, prune)

    assert planned.exit_code == 0, planned.output
    first, second = planned.output.splitlines()[:2]
    assert first == "would delete 1 search bundle(s)"
    assert second.startswith(f"  search-bundle@{bundles[1]} (recommender@")
    assert {key.split("/")[2] for key in keys_before} == set(bundles)  # dry run
    assert done.exit_code == 0, done.output
    assert done.output.startswith("deleted 1 search bundle(s)")
    remaining = {key.split("/")[2] for key in s3_assets.store.list("serving/search/")}
    # 1 is the stable bundle, 3 the canary: both served, so both stay.
    assert remaining == {bundles[0], bundles[2]}


# --- redeploying after a rollback; the created object against the manifests ------


def test_redeploying_the_stable_version_after_a_rollback_is_unchanged(
    api: Any, emulator: KubeEmulator
) -> None:
    deploy_kserve(STABLE, TARGET, api=api)
    deploy_kserve(CANARY_1, TARGET, api=api)
    KServeTraffic(api, TARGET).apply("rollback")

    again = deploy_kserve(STABLE, TARGET, api=api)
    repeated = deploy_kserve(STABLE, TARGET, api=api)
    canary = deploy_kserve(CANARY_2, TARGET, api=api)

    assert (again.action, again.stable_uri, again.canary_uri) == (
        "unchanged", STABLE, ""
    )  # fmt: skip
    assert repeated.action == "unchanged" and repeated.body == {}
    patches = [request.data for request in emulator.requests("PATCH")]
    # canary, rollback, the stale canary annotation cleared, the next canary
    assert len(patches) == 4
    assert patches[2] == {
        "metadata": {"annotations": rollout_annotations(STABLE, "", "rolled-back")}
    }
    assert (canary.stable_uri, canary.canary_uri) == (STABLE, CANARY_2)
    assert live(api)["spec"]["predictor"]["canaryTrafficPercent"] == 10


def test_the_created_object_carries_what_the_serving_manifest_declares(
    api: Any, emulator: KubeEmulator
) -> None:
    import yaml

    from shopml.kserve_objects import SERVING_MANIFESTS

    for name in ("recommender", "search"):
        path = SERVING_MANIFESTS / f"inferenceservice.{name}.yaml"
        manifest = yaml.safe_load(path.read_text())
        target = search_target() if name == "search" else ClusterTarget()

        deploy_kserve(STABLE, target, api=api)
        created = live(api, name)

        mode = "serving.kserve.io/deploymentMode"
        assert (
            created["metadata"]["annotations"][mode]
            == (manifest["metadata"]["annotations"][mode])
        )
        for field in ("serviceAccountName", "minReplicas", "maxReplicas"):
            assert (
                created["spec"]["predictor"][field]
                == (manifest["spec"]["predictor"][field])
            )
        assert (
            created["spec"]["predictor"]["securityContext"]
            == (manifest["spec"]["predictor"]["securityContext"])
        )
        model, declared = (
            created["spec"]["predictor"]["model"],
            (manifest["spec"]["predictor"]["model"]),
        )
        for field in ("runtime", "modelFormat", "resources"):
            assert model[field] == declared[field]


def test_a_canary_on_a_raw_deployment_is_refused_and_no_canary_replaces_it(
    api: Any, emulator: KubeEmulator, tmp_path: Path
) -> None:
    raw = ClusterTarget()  # the base manifest's RawDeployment
    deploy_kserve(STABLE, raw, api=api)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emulator.url)

    refused = invoke_deploy("--storage-uri", CANARY_1, "--kubeconfig", str(kubeconfig))
    replaced = invoke_deploy(
        "--storage-uri", CANARY_1, "--kubeconfig", str(kubeconfig), "--no-canary"
    )

    assert refused.exit_code == 1, refused.output
    assert "RawDeployment" in refused.output and "--no-canary" in refused.output
    assert replaced.exit_code == 0, replaced.output
    [patch] = [request.data for request in emulator.requests("PATCH")]
    assert patch["metadata"]["annotations"] == rollout_annotations(
        CANARY_1, "", "replaced"
    )
    assert live(api)["spec"]["predictor"]["model"]["storageUri"] == CANARY_1
