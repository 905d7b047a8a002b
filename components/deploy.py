"""Deploy stage: serve a model locally with KServe's ModelServer, or roll it out to a
cluster as a KServe ``InferenceService`` canary.

``deploy_model`` picks the target; ``deploy`` below is the thin KFP component around
it. Locally it starts a model server on 127.0.0.1 (:mod:`shopml.local_serving`). On a
cluster, ``deploy_kserve`` reads the live ``InferenceService`` through the
``kubernetes`` client (:mod:`shopml.kserve_api`) and creates it (the first model takes
all traffic) or merge-patches it: the new ``storageUri`` with ``canaryTrafficPercent``
set, so KServe routes that share to the new revision and the rest to the previous one.
Objects and patches come from :mod:`shopml.kserve_objects`; promote and rollback are
:mod:`shopml.canary`'s. ``deploy_search`` publishes a search bundle
(:mod:`shopml.search_bundles`) of the recommender being deployed and the latest
``search-index``, rolls it out to the ``search`` InferenceService with the same canary
logic, and prunes old bundles, never one still served. Every rollout is recorded in the
audit log.

The names other code imports from here (``deploy_local``, ``ClusterTarget``,
``read_inference_service``, ``bundle_version``, ...) are re-exported from those modules.
"""

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kfp import dsl

from components.common import stage_component
from shopml.assets import AssetStore
from shopml.config import load_settings
from shopml.kserve_api import (
    ClusterAccessError,
    KubeconfigNotFoundError,
    create_inference_service,
    find_kubeconfig,
    kubernetes_api,
    patch_inference_service,
    read_inference_service,
    wait_for_ready,
)
from shopml.kserve_objects import (
    ANNOTATION_CANARY,
    ANNOTATION_DECISION,
    ANNOTATION_STABLE,
    DECISIONS,
    ISVC_GROUP,
    ISVC_PLURAL,
    ISVC_VERSION,
    ClusterTarget,
    RolloutPlan,
    build_inference_service,
    is_raw_deployment,
    live_rollout,
    plan_rollout,
    search_target,
    served_uris,
    traffic_patch,
)
from shopml.local_serving import (
    LOG_TAIL_LINES,
    LOOPBACK,
    DeploymentError,
    LocalDeployment,
    deploy_local,
    stop_local,
)
from shopml.search_bundles import (
    BUNDLE_INDEX_DIR,
    BUNDLE_MODEL_DIR,
    BUNDLE_RECORD,
    SEARCH_BUNDLE_PREFIX,
    SEARCH_BUNDLES_KEPT,
    SEARCH_INDEX_ASSET,
    SearchBundle,
    audit,
    bundle_version,
    list_search_bundles,
    prune_search_bundles,
    publish_search_bundle,
    require_models_asset,
)

__all__ = [
    "ANNOTATION_CANARY",
    "ANNOTATION_DECISION",
    "ANNOTATION_STABLE",
    "BUNDLE_INDEX_DIR",
    "BUNDLE_MODEL_DIR",
    "BUNDLE_RECORD",
    "DECISIONS",
    "ISVC_GROUP",
    "ISVC_PLURAL",
    "ISVC_VERSION",
    "LOG_TAIL_LINES",
    "LOOPBACK",
    "SEARCH_BUNDLES_KEPT",
    "SEARCH_BUNDLE_PREFIX",
    "SEARCH_INDEX_ASSET",
    "TARGETS",
    "ClusterAccessError",
    "ClusterTarget",
    "DeploymentError",
    "KubeconfigNotFoundError",
    "LocalDeployment",
    "RolloutPlan",
    "SearchBundle",
    "build_inference_service",
    "bundle_version",
    "deploy",
    "deploy_kserve",
    "deploy_local",
    "deploy_model",
    "deploy_search",
    "find_kubeconfig",
    "kubernetes_api",
    "list_search_bundles",
    "live_rollout",
    "patch_inference_service",
    "plan_rollout",
    "prune_search_bundles",
    "prune_unserved_bundles",
    "publish_search_bundle",
    "read_inference_service",
    "search_target",
    "stop_local",
    "traffic_patch",
    "wait_for_ready",
]

logger = logging.getLogger(__name__)

TARGETS = ("local", "kserve")


