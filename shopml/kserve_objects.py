"""KServe ``InferenceService`` objects and merge patches for a canary rollout.

Pure functions, no API calls: objects and patches are built with the ``kserve`` SDK's
typed models (``V1beta1InferenceService``, ...) and returned as the JSON the API server
receives. Rollout state lives in annotations (``shopml.io/stable-storage-uri``,
``shopml.io/canary-storage-uri``, ``shopml.io/rollout-decision``) so that every step
(a first rollout, a new canary, promote, rollback) is computed from the live object
alone, and repeating a step yields nothing to send. :mod:`shopml.kserve_api` sends
them; :mod:`shopml.canary` decides promote or rollback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ISVC_GROUP = "serving.kserve.io"
ISVC_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
ANNOTATION_STABLE = "shopml.io/stable-storage-uri"
ANNOTATION_CANARY = "shopml.io/canary-storage-uri"
ANNOTATION_DECISION = "shopml.io/rollout-decision"
ANNOTATION_DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
DECISIONS = ("initial", "canary", "promoted", "rolled-back", "replaced")
# KServe's names for a plain Deployment (no Knative), where it ignores
# canaryTrafficPercent (kserve/kserve#5335); "Standard" is the 0.17+ name.
RAW_DEPLOYMENT_MODES = ("RawDeployment", "Standard")
# Storage URI schemes KServe's storage initializer downloads from.
STORAGE_URI_SCHEMES = (
    "s3",
    "gs",
    "pvc",
    "https",
    "http",
    "hf",
    "oci",
    "hdfs",
    "webhdfs",
)
# The InferenceServices of manifests/base/serving: what a first rollout creates
# copies their deployment mode, replicas and security context from these files.
#: manifests/base/serving of the source tree; images that install shopml as a package
#: ship the folder elsewhere and name it in SHOPML_SERVING_MANIFESTS.
SERVING_MANIFESTS = Path(
    os.environ.get("SHOPML_SERVING_MANIFESTS")
    or Path(__file__).resolve().parents[1] / "manifests/base/serving"
)
_MODEL_CONTAINER = "kserve-container"
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def check_dns_label(field: str, value: str) -> str:
    """Return ``value`` if it is a DNS-1123 label (a Kubernetes name or namespace).

    Raises:
        ValueError: it is not; the message names ``field`` and the value.
    """
    if len(value) > 63 or not _DNS1123_LABEL.fullmatch(value):
        raise ValueError(
            f"{field}={value!r} is not a DNS-1123 label: use at most 63 lower-case "
            "letters, digits and '-', starting and ending with a letter or digit"
        )
    return value


def check_storage_uri(storage_uri: str) -> str:
    """Return ``storage_uri`` if KServe can download a model from it.

    Raises:
        ValueError: no supported scheme, no location or path, or whitespace in it.
    """
    parts = urlsplit(storage_uri)
    if (
        parts.scheme not in STORAGE_URI_SCHEMES
        or not parts.netloc
        or parts.path.strip("/") == ""
        or any(char.isspace() for char in storage_uri)
    ):
        raise ValueError(
            f"storage_uri={storage_uri!r} is not a model location KServe downloads: "
            f"use <scheme>://<bucket or host>/<path> with a scheme of "
            f"{', '.join(STORAGE_URI_SCHEMES)} (s3://shopml/models/recommender/<v>)"
        )
    return storage_uri


@dataclass(frozen=True)
class ClusterTarget:
    """The InferenceService a model is rolled out to (see manifests/base/serving).

    Attributes:
        name: the InferenceService name (and the model name in its URLs).
        namespace: its namespace.
        runtime: the ``ServingRuntime`` that runs ``python -m serving``.
        model_format: the model format the runtime declares.
        model_format_version: its version.
        service_account: the predictor's service account (S3 credentials).
        canary_percent: traffic share, 1..99, that a new model version gets first.
        cpu_request: CPU request of the model container when a first rollout
            creates the InferenceService (as in manifests/base/serving); patches
            leave the resources an overlay set untouched.
        memory_request: its memory request.
        cpu_limit: its CPU limit.
        memory_limit: its memory limit.
        deployment_mode: the ``serving.kserve.io/deploymentMode`` a first rollout
            creates; ``""`` takes the one of manifests/base/serving. KServe runs a
            canary only in ``Serverless`` mode.
    """

    name: str = "recommender"
    namespace: str = "shopml"
    runtime: str = "shopml"
    model_format: str = "shopml-sasrec"
    model_format_version: str = "1"
    service_account: str = "shopml-predictor"
    canary_percent: int = 10
    cpu_request: str = "500m"
    memory_request: str = "1Gi"
    cpu_limit: str = "2"
    memory_limit: str = "2Gi"
    deployment_mode: str = ""

    def __post_init__(self) -> None:
        check_dns_label("name", self.name)
        check_dns_label("namespace", self.namespace)
        if not 1 <= self.canary_percent <= 99:
            raise ValueError(
                f"canary_percent={self.canary_percent} must be between 1 and 99; "
                "100 is a promotion and 0 a rollback"
            )

    @property
    def endpoint(self) -> str:
        """The cluster-internal v1 model URL of the InferenceService."""
        return (
            f"http://{self.name}-predictor.{self.namespace}.svc.cluster.local"
            f"/v1/models/{self.name}"
        )


@dataclass(frozen=True)
class RolloutPlan:
    """What ``components.deploy.deploy_kserve`` does to the cluster, or would do on a
    dry run.

    Attributes:
        action: ``create``, ``patch`` or ``unchanged``.
        body: the full object (create) or the merge patch (patch); for
            ``unchanged`` ``{}``, or the annotation patch that forgets a
            rolled-back canary when its stable version is deployed again.
        stable_uri: the model version serving the traffic the canary does not get.
        canary_uri: the new version, ``""`` when it takes all traffic.
    """

    action: str
    body: dict[str, Any]
    stable_uri: str
    canary_uri: str


def _serialize(obj: Any) -> dict[str, Any]:
    """A kserve/kubernetes typed model as the JSON the API server receives."""
    from kubernetes.client import ApiClient

    return dict(ApiClient().sanitize_for_serialization(obj))


def _model_spec(
    target: ClusterTarget, storage_uri: str, with_resources: bool = False
) -> Any:
    from kserve import V1beta1ModelFormat, V1beta1ModelSpec
    from kubernetes.client import V1ResourceRequirements

    resources = V1ResourceRequirements(
        requests={"cpu": target.cpu_request, "memory": target.memory_request},
        limits={"cpu": target.cpu_limit, "memory": target.memory_limit},
    )
    return V1beta1ModelSpec(
        name=_MODEL_CONTAINER,
        runtime=target.runtime,
        model_format=V1beta1ModelFormat(
            name=target.model_format, version=target.model_format_version
        ),
        storage_uri=storage_uri,
        resources=resources if with_resources else None,
    )


def _annotations(stable: str, canary: str, decision: str) -> dict[str, str]:
    return {
        ANNOTATION_STABLE: stable,
        ANNOTATION_CANARY: canary,
        ANNOTATION_DECISION: decision,
    }


def serving_manifest(target: ClusterTarget) -> dict[str, Any]:
    """The InferenceService of manifests/base/serving that ``target`` is built from.

    ``inferenceservice.<name>.yaml`` when there is one, else the recommender's.

    Raises:
        FileNotFoundError: the manifests are not where this package expects them.
    """
    import yaml

    path = SERVING_MANIFESTS / f"inferenceservice.{target.name}.yaml"
    if not path.is_file():
        path = SERVING_MANIFESTS / "inferenceservice.recommender.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the serving manifest a first rollout copies its deployment mode, "
            "replicas and security context from is missing; ship manifests/base/serving "
            "with the code"
        )
    return dict(yaml.safe_load(path.read_text()))


def build_inference_service(target: ClusterTarget, storage_uri: str) -> dict[str, Any]:
    """The InferenceService of a first rollout: one model, all traffic.

    The deployment mode annotation, ``minReplicas``/``maxReplicas`` and the
    predictor's ``securityContext`` are those of manifests/base/serving
    (:func:`serving_manifest`); ``target.deployment_mode`` overrides the mode.

    Args:
        target: where it goes.
        storage_uri: the model version.

    Returns:
        The object as JSON, built from ``kserve.V1beta1InferenceService``.

    Raises:
        ValueError: ``storage_uri`` is not a location KServe downloads from.
    """
    from kserve import (
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1PredictorSpec,
    )
    from kubernetes.client import V1ObjectMeta

    check_storage_uri(storage_uri)
    manifest = serving_manifest(target)
    predictor = manifest["spec"]["predictor"]
    mode = (
        target.deployment_mode
        or manifest["metadata"]["annotations"][ANNOTATION_DEPLOYMENT_MODE]
    )
    service = V1beta1InferenceService(
        api_version=f"{ISVC_GROUP}/{ISVC_VERSION}",
        kind="InferenceService",
        metadata=V1ObjectMeta(
            name=target.name,
            namespace=target.namespace,
            annotations={
                ANNOTATION_DEPLOYMENT_MODE: mode,
                **_annotations(storage_uri, "", "initial"),
            },
        ),
        spec=V1beta1InferenceServiceSpec(
            predictor=V1beta1PredictorSpec(
                service_account_name=target.service_account,
                min_replicas=predictor["minReplicas"],
                max_replicas=predictor["maxReplicas"],
                model=_model_spec(target, storage_uri, with_resources=True),
            )
        ),
    )
    body = _serialize(service)
    # The SDK's V1PodSecurityContext has no seccompProfile field: taken as written.
    body["spec"]["predictor"]["securityContext"] = predictor["securityContext"]
    return body


def _patch(
    annotations: dict[str, str],
    canary_percent: int,
    model: Any = None,
) -> dict[str, Any]:
    """A merge patch of annotations, ``canaryTrafficPercent`` and maybe the model."""
    from kserve import (
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1PredictorSpec,
    )
    from kubernetes.client import V1ObjectMeta

    patch = V1beta1InferenceService(
        metadata=V1ObjectMeta(annotations=annotations),
        spec=V1beta1InferenceServiceSpec(
            predictor=V1beta1PredictorSpec(
                canary_traffic_percent=canary_percent, model=model
            )
        ),
    )
    return _serialize(patch)


def predictor_storage_uri(live: dict[str, Any]) -> str:
    """The ``storageUri`` a live InferenceService's predictor serves, ``""`` if none.

    Read from ``spec.predictor.model`` or a framework predictor (``sklearn``, ...);
    a predictor of custom ``containers`` has none.
    """
    predictor = (live.get("spec") or {}).get("predictor") or {}
    for key in ("model", *sorted(predictor)):
        section = predictor.get(key)
        if isinstance(section, dict) and section.get("storageUri"):
            return str(section["storageUri"])
    return ""


def live_rollout(live: dict[str, Any]) -> tuple[str, str, str]:
    """``(stable_uri, canary_uri, decision)`` of a live InferenceService.

    An object shopml did not create is read as stable on its predictor's
    ``storageUri`` (``""`` when it has none, e.g. custom containers).
    """
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    return (
        annotations.get(ANNOTATION_STABLE) or predictor_storage_uri(live),
        annotations.get(ANNOTATION_CANARY, ""),
        annotations.get(ANNOTATION_DECISION, "initial"),
    )


def is_raw_deployment(live: dict[str, Any]) -> bool:
    """Whether KServe runs the live object as a plain Deployment (no canary there)."""
    annotations = (live.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_DEPLOYMENT_MODE, "") in RAW_DEPLOYMENT_MODES


def _require_model_predictor(live: dict[str, Any]) -> None:
    """Raise unless the live predictor is a ``model`` spec a patch can replace."""
    predictor = (live.get("spec") or {}).get("predictor") or {}
    if isinstance(predictor.get("model"), dict):
        return
    meta = live.get("metadata") or {}
    raise ValueError(
        f"InferenceService {meta.get('namespace')}/{meta.get('name')} has no "
        f"spec.predictor.model (its predictor has {sorted(predictor) or 'nothing'}); "
        "shopml rolls out model predictors only: delete it or convert it first"
    )


def plan_rollout(
    target: ClusterTarget,
    storage_uri: str,
    live: dict[str, Any] | None,
    *,
    canary: bool = True,
) -> RolloutPlan:
    """What to send so that ``storage_uri`` goes out as a canary.

    Args:
        target: the InferenceService.
        storage_uri: the new model version.
        live: the object as the API server returns it, ``None`` when absent.
        canary: ``False`` replaces the model at once (all traffic, decision
            ``replaced``), as a RawDeployment object needs.

    Returns:
        ``create`` (first model, all traffic), ``patch`` (new canary at
        ``target.canary_percent``, the stable version keeps the rest), or
        ``unchanged`` (this version is already the canary or the stable one;
        after a rollback ``body`` still clears the stale canary annotation).

    Raises:
        ValueError: a bad ``storage_uri``, or a live predictor that is not a
            ``model`` spec.
    """
    check_storage_uri(storage_uri)
    if live is None:
        body = build_inference_service(target, storage_uri)
        return RolloutPlan("create", body, storage_uri, "")
    _require_model_predictor(live)
    stable, live_canary, decision = live_rollout(live)
    if storage_uri == stable:
        # The stable version serves all traffic the canary does not get; after a
        # rollback that is all of it, and the rolled-back canary is forgotten.
        stale = decision == "rolled-back" and live_canary
        body = _annotation_patch(_annotations(stable, "", decision)) if stale else {}
        return RolloutPlan("unchanged", body, stable, "" if stale else live_canary)
    if storage_uri == live_canary and decision != "rolled-back":
        return RolloutPlan("unchanged", {}, stable, live_canary)

    if not canary:
        body = _patch(
            _annotations(storage_uri, "", "replaced"),
            100,
            _model_spec(target, storage_uri),
        )
        return RolloutPlan("patch", body, storage_uri, "")
    body = _patch(
        _annotations(stable, storage_uri, "canary"),
        target.canary_percent,
        _model_spec(target, storage_uri),
    )
    return RolloutPlan("patch", body, stable, storage_uri)


def _annotation_patch(annotations: dict[str, str]) -> dict[str, Any]:
    """A merge patch of the rollout annotations alone."""
    return {"metadata": {"annotations": annotations}}


def traffic_patch(live: dict[str, Any], decision: str) -> dict[str, Any]:
    """The merge patch that applies a canary decision; ``{}`` when already applied.

    ``promoted`` sends 100 % to the canary and makes it the stable version;
    ``rolled-back`` sends 0 % to it, so KServe routes everything to the previous
    revision (the stable version, recorded in the annotations).

    Args:
        live: the InferenceService as the API server returns it.
        decision: ``promoted`` or ``rolled-back``.

    Returns:
        The patch, built from ``kserve.V1beta1InferenceService``.

    Raises:
        ValueError: an unknown decision, or no canary to decide on.
    """
    if decision not in ("promoted", "rolled-back"):
        raise ValueError(
            f"decision={decision!r} is not a canary decision; use 'promoted' or "
            "'rolled-back'"
        )
    stable, canary, current = live_rollout(live)
    if current == decision:
        return {}
    if not canary:
        raise ValueError(
            f"InferenceService {(live.get('metadata') or {}).get('name')} has no canary to mark "
            f"{decision} (last decision: {current})"
        )
    if decision == "promoted":
        return _patch(_annotations(canary, "", "promoted"), 100)
    return _patch(_annotations(stable, canary, "rolled-back"), 0)


def search_target(
    canary_percent: int = 10, namespace: str = "shopml", deployment_mode: str = ""
) -> ClusterTarget:
    """The ``search`` InferenceService (manifests/base/serving) as a rollout target."""
    return ClusterTarget(
        name="search",
        namespace=namespace,
        runtime="shopml-search",
        model_format="shopml-search",
        canary_percent=canary_percent,
        deployment_mode=deployment_mode,
    )


def served_uris(live: dict[str, Any] | None) -> set[str]:
    """Every ``storageUri`` a live InferenceService may route traffic to.

    The stable and canary versions of the annotations and the predictor's current
    ``storageUri``; empty when ``live`` is ``None`` (no such object).
    """
    if live is None:
        return set()
    stable, canary, _ = live_rollout(live)
    current = predictor_storage_uri(live)
    return {uri for uri in (stable, canary, current) if uri}
