"""The kustomize manifests: every overlay builds, validates and meets our pod policy.

Built-in kinds are validated offline against the Kubernetes JSON schemas
(``kubernetes-validate``, strict: unknown fields fail). KServe objects are read into the
KServe SDK's typed models with unknown fields rejected, then checked field by field; the
PyTorchJob (no SDK model here) is checked structurally. The policy tests run over every
container of every overlay, the pod templates of DaskCluster and RayCluster (head and
each worker group) included, and over the effective predictor container
(ServingRuntime container merged with the InferenceService's model spec, as KServe
merges them).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kserve.models
import kubernetes.client.models
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.integration.test_scale_out import selects

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())
KUBECTL = shutil.which("kubectl")
KUBERNETES_VERSION = "1.32"
KSERVE_KINDS = {
    "InferenceService": "V1beta1InferenceService",
    "ServingRuntime": "V1alpha1ServingRuntime",
}
# Run-to-completion containers have no port to probe; the operator restarts them.
PROBE_EXEMPT_KINDS = {"PyTorchJob", "Job", "CronJob"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
SECRET_NAMES = {"shopml-credentials", "shopml-minio-root"}


def build(overlay: str) -> list[dict[str, Any]]:
    """Run `kubectl kustomize` on an overlay and parse the documents it prints."""
    if KUBECTL is None:
        return []
    result = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"kubectl kustomize overlays/{overlay} failed: {result.stderr}"
        )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


BUILT: dict[str, list[dict[str, Any]]] = {
    overlay: build(overlay) for overlay in OVERLAYS
}
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed"),
]


def ident(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def objects(
    kinds: set[str] | None = None,
    *,
    exclude: frozenset[str] = frozenset(),
    overlays: tuple[str, ...] = tuple(OVERLAYS),
) -> list[Any]:
    """pytest params (overlay, object) with readable ids, filtered by kind/overlay."""
    return [
        pytest.param(overlay, doc, id=f"{overlay}:{ident(doc)}")
        for overlay, docs in BUILT.items()
        for doc in docs
        if (kinds is None or doc["kind"] in kinds)
        and doc["kind"] not in exclude
        and overlay in overlays
    ]


def find(overlay: str, kind: str, name: str) -> dict[str, Any]:
    matches = [
        d for d in BUILT[overlay] if d["kind"] == kind and d["metadata"]["name"] == name
    ]
    assert len(matches) == 1, (
        f"{overlay}: expected one {kind}/{name}, got {len(matches)}"
    )
    return matches[0]


# --- containers of every overlay ---------------------------------------------------


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod spec) of each pod template in a built-in kind or a PyTorchJob."""
    kind = doc["kind"]
    if kind in WORKLOAD_KINDS:
        yield ident(doc), doc["spec"]["template"]["spec"]
    elif kind == "CronJob":
        yield ident(doc), doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield ident(doc), doc["spec"]
    elif kind == "PyTorchJob":
        for role, replica in doc["spec"]["pytorchReplicaSpecs"].items():
            yield f"{ident(doc)}/{role}", replica["template"]["spec"]
    elif kind == "DaskCluster":
        for role in ("scheduler", "worker"):
            yield f"{ident(doc)}/{role}", doc["spec"][role]["spec"]
    elif kind == "RayCluster":
        yield f"{ident(doc)}/head", doc["spec"]["headGroupSpec"]["template"]["spec"]
        for group in doc["spec"].get("workerGroupSpecs", []):
            label = f"{ident(doc)}/{group['groupName']}"
            yield label, group["template"]["spec"]


def dask_pod_labels(doc: dict[str, Any], role: str) -> dict[str, str]:
    """Labels of a DaskCluster's pods: its own plus those the Dask operator adds."""
    own = doc["spec"][role].get("metadata", {}).get("labels", {})
    operator = {
        "dask.org/cluster-name": doc["metadata"]["name"],
        "dask.org/component": role,
    }
    return {**own, **operator}