def deploy_kserve(
    storage_uri: str,
    target: ClusterTarget,
    *,
    api: Any = None,
    dry_run: bool = False,
    canary: bool = True,
) -> RolloutPlan:
    """Create or patch the InferenceService so that ``storage_uri`` goes out.

    KServe ignores ``canaryTrafficPercent`` on a RawDeployment object
    (kserve/kserve#5335), so a canary there is refused; ``canary=False`` replaces
    the model at once instead.

    Args:
        storage_uri: the model version (``s3://<bucket>/models/<name>/<version>``).
        target: the InferenceService.
        api: a ``kubernetes.client.CustomObjectsApi``; default ``kubernetes_api()``.
        dry_run: only compute the plan; the live object is still read.
        canary: ``False`` sends the new version all traffic at once.

    Returns:
        The plan, applied unless ``dry_run``.

    Raises:
        ValueError: a bad ``storage_uri``, a live predictor shopml cannot patch, or
            a canary on a RawDeployment object.
        KubeconfigNotFoundError: no ``api`` given and no cluster configured.
        ClusterAccessError: the API server failed, refused or could not be reached;
            the message names it.
    """
    api = api or kubernetes_api()
    live = read_inference_service(api, target)
    plan = plan_rollout(target, storage_uri, live, canary=canary)
    if plan.canary_uri and plan.action == "patch" and is_raw_deployment(live or {}):
        raise ValueError(
            f"InferenceService {target.namespace}/{target.name} runs as a "
            "RawDeployment, where KServe ignores canaryTrafficPercent "
            "(kserve/kserve#5335): nothing was sent; deploy with --no-canary to "
            "replace the model at once, or switch it to Serverless "
            "(manifests/overlays/prod)"
        )
    if dry_run or not plan.body:
        logger.info(
            "rollout %s isvc=%s/%s action=%s",
            "planned" if dry_run else "skipped",
            target.namespace,
            target.name,
            plan.action,
        )
        return plan

    if plan.action == "create":
        create_inference_service(api, target, plan.body)
    else:
        patch_inference_service(api, target, plan.body)
    logger.info(
        "rollout applied isvc=%s/%s action=%s canary_percent=%s",
        target.namespace,
        target.name,
        plan.action,
        target.canary_percent if plan.canary_uri else 100,
    )
    return plan


def _audit_rollout(
    assets: AssetStore, subject: str, target: ClusterTarget, plan: RolloutPlan
) -> None:
    """Record a rollout (``deploy.rollout``) as the recommender and search both do."""
    audit(
        assets,
        "deploy.rollout",
        subject,
        "unchanged" if plan.action == "unchanged" else "success",
        inferenceservice=f"{target.namespace}/{target.name}",
        rollout=plan.action,
        stable_uri=plan.stable_uri,
        canary_uri=plan.canary_uri,
    )


def deploy_search(
    model_asset: str,
    *,
    cluster: ClusterTarget | None = None,
    api: Any = None,
    assets: AssetStore | None = None,
    index_version: str | None = None,
    keep_bundles: int = SEARCH_BUNDLES_KEPT,
) -> tuple[SearchBundle, RolloutPlan]:
    """Publish the search bundle, roll it out to the ``search`` InferenceService, and
    prune old bundles.

    The bundle goes out with the recommender's canary logic (``deploy_kserve``): the
    first one takes all traffic, a new one gets ``cluster.canary_percent``; promote or
    roll back with ``shopml canary analyze --name search``. The search index version
    used is marked live, like the recommender, so retention keeps it. Then bundles
    beyond the ``keep_bundles`` newest are deleted, except those the live
    InferenceService still routes traffic to (stable and canary) and the one of the
    live models (:func:`shopml.search_bundles.prune_search_bundles`).

    Args:
        model_asset: the recommender being deployed, ``recommender@<version>``.
        cluster: the InferenceService; default :func:`search_target`.
        api: a ``kubernetes.client.CustomObjectsApi``; default ``kubernetes_api()``.
        assets: the asset store; default the one the settings describe (audited).
        index_version: the ``search-index`` version; ``None`` takes the latest.
        keep_bundles: newest bundles kept besides the served ones (at least 1).

    Returns:
        The bundle and the rollout plan applied.

    Raises:
        ValueError: no S3 object store is configured (the cluster reads the bundle
            there), a bad ``model_asset``, or ``keep_bundles`` below 1.
        KeyError: the recommender version or the search index does not exist.
    """
    from shopml.assets import asset_store_from_settings, mark_live
    from shopml.retention import check_keep_last

    settings = load_settings()
    if settings.s3 is None:
        raise ValueError(
            "the search bundle is served from the object store: set SHOPML_S3_ENDPOINT "
            "(MinIO) so the cluster can download it"
        )
    check_keep_last(keep_bundles)
    assets = assets or asset_store_from_settings(settings)
    cluster = cluster or search_target()
    api = api or kubernetes_api()

    bundle = publish_search_bundle(assets, model_asset, index_version)
    storage_uri = f"s3://{settings.s3.bucket}/{bundle.prefix}"
    plan = deploy_kserve(storage_uri, cluster, api=api)
    _audit_rollout(assets, bundle.ref, cluster, plan)
    mark_live(assets, SEARCH_INDEX_ASSET, bundle.index_ref.split("@", 1)[1])

    prune_unserved_bundles(
        cluster, api=api, assets=assets, keep_last=keep_bundles,
        also_served=(storage_uri, plan.stable_uri, plan.canary_uri),
    )  # fmt: skip
    return bundle, plan


