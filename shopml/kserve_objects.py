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

from dataclasses import dataclass
from typing import Any

ISVC_GROUP = "serving.kserve.io"
ISVC_VERSION = "v1beta1"
ISVC_PLURAL = "inferenceservices"
ANNOTATION_STABLE = "shopml.io/stable-storage-uri"
ANNOTATION_CANARY = "shopml.io/canary-storage-uri"
ANNOTATION_DECISION = "shopml.io/rollout-decision"
DECISIONS = ("initial", "canary", "promoted", "rolled-back")
_MODEL_CONTAINER = "kserve-container"


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

    def __post_init__(self) -> None:
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
        body: the full object (create) or the merge patch (patch); ``{}`` otherwise.
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


def build_inference_service(target: ClusterTarget, storage_uri: str) -> dict[str, Any]:
    """The InferenceService of a first rollout: one model, all traffic.

    Args:
        target: where it goes.
        storage_uri: the model version.

    Returns:
        The object as JSON, built from ``kserve.V1beta1InferenceService``.
    """
    from kserve import (
        V1beta1InferenceService,
        V1beta1InferenceServiceSpec,
        V1beta1PredictorSpec,
    )
    from kubernetes.client import V1ObjectMeta

    service = V1beta1InferenceService(
        api_version=f"{ISVC_GROUP}/{ISVC_VERSION}",
        kind="InferenceService",
        metadata=V1ObjectMeta(
            name=target.name,
            namespace=target.namespace,
            annotations=_annotations(storage_uri, "", "initial"),
        ),
        spec=V1beta1InferenceServiceSpec(
            predictor=V1beta1PredictorSpec(
                service_account_name=target.service_account,
                model=_model_spec(target, storage_uri, with_resources=True),
            )
        ),
    )
    return _serialize(service)


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


def live_rollout(live: dict[str, Any]) -> tuple[str, str, str]:
    """``(stable_uri, canary_uri, decision)`` of a live InferenceService.

    An object shopml did not create is read as stable on its ``storageUri``.
    """
    annotations = live.get("metadata", {}).get("annotations") or {}
    current = live["spec"]["predictor"]["model"]["storageUri"]
    return (
        annotations.get(ANNOTATION_STABLE) or current,
        annotations.get(ANNOTATION_CANARY, ""),
        annotations.get(ANNOTATION_DECISION, "initial"),
    )


def plan_rollout(
    target: ClusterTarget, storage_uri: str, live: dict[str, Any] | None
) -> RolloutPlan:
    """What to send so that ``storage_uri`` goes out as a canary.

    Args:
        target: the InferenceService.
        storage_uri: the new model version.
        live: the object as the API server returns it, ``None`` when absent.

    Returns:
        ``create`` (first model, all traffic), ``patch`` (new canary at
        ``target.canary_percent``, the stable version keeps the rest), or
        ``unchanged`` (this version is already the canary or the stable one).
    """
    if live is None:
        body = build_inference_service(target, storage_uri)
        return RolloutPlan("create", body, storage_uri, "")
    stable, canary, decision = live_rollout(live)
    if storage_uri in (canary, stable) and decision != "rolled-back":
        return RolloutPlan("unchanged", {}, stable, canary)

    body = _patch(
        _annotations(stable, storage_uri, "canary"),
        target.canary_percent,
        _model_spec(target, storage_uri),
    )
    return RolloutPlan("patch", body, stable, storage_uri)


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
            f"InferenceService {live['metadata']['name']} has no canary to mark "
            f"{decision} (last decision: {current})"
        )
    if decision == "promoted":
        return _patch(_annotations(canary, "", "promoted"), 100)
    return _patch(_annotations(stable, canary, "rolled-back"), 0)


def search_target(canary_percent: int = 10, namespace: str = "shopml") -> ClusterTarget:
    """The ``search`` InferenceService (manifests/base/serving) as a rollout target."""
    return ClusterTarget(
        name="search",
        namespace=namespace,
        runtime="shopml-search",
        model_format="shopml-search",
        canary_percent=canary_percent,
    )


def served_uris(live: dict[str, Any] | None) -> set[str]:
    """Every ``storageUri`` a live InferenceService may route traffic to.

    The stable and canary versions of the annotations and the predictor's current
    ``storageUri``; empty when ``live`` is ``None`` (no such object).
    """
    if live is None:
        return set()
    stable, canary, _ = live_rollout(live)
    current = live["spec"]["predictor"]["model"]["storageUri"]
    return {uri for uri in (stable, canary, current) if uri}