def ray_pod_labels(doc: dict[str, Any]) -> list[dict[str, str]]:
    """Labels of a RayCluster's head and worker pods: its own plus KubeRay's."""
    spec = doc["spec"]
    groups = [("head", "headgroup", spec["headGroupSpec"])] + [
        ("worker", group["groupName"], group) for group in spec["workerGroupSpecs"]
    ]
    return [
        {
            **group["template"].get("metadata", {}).get("labels", {}),
            "ray.io/cluster": doc["metadata"]["name"],
            "ray.io/node-type": node_type,
            "ray.io/group": name,
        }
        for node_type, name, group in groups
    ]


def effective_predictor(overlay: str, isvc: dict[str, Any]) -> dict[str, Any]:
    """The kserve-container KServe runs: runtime container overlaid by the model."""
    model = isvc["spec"]["predictor"]["model"]
    runtime = find(overlay, "ServingRuntime", model["runtime"])
    container = dict(runtime["spec"]["containers"][0])
    container.update({k: v for k, v in model.items() if k in _CONTAINER_FIELDS})
    return container


_CONTAINER_FIELDS = set(kubernetes.client.models.V1Container.attribute_map.values())


def containers() -> list[Any]:
    """(overlay, owner kind, pod spec, container) params over every overlay."""
    params = []
    for overlay, docs in BUILT.items():
        for doc in docs:
            for label, spec in pod_specs(doc):
                for c in spec.get("initContainers", []) + spec["containers"]:
                    params.append(
                        pytest.param(
                            doc["kind"], spec, c, id=f"{overlay}:{label}:{c['name']}"
                        )
                    )
            if doc["kind"] == "InferenceService":
                spec = doc["spec"]["predictor"]
                c = effective_predictor(overlay, doc)
                params.append(
                    pytest.param(
                        doc["kind"], spec, c, id=f"{overlay}:{ident(doc)}:{c['name']}"
                    )
                )
    return params


CONTAINERS = containers()