def prune_unserved_bundles(
    cluster: ClusterTarget | None = None,
    *,
    api: Any = None,
    assets: AssetStore | None = None,
    keep_last: int = SEARCH_BUNDLES_KEPT,
    dry_run: bool = False,
    also_served: Iterable[str] = (),
) -> list[SearchBundle]:
    """Prune search bundles, reading from the cluster which ones are served.

    Whatever the live ``search`` InferenceService may route traffic to (stable and
    canary) is kept, as are the ``keep_last`` newest bundles and the one of the live
    models (:func:`shopml.search_bundles.prune_search_bundles`).

    Args:
        cluster: the ``search`` InferenceService; default :func:`search_target`.
        api: a ``kubernetes.client.CustomObjectsApi``; default ``kubernetes_api()``.
        assets: the asset store; default the one the settings describe (audited).
        keep_last: newest bundles kept besides the served ones (at least 1).
        dry_run: only say what would be deleted.
        also_served: further storage URIs to keep (a rollout just sent).

    Returns:
        The bundles deleted (or that would be), oldest first.

    Raises:
        ValueError: ``keep_last`` is below 1.
        ClusterAccessError: the live object could not be read (nothing is deleted).
    """
    from shopml.assets import asset_store_from_settings

    cluster = cluster or search_target()
    api = api or kubernetes_api()
    serving = served_uris(read_inference_service(api, cluster)) | set(also_served)
    return prune_search_bundles(
        assets or asset_store_from_settings(load_settings()),
        keep_last=keep_last,
        serving_uris=serving,
        dry_run=dry_run,
    )


def deploy_model(
    model_dir: Path,
    target: str = "local",
    port: int = 0,
    name: str = "recommender",
    *,
    storage_uri: str = "",
    model_asset: str = "",
    cluster: ClusterTarget | None = None,
    api: Any = None,
    search: bool = False,
    keep_search_bundles: int = SEARCH_BUNDLES_KEPT,
) -> str:
    """Deploy a model artifact to a target and return its v1 model URL.

    Args:
        model_dir: the model artifact folder (served locally).
        target: ``local`` (a ModelServer on this machine) or ``kserve`` (a cluster).
        port: HTTP port of a local server; 0 picks a free one.
        name: the model name in the URLs.
        storage_uri: ``kserve`` only: where the cluster finds the model version,
            ``s3://<bucket>/models/<name>/<version>``; derived from ``model_asset``
            when empty.
        model_asset: the model's asset ref (``recommender@<version>``, set by the
            train stage); once served, that version is marked live so retention
            never prunes it.
        cluster: ``kserve`` only: the InferenceService to roll out to; default
            ``ClusterTarget(name=name)``.
        api: ``kserve`` only: a ``kubernetes.client.CustomObjectsApi``; default
            from the kubeconfig or the pod's service account.
        search: ``kserve`` only: also publish the search bundle of ``model_asset``
            and the latest ``search-index`` and roll it out to the ``search``
            InferenceService (:func:`deploy_search`, same namespace and canary
            share). Locally the server is started from the model folder and search
            is not deployed (run ``python -m serving.search`` by hand).
        keep_search_bundles: ``search`` only: newest search bundles kept besides
            the ones still served (:func:`deploy_search`).

    Returns:
        The v1 model URL: ``http://127.0.0.1:<port>/v1/models/<name>`` locally, the
        cluster-internal URL of the InferenceService on ``kserve``.

    Raises:
        ValueError: ``target`` is not one of ``TARGETS``, ``kserve`` without a
            ``storage_uri``, or ``search`` without a ``model_asset``.
        ClusterAccessError: ``kserve`` and the API server failed (it is named).
        KeyError: ``search`` and no ``search-index`` asset in the store.
        DeploymentError: the local server did not become ready.
    """
    if target == "local":
        endpoint = deploy_local(model_dir, port=port, name=name).endpoint
    elif target == "kserve":
        cluster = cluster or ClusterTarget(name=name)
        endpoint = _deploy_cluster(
            storage_uri, model_asset, cluster, api, search, keep_search_bundles
        )
    else:
        raise ValueError(
            f"target={target!r} is not a deploy target; use one of {TARGETS}"
        )
    if model_asset:
        _mark_served(model_asset)
    return endpoint


def _deploy_cluster(
    storage_uri: str,
    model_asset: str,
    cluster: ClusterTarget,
    api: Any,
    search: bool,
    keep_search_bundles: int,
) -> str:
    """Roll out the recommender (and the search bundle); audit each rollout."""
    from shopml.assets import asset_store_from_settings

    storage_uri = storage_uri or _asset_storage_uri(model_asset)
    if search and not model_asset:
        raise ValueError(
            "search=True builds the search bundle from the model asset: pass "
            "model_asset (name@version), got none"
        )
    assets = asset_store_from_settings(load_settings())
    api = api or kubernetes_api()
    if search:
        require_models_asset(assets, SEARCH_INDEX_ASSET, None)  # before any rollout

    plan = deploy_kserve(storage_uri, cluster, api=api)
    _audit_rollout(assets, model_asset or storage_uri, cluster, plan)
    if search:
        target = search_target(
            cluster.canary_percent, cluster.namespace, cluster.deployment_mode
        )
        bundle, _ = deploy_search(
            model_asset, cluster=target, api=api, assets=assets,
            keep_bundles=keep_search_bundles,
        )  # fmt: skip
        logger.info("search bundle=%s at %s", bundle.version, target.endpoint)
    return cluster.endpoint


def _asset_storage_uri(model_asset: str) -> str:
    """``s3://<bucket>/models/<name>/<version>`` of a model asset ref."""
    settings = load_settings()
    if not model_asset or "@" not in model_asset:
        raise ValueError(
            f"target='kserve' needs storage_uri or a model asset ref (name@version), "
            f"got model_asset={model_asset!r}"
        )
    if settings.s3 is None:
        raise ValueError(
            "target='kserve' serves models from the object store: set SHOPML_S3_ENDPOINT "
            "(MinIO) so the model asset lives where the cluster can read it"
        )
    name, version = model_asset.split("@", 1)
    return f"s3://{settings.s3.bucket}/models/{name}/{version}"


def _mark_served(model_asset: str) -> None:
    from shopml.assets import asset_store_from_settings, mark_live

    name, version = model_asset.split("@", 1)
    mark_live(asset_store_from_settings(load_settings()), name, version)


@stage_component
def deploy(
    model: dsl.Input[dsl.Model],
    features: dsl.Input[dsl.Dataset],
    target: str = "local",
    port: int = 0,
    storage_uri: str = "",
    canary_percent: int = 10,
    search: bool = True,
) -> str:
    """Serve the trained model and return its v1 model URL.

    Args:
        model: the model artifact folder from the train stage.
        features: the features stage output; taken only so that the online store is
            materialized before the server reads user histories from it.
        target: ``local`` or ``kserve`` (a canary of the InferenceService).
        port: HTTP port of a local server; 0 picks a free one.
        storage_uri: ``kserve`` only: the model version in the object store.
        canary_percent: ``kserve`` only: the new version's first traffic share.
        search: ``kserve`` only: also roll out the ``search`` InferenceService with a
            bundle of this model and the latest ``search-index`` asset.

    Returns:
        The v1 model URL (append ``:predict``).
    """
    from pathlib import Path

    from components.deploy import ClusterTarget, deploy_model
    from shopml.logs import configure_logging

    configure_logging()
    cluster = ClusterTarget(canary_percent=canary_percent)
    return deploy_model(
        Path(model.path),
        target=target,
        port=port,
        storage_uri=storage_uri,
        model_asset=str(model.metadata.get("asset", "")),
        cluster=cluster if target == "kserve" else None,
        search=search,
    )