def _setting(spec: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A securityContext field, container level first, then pod level."""
    value = container.get("securityContext", {}).get(key)
    return spec.get("securityContext", {}).get(key) if value is None else value


def test_every_overlay_builds_the_platform() -> None:
    assert OVERLAYS == ["dev", "prod"]
    for overlay, docs in BUILT.items():
        kinds = {ident(d) for d in docs}
        expected = {
            "Namespace/shopml",
            "ConfigMap/shopml-settings",
            "StatefulSet/minio",
            "StatefulSet/redis",
            "ServingRuntime/shopml",
            "ServingRuntime/shopml-search",
            "InferenceService/recommender",
            "InferenceService/search",
            "ServiceAccount/pipeline-runner",
            "Role/pipeline-runner",
            "RoleBinding/pipeline-runner",
            "NetworkPolicy/default-deny",
        }
        assert expected <= kinds, f"{overlay} lacks {sorted(expected - kinds)}"


# CRDs have no schema in kubernetes-validate; KServe and PyTorchJob tests cover them,
# tests/integration/test_scale_out.py the Dask operator's and KubeRay's kinds.
CRD_KINDS = frozenset(
    {*KSERVE_KINDS, "PyTorchJob", "DaskCluster", "DaskAutoscaler", "RayCluster"}
)


@pytest.mark.parametrize(("overlay", "doc"), objects(exclude=CRD_KINDS))
def test_builtin_kinds_validate_against_kubernetes_schemas(
    overlay: str, doc: dict[str, Any]
) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# --- KServe objects through the SDK's typed models -----------------------------------


def to_model(data: Any, type_name: str, path: str) -> Any:
    """Build a KServe/Kubernetes OpenAPI model from a dict, rejecting unknown fields."""
    if data is None:
        return None
    if type_name.startswith("list["):
        return [
            to_model(v, type_name[5:-1], f"{path}[{i}]") for i, v in enumerate(data)
        ]
    if match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        return {k: to_model(v, match.group(1), f"{path}.{k}") for k, v in data.items()}
    if type_name in {"str", "int", "float", "bool", "object", "ResourceQuantity"}:
        allowed = {
            "str": (str,),
            "int": (int,),
            "float": (int, float),
            "bool": (bool,),
            "object": (object,),
            "ResourceQuantity": (str, int, float),
        }[type_name]
        assert isinstance(data, allowed), f"{path}: {data!r} is not {type_name}"
        return data
    cls = getattr(kserve.models, type_name, None) or getattr(
        kubernetes.client.models, type_name, None
    )
    assert cls is not None, f"{path}: no SDK model named {type_name}"
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(by_json))
    assert not unknown, f"{path}: unknown field(s) {unknown} for {type_name}"
    kwargs = {
        by_json[k]: to_model(v, cls.openapi_types[by_json[k]], f"{path}.{k}")
        for k, v in data.items()
    }
    return cls(**kwargs)


@pytest.mark.parametrize(("overlay", "doc"), objects(set(KSERVE_KINDS)))
def test_kserve_objects_build_typed_models(overlay: str, doc: dict[str, Any]) -> None:
    model = to_model(doc, KSERVE_KINDS[doc["kind"]], ident(doc))
    assert model.metadata.namespace == "shopml"
    assert (
        model.api_version
        == {
            "InferenceService": "serving.kserve.io/v1beta1",
            "ServingRuntime": "serving.kserve.io/v1alpha1",
        }[doc["kind"]]
    )


def test_unknown_kserve_field_is_rejected() -> None:
    doc = find("dev", "InferenceService", "recommender")
    bad = {**doc, "spec": {"predictor": {**doc["spec"]["predictor"], "minReplica": 1}}}
    with pytest.raises(AssertionError, match="minReplica"):
        to_model(bad, "V1beta1InferenceService", "isvc")


# Where each InferenceService's storageUri points: a model version, or a search bundle.
STORAGE_PREFIXES = {
    "recommender": "s3://shopml/models/recommender/",
    "search": "s3://shopml/serving/search/",
}


@pytest.mark.parametrize(("overlay", "doc"), objects({"InferenceService"}))
def test_inference_service_uses_the_shopml_runtime(
    overlay: str, doc: dict[str, Any]
) -> None:
    isvc = to_model(doc, "V1beta1InferenceService", ident(doc))
    predictor = isvc.spec.predictor
    runtime = to_model(
        find(overlay, "ServingRuntime", predictor.model.runtime),
        "V1alpha1ServingRuntime",
        "runtime",
    )
    formats = {f.name for f in runtime.spec.supported_model_formats}
    assert predictor.model.model_format.name in formats
    assert predictor.model.storage_uri.startswith(
        STORAGE_PREFIXES[doc["metadata"]["name"]]
    )
    assert predictor.service_account_name == "shopml-predictor"
    assert 1 <= predictor.min_replicas <= predictor.max_replicas
    mode = doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    assert mode in {"RawDeployment", "Serverless"}
    if overlay == "dev":
        assert (predictor.min_replicas, predictor.max_replicas) == (1, 1)


@pytest.mark.parametrize(
    ("overlay", "doc"), objects({"InferenceService"}, overlays=("prod",))
)
def test_prod_predictors_autoscale_with_a_canary(
    overlay: str, doc: dict[str, Any]
) -> None:
    predictor = to_model(doc, "V1beta1InferenceService", ident(doc)).spec.predictor
    assert predictor.max_replicas > predictor.min_replicas >= 2
    assert predictor.scale_metric in {"concurrency", "rps", "cpu", "memory"}
    assert predictor.scale_target > 0
    assert 0 < predictor.canary_traffic_percent < 100
    # canaryTrafficPercent needs Knative revisions: Serverless mode.
    assert (
        doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
        == "Serverless"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_runtime_starts_the_shopml_server(overlay: str) -> None:
    runtime = find(overlay, "ServingRuntime", "shopml")
    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    assert container["command"] == ["python", "-m", "serving"]
    assert "--model-dir=/mnt/models" in container["args"]
    assert "--model-name={{.Name}}" in container["args"]
    assert "--http-port=8080" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/{{.Name}}"
    assert container["livenessProbe"]["httpGet"]["path"] == "/"
    assert set(runtime["spec"]["protocolVersions"]) == {"v1", "v2"}


@pytest.mark.parametrize(("overlay", "doc"), objects({"InferenceService"}))
def test_every_model_format_is_served_by_a_runtime_of_the_same_build(
    overlay: str, doc: dict[str, Any]
) -> None:
    """The named runtime serves the format, and it is the only one auto-selecting it."""
    model = doc["spec"]["predictor"]["model"]
    wanted = (model["modelFormat"]["name"], model["modelFormat"].get("version"))
    runtimes = [d for d in BUILT[overlay] if d["kind"] == "ServingRuntime"]
    serving = {
        r["metadata"]["name"]
        for r in runtimes
        for f in r["spec"]["supportedModelFormats"]
        if (f["name"], f.get("version")) == wanted and f.get("autoSelect")
    }
    assert serving == {model["runtime"]}, f"{ident(doc)}: {wanted} served by {serving}"


def test_model_formats_match_the_runtimes_one_to_one() -> None:
    for overlay in OVERLAYS:
        formats = {
            find(overlay, "InferenceService", name)["spec"]["predictor"]["model"][
                "modelFormat"
            ]["name"]: name
            for name in ("recommender", "search")
        }
        assert formats == {"shopml-sasrec": "recommender", "shopml-search": "search"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_search_runtime_starts_the_search_server_like_the_shopml_one(
    overlay: str,
) -> None:
    runtime = find(overlay, "ServingRuntime", "shopml-search")
    container = runtime["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "serving.search"]
    assert container["args"] == [
        "--model-dir=/mnt/models/model",
        "--index-dir=/mnt/models/index",
        "--host=0.0.0.0",
        "--http-port=8080",
    ]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/models/search"

    # Hardening, image, settings, ports, resources and liveness as the shopml runtime.
    shopml = find(overlay, "ServingRuntime", "shopml")
    different = {"command", "args", "readinessProbe"}
    reference = shopml["spec"]["containers"][0]
    assert {k: v for k, v in container.items() if k not in different} == {
        k: v for k, v in reference.items() if k not in different
    }
    assert container["readinessProbe"]["periodSeconds"] == 10
    assert runtime["spec"]["volumes"] == shopml["spec"]["volumes"]
    assert runtime["spec"]["protocolVersions"] == shopml["spec"]["protocolVersions"]


def test_deploy_targets_match_the_manifests() -> None:
    """What the deploy stage creates when the object is absent is what dev applies."""
    from components.deploy import ClusterTarget, search_target

    for target in (ClusterTarget(), search_target()):
        predictor = find("dev", "InferenceService", target.name)["spec"]["predictor"]
        model = predictor["model"]
        assert model["runtime"] == target.runtime
        assert model["modelFormat"] == {
            "name": target.model_format,
            "version": target.model_format_version,
        }
        assert predictor["serviceAccountName"] == target.service_account
        assert model["resources"] == {
            "requests": {"cpu": target.cpu_request, "memory": target.memory_request},
            "limits": {"cpu": target.cpu_limit, "memory": target.memory_limit},
        }
        canary = find("prod", "InferenceService", target.name)["spec"]["predictor"]
        assert canary["canaryTrafficPercent"] == target.canary_percent


# --- the PyTorchJob (prod) ------------------------------------------------------------


@pytest.mark.parametrize(("overlay", "doc"), objects({"PyTorchJob"}))
def test_pytorchjob_runs_torchrun_on_gpu_nodes(
    overlay: str, doc: dict[str, Any]
) -> None:
    assert doc["apiVersion"] == "kubeflow.org/v1"
    assert doc["spec"]["runPolicy"]["suspend"] is True
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1
    for role, replica in replicas.items():
        spec = replica["template"]["spec"]
        container = spec["containers"][0]
        assert container["name"] == "pytorch", f"{role}: the operator needs 'pytorch'"
        assert container["command"] == ["torchrun"]
        args = container["args"]
        assert args[args.index("-m") + 1] == "components.train"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {
            "key": "nvidia.com/gpu",
            "operator": "Exists",
            "effect": "NoSchedule",
        } in (spec["tolerations"])


def test_prod_has_distributed_minio_and_persistent_redis() -> None:
    minio = find("prod", "StatefulSet", "minio")
    assert minio["spec"]["replicas"] == 4
    args = minio["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any("minio-{0...3}.minio-headless" in a for a in args)
    redis_args = find("prod", "StatefulSet", "redis")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    replica = find("prod", "StatefulSet", "redis-replica")
    replica_args = replica["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--replicaof" in replica_args
    service = find("prod", "Service", "redis")
    assert service["spec"]["selector"]["app.kubernetes.io/name"] == "redis"


def test_dev_is_single_replica_with_small_volumes() -> None:
    for name in ("minio", "redis"):
        statefulset = find("dev", "StatefulSet", name)
        assert statefulset["spec"]["replicas"] == 1
        storage = statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]
        assert storage["requests"]["storage"] in {"1Gi", "2Gi"}


# --- pod policy over every container ------------------------------------------------


@pytest.mark.parametrize(("kind", "spec", "container"), CONTAINERS)
def test_container_runs_restricted(
    kind: str, spec: dict[str, Any], container: dict[str, Any]
) -> None:
    context = container.get("securityContext", {})
    assert _setting(spec, container, "runAsNonRoot") is True
    assert context.get("allowPrivilegeEscalation") is False
    assert context.get("capabilities", {}).get("drop") == ["ALL"]
    assert context.get("readOnlyRootFilesystem") is True
    seccomp = _setting(spec, container, "seccompProfile") or {}
    assert seccomp.get("type") == "RuntimeDefault"
    assert _setting(spec, container, "runAsUser") != 0


@pytest.mark.parametrize(("kind", "spec", "container"), CONTAINERS)
def test_container_has_requests_and_limits(
    kind: str, spec: dict[str, Any], container: dict[str, Any]
) -> None:
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{bound} missing"


@pytest.mark.parametrize(("kind", "spec", "container"), CONTAINERS)
def test_container_has_probes(
    kind: str, spec: dict[str, Any], container: dict[str, Any]
) -> None:
    if kind in PROBE_EXEMPT_KINDS:
        pytest.skip(f"{kind} containers run to completion and serve nothing to probe")
    assert "readinessProbe" in container
    assert "livenessProbe" in container


@pytest.mark.parametrize(("kind", "spec", "container"), CONTAINERS)
def test_container_image_is_pinned(
    kind: str, spec: dict[str, Any], container: dict[str, Any]
) -> None:
    image = container["image"]
    if "@sha256:" in image:
        return
    name = image.rsplit("/", 1)[-1]
    assert ":" in name, f"{image} has no tag"
    assert name.split(":", 1)[1] != "latest", f"{image} uses latest"


@pytest.mark.parametrize(("kind", "spec", "container"), CONTAINERS)
def test_container_secrets_are_references(
    kind: str, spec: dict[str, Any], container: dict[str, Any]
) -> None:
    for env in container.get("env", []):
        name = env["name"]
        if re.search(r"KEY|PASSWORD|SECRET|USER", name):
            assert "value" not in env, f"{name} has a literal value"
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] in SECRET_NAMES


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_values_in_any_overlay(overlay: str) -> None:
    secrets = [d for d in BUILT[overlay] if d["kind"] == "Secret"]
    assert [ident(s) for s in secrets if "data" in s or "stringData" in s] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_namespace_has_a_default_deny_policy(overlay: str) -> None:
    namespaces = {
        d["metadata"].get("namespace")
        for d in BUILT[overlay]
        if d["kind"] != "Namespace"
    } - {None}
    assert namespaces == {"shopml"}
    for namespace in namespaces:
        denies = [
            d
            for d in BUILT[overlay]
            if d["kind"] == "NetworkPolicy"
            and d["metadata"].get("namespace") == namespace
            and d["spec"]["podSelector"] == {}
            and set(d["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not d["spec"].get("ingress")
            and not d["spec"].get("egress")
        ]
        assert denies, f"no default-deny NetworkPolicy in namespace {namespace}"


@pytest.mark.parametrize(("overlay", "doc"), objects({"NetworkPolicy"}))
def test_network_policy_selects_our_pods(overlay: str, doc: dict[str, Any]) -> None:
    """A selector on our own labels must match some pod template (catches typos)."""
    selectors = [doc["spec"]["podSelector"]]
    for rule in doc["spec"].get("ingress", []) + doc["spec"].get("egress", []):
        peers = rule.get("from", []) + rule.get("to", [])
        selectors += [p["podSelector"] for p in peers if "podSelector" in p]
    templates = [
        d["spec"]["template"]["metadata"].get("labels", {})
        for d in BUILT[overlay]
        if d["kind"] in WORKLOAD_KINDS
    ] + [
        dask_pod_labels(d, role)
        for d in BUILT[overlay]
        if d["kind"] == "DaskCluster"
        for role in ("scheduler", "worker")
    ]
    templates += [
        labels
        for d in BUILT[overlay]
        if d["kind"] == "RayCluster"
        for labels in ray_pod_labels(d)
    ]
    for selector in selectors:
        ours = {
            k: v
            for k, v in selector.get("matchLabels", {}).items()
            if k.startswith(("app.kubernetes.io/", "dask.org/", "ray.io/"))
        }
        if ours:
            assert any(ours.items() <= labels.items() for labels in templates), ours


# --- endpoint flows across namespaces ------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: its namespace, its labels, its namespace's."""

    namespace: str
    labels: dict[str, str]
    namespace_labels: dict[str, str] = field(default_factory=dict)

    def all_namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def peer_matches(peer: dict[str, Any], other: Pod, own_namespace: str) -> bool:
    """A NetworkPolicy peer: pods of the policy's namespace, or of selected ones."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.all_namespace_labels()):
            return False
    elif other.namespace != own_namespace:
        return False
    return selects(peer.get("podSelector", {}), other.labels)


def admits(
    docs: list[dict[str, Any]], direction: str, pod: Pod, peer: Pod, port: int
) -> bool:
    """Whether the policies of ``pod``'s namespace let it talk with ``peer``."""
    kind, key = ("Egress", "to") if direction == "egress" else ("Ingress", "from")
    selecting = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["metadata"].get("namespace") == pod.namespace
        and kind in d["spec"]["policyTypes"]
        and selects(d["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True  # not isolated here (other namespaces: their own business)
    for policy in selecting:
        for rule in policy["spec"].get(direction) or []:
            peers, ports = rule.get(key), rule.get("ports")
            peer_ok = peers is None or any(
                peer_matches(p, peer, pod.namespace) for p in peers
            )
            port_ok = ports is None or any(
                p["port"] <= port <= p.get("endPort", p["port"]) for p in ports
            )
            if peer_ok and port_ok:
                return True
    return False


def flows(docs: list[dict[str, Any]], src: Pod, dst: Pod, port: int) -> bool:
    return admits(docs, "egress", src, dst, port) and admits(
        docs, "ingress", dst, src, port
    )


PIPELINE = Pod("shopml", {"pipelines.kubeflow.org/v2_component": "true"})
PREDICTORS = [
    Pod("shopml", {"component": "predictor", "serving.kserve.io/inferenceservice": n})
    for n in ("recommender", "search")
]
ISTIO_GATEWAY = Pod("istio-system", {"istio": "ingressgateway"})
KOURIER_GATEWAY = Pod("kourier-system", {"app": "3scale-kourier-gateway"})
ACTIVATOR = Pod("knative-serving", {"app": "activator"})
CLIENT_APP = Pod("storefront", {"app": "web"}, {"shopml.io/client": "true"})
OTHER_APP = Pod("storefront", {"app": "web"})


def workload(overlay: str, name: str) -> Pod:
    spec = find(overlay, "StatefulSet", name)["spec"]["template"]["metadata"]
    return Pod("shopml", dict(spec["labels"]))


def test_prod_pipeline_reaches_the_predictors_through_the_knative_gateway() -> None:
    docs = BUILT["prod"]
    # <isvc>-predictor.shopml.svc resolves to the local gateway (pod port 8081).
    assert flows(docs, PIPELINE, ISTIO_GATEWAY, 8081)
    assert flows(docs, PIPELINE, KOURIER_GATEWAY, 8081)
    for predictor in PREDICTORS:
        assert flows(docs, ISTIO_GATEWAY, predictor, 8012)
        assert flows(docs, ACTIVATOR, predictor, 8012)
    # Nothing else of the gateway namespaces, no other namespace on that port.
    assert not flows(docs, PIPELINE, ISTIO_GATEWAY, 15021)
    assert not flows(docs, PIPELINE, Pod("default", {"app": "x"}), 8081)
    assert not flows(docs, PIPELINE, Pod("knative-serving", {"app": "x"}), 8081)


def test_dev_pipeline_calls_the_predictors_directly() -> None:
    docs = BUILT["dev"]
    for predictor in PREDICTORS:
        assert flows(docs, PIPELINE, predictor, 8080)
    assert not flows(docs, PIPELINE, ISTIO_GATEWAY, 8081)  # RawDeployment: no Knative


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_labelled_application_namespaces_call_the_predictors_only(
    overlay: str,
) -> None:
    docs = BUILT[overlay]
    for predictor in PREDICTORS:
        assert flows(docs, CLIENT_APP, predictor, 8080)
        assert not flows(docs, OTHER_APP, predictor, 8080)  # namespace not labelled
        assert not flows(docs, CLIENT_APP, predictor, 9090)  # metrics stay closed
    for target, port in (
        (workload(overlay, "minio"), 9000),
        (workload(overlay, "redis"), 6379),
        (PIPELINE, 8080),
    ):
        assert not flows(docs, CLIENT_APP, target, port), (target, port)


def test_namespace_enforces_restricted_pod_security() -> None:
    for overlay in OVERLAYS:
        labels = find(overlay, "Namespace", "shopml")["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pipeline_role_is_least_privilege(overlay: str) -> None:
    rules = find(overlay, "Role", "pipeline-runner")["rules"]
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert "secrets" not in rule["resources"]
        assert not {"delete", "deletecollection", "escalate", "bind"} & set(
            rule["verbs"]
        )
    isvc = [r for r in rules if "inferenceservices" in r["resources"]]
    assert set(isvc[0]["verbs"]) == {"get", "list", "watch", "create", "patch"}
    assert not [
        d for d in BUILT[overlay] if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}
    ]


# --- source layout --------------------------------------------------------------------


def source_files() -> list[Path]:
    return sorted(
        p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml"
    )


@pytest.mark.parametrize(
    "path", source_files(), ids=lambda p: str(p.relative_to(MANIFESTS))
)
def test_one_resource_per_file_named_kind_dot_name(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name} holds {len(docs)} documents"
    doc = docs[0]
    if isinstance(doc, list):  # an RFC 6902 patch: named after its target
        assert re.fullmatch(r"[a-z]+\.[a-z0-9-]+\.yaml", path.name)
        return
    assert path.name == f"{doc['kind'].lower()}.{doc['metadata']['name']}.yaml"


def test_images_are_pinned_only_in_overlays() -> None:
    for path in source_files():
        for line in path.read_text().splitlines():
            match = re.match(r"\s*image:\s*(\S+)", line)
            if match:
                name = match.group(1).rsplit("/", 1)[-1]
                assert ":" not in name and "@" not in name, f"{path}: {line.strip()}"
    for overlay in OVERLAYS:
        kustomization = yaml.safe_load(
            (MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text()
        )
        for image in kustomization["images"]:
            tag = str(image.get("newTag", "")) or image.get("digest", "")
            assert tag and tag != "latest", f"{overlay}: {image['name']} is not pinned"


def test_every_configmap_key_is_commented() -> None:
    lines = (
        (MANIFESTS / "base" / "configmap.shopml-settings.yaml").read_text().splitlines()
    )
    start = lines.index("data:")
    for index in range(start + 1, len(lines)):
        if re.match(r"  [A-Z_]+:", lines[index]):
            assert lines[index - 1].strip().startswith("#"), (
                f"{lines[index]} has no comment"
            )
