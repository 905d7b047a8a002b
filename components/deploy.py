"""Deploy stage: serve a model locally with KServe's ModelServer, or roll it out to a
cluster as a KServe ``InferenceService`` canary.

Locally, ``deploy_local`` starts ``python -m serving`` as a detached process on
127.0.0.1 (it outlives the pipeline task that started it), waits until
``GET /v1/models/<name>`` reports the model ready, and records the server in
``$SHOPML_HOME/runs/server.json``; ``stop_local`` ends it.

On a cluster, ``deploy_kserve`` reads the live ``InferenceService`` through the
``kubernetes`` client and creates it (the first model takes all traffic) or merge-patches
it: the new ``storageUri`` with ``canaryTrafficPercent`` set, so KServe routes that share
to the new revision and the rest to the previous one. Objects and patches are built with
the ``kserve`` SDK's typed models (``V1beta1InferenceService``, ...). Rollout state lives
in annotations (``shopml.io/stable-storage-uri``, ``shopml.io/canary-storage-uri``,
``shopml.io/rollout-decision``) so that every later step (a new canary, promote,
rollback: ``traffic_patch``, used by :mod:`shopml.canary`) is computed from the live
object alone; repeating a step changes nothing. ``deploy_model`` picks the target;
``deploy`` below is the thin KFP component around it.

The ``search`` InferenceService (runtime ``shopml-search``: ``python -m serving.search``
serves ``search`` and ``recommender`` in one process) reads a *search bundle*:
``publish_search_bundle`` copies the recommender version being deployed into
``serving/search/<bundle>/model/`` and the latest ``search-index`` asset into
``.../index/``, ``<bundle>`` being a hash of both refs, so publishing the same pair
twice writes nothing. ``deploy_search`` publishes it and rolls it out with the same
canary logic as the recommender; both rollouts are recorded in the audit log.

The module runs past 500 lines because the local server, the cluster rollout and the
search bundle are the parts of one stage and share its result type.
"""

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from kfp import dsl

from components.common import stage_component
from shopml.assets import AssetStore, AssetVersion
from shopml.config import load_settings

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
TARGETS = ("local", "kserve")
# Lines of the server log quoted when it dies or never gets ready.
LOG_TAIL_LINES = 40
_POLL_S = 0.2


class DeploymentError(RuntimeError):
    """The model server exited or did not become ready; the message quotes its log."""


@dataclass(frozen=True)
class LocalDeployment:
    """A model server running on this machine.

    Attributes:
        url: the server's root URL, ``http://127.0.0.1:<port>``.
        port: its HTTP port.
        pid: its process id (leader of its own session).
        name: the model name in the URLs.
        log_path: the file that receives the server's stdout and stderr.
        process: the process handle when this process started it, for a clean wait.
    """

    url: str
    port: int
    pid: int
    name: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def endpoint(self) -> str:
        """The v1 model URL, ``<url>/v1/models/<name>`` (append ``:predict``)."""
        return f"{self.url}/v1/models/{self.name}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _log_tail(log_path: Path, n_lines: int = LOG_TAIL_LINES) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"(log {log_path} unreadable: {err})"
    return "\n".join(lines[-n_lines:])


def _is_ready(url: str, name: str) -> bool:
    try:
        response = httpx.get(f"{url}/v1/models/{name}", timeout=2.0)
    except httpx.TransportError:
        return False
    return response.status_code == 200 and response.json().get("ready") is True


def _wait_ready(
    process: subprocess.Popen[bytes],
    url: str,
    name: str,
    log_path: Path,
    timeout_s: float,
) -> None:
    """Poll readiness until the model is ready, the process exits, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = process.poll()
        if status is not None:
            raise DeploymentError(
                f"model server for {name!r} exited with status {status} before it was "
                f"ready; last lines of {log_path}:\n{_log_tail(log_path)}"
            )
        if _is_ready(url, name):
            return
        time.sleep(_POLL_S)

    _terminate(process.pid, process, timeout_s=10.0)
    raise DeploymentError(
        f"model server for {name!r} at {url} was not ready after {timeout_s:.0f} s and "
        f"was stopped; last lines of {log_path}:\n{_log_tail(log_path)}"
    )


def _server_command(
    model_dir: Path,
    port: int,
    name: str,
    use_feature_store: bool,
    extra_args: Sequence[str] = (),
) -> list[str]:
    command = [
        sys.executable, "-m", "serving", "--model-dir", str(model_dir),
        "--model-name", name, "--http-port", str(port), "--host", LOOPBACK,
    ]  # fmt: skip
    if not use_feature_store:
        command.append("--no-feature-store")
    return [*command, *extra_args]


def deploy_local(
    model_dir: Path,
    *,
    port: int = 0,
    name: str = "recommender",
    log_path: Path | None = None,
    timeout_s: float = 60,
    use_feature_store: bool = True,
    extra_args: Sequence[str] = (),
) -> LocalDeployment:
    """Start the recommender server on 127.0.0.1 and wait until the model is Ready.

    The server runs detached (its own session), so it outlives the caller; stop it with
    :func:`stop_local`. It reads the same ``SHOPML_*`` settings as the caller.

    Args:
        model_dir: the model artifact folder.
        port: HTTP port; 0 picks a free one.
        name: the model name in the URLs.
        log_path: where the server logs go; default
            ``$SHOPML_HOME/logs/server-<name>-<port>.log``.
        timeout_s: how long to wait for readiness.
        use_feature_store: read user histories from the online store; ``False`` serves
            only requests that send ``item_ids``.
        extra_args: further ``python -m serving`` options (``--catalog``,
            ``--max-in-flight``, ...).

    Returns:
        The running deployment.

    Raises:
        DeploymentError: the server exited, or was not ready within ``timeout_s`` (it is
            stopped then); the message quotes the end of its log.
    """
    settings = load_settings()
    port = port or _free_port()
    log_path = log_path or settings.home / "logs" / f"server-{name}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://{LOOPBACK}:{port}"

    started = time.monotonic()
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            _server_command(
                Path(model_dir).resolve(), port, name, use_feature_store, extra_args
            ),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_ready(process, url, name, log_path, timeout_s)

    deployment = LocalDeployment(url, port, process.pid, name, log_path, process)
    _write_server_record(settings.home / "runs" / "server.json", deployment, model_dir)
    logger.info(
        "model server ready model=%s url=%s pid=%d seconds=%.1f log=%s",
        name,
        deployment.endpoint,
        process.pid,
        time.monotonic() - started,
        log_path,
    )
    return deployment


def _write_server_record(
    path: Path, deployment: LocalDeployment, model_dir: Path
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "url": deployment.url,
        "endpoint": deployment.endpoint,
        "pid": deployment.pid,
        "port": deployment.port,
        "name": deployment.name,
        "model_dir": str(Path(model_dir).resolve()),
        "log_path": str(deployment.log_path),
    }
    path.write_text(json.dumps(record, indent=2))


def _is_model_server(pid: int) -> bool:
    """Whether ``pid`` runs ``python -m serving`` (guards against a recycled pid)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.parent.is_dir():
        return True  # no /proc on this system: trust the caller
    try:
        arguments = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serving" in arguments


def _has_exited(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == pid
    except ChildProcessError:
        pass  # not our child: it is reaped elsewhere, so ask whether it still exists
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_exit(
    pid: int, process: subprocess.Popen[bytes] | None, timeout_s: float
) -> bool:
    """Wait until the process has exited (and is reaped when it is our child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return True
        if process is None and _has_exited(pid):
            return True
        time.sleep(0.05)
    return False


def _terminate(
    pid: int, process: subprocess.Popen[bytes] | None, timeout_s: float
) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL."""
    if process is not None and process.poll() is not None:
        return  # already exited, and now reaped
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if _wait_exit(pid, process, timeout_s):
        return

    logger.warning(
        "model server pid=%d ignored SIGTERM for %.0f s; killing it", pid, timeout_s
    )
    os.kill(pid, signal.SIGKILL)
    _wait_exit(pid, process, 5.0)


def stop_local(deployment_or_pid: LocalDeployment | int, timeout_s: float = 15) -> None:
    """Stop a local model server: SIGTERM, wait, and SIGKILL if it does not exit.

    Args:
        deployment_or_pid: the deployment, or the pid recorded in ``server.json``.
        timeout_s: how long to wait after SIGTERM.
    """
    if isinstance(deployment_or_pid, LocalDeployment):
        pid, process = deployment_or_pid.pid, deployment_or_pid.process
    else:
        pid, process = int(deployment_or_pid), None

    if process is None and not _is_model_server(pid):
        logger.warning("pid=%d is not a running model server; nothing to stop", pid)
        return
    started = time.monotonic()
    _terminate(pid, process, timeout_s)
    logger.info(
        "model server stopped pid=%d seconds=%.1f", pid, time.monotonic() - started
    )


# --- a cluster: the InferenceService and its canary ---------------------------------

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
        cpu_request: CPU request of the model container when this module creates the
            InferenceService (as in manifests/base/serving); patches leave the
            resources an overlay set untouched.
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
    """What ``deploy_kserve`` does to the cluster, or would do on a dry run.

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

    An object this module did not create is read as stable on its ``storageUri``.
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


def kubernetes_api(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``CustomObjectsApi`` from a kubeconfig, or the pod's service account.

    Args:
        kubeconfig: kubeconfig file; ``None`` tries the pod's service account first,
            then ``$KUBECONFIG`` / ``~/.kube/config``.
        context: kubeconfig context; ``None`` for the current one.

    Raises:
        kubernetes.config.ConfigException: no usable configuration was found.
    """
    from kubernetes import client, config

    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.CustomObjectsApi()
        except config.ConfigException:
            pass
    api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
    return client.CustomObjectsApi(api_client)


def read_inference_service(api: Any, target: ClusterTarget) -> dict[str, Any] | None:
    """The live InferenceService, or ``None`` when it does not exist."""
    from kubernetes.client.exceptions import ApiException

    try:
        return dict(
            api.get_namespaced_custom_object(
                ISVC_GROUP, ISVC_VERSION, target.namespace, ISVC_PLURAL, target.name
            )
        )
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def patch_inference_service(
    api: Any, target: ClusterTarget, body: dict[str, Any]
) -> dict[str, Any]:
    """Merge-patch the InferenceService and return it as stored."""
    return dict(
        api.patch_namespaced_custom_object(
            ISVC_GROUP, ISVC_VERSION, target.namespace, ISVC_PLURAL, target.name, body
        )
    )


def deploy_kserve(
    storage_uri: str,
    target: ClusterTarget,
    *,
    api: Any = None,
    dry_run: bool = False,
) -> RolloutPlan:
    """Create or patch the InferenceService so that ``storage_uri`` goes out.

    Args:
        storage_uri: the model version (``s3://<bucket>/models/<name>/<version>``).
        target: the InferenceService.
        api: a ``kubernetes.client.CustomObjectsApi``; default ``kubernetes_api()``.
        dry_run: only compute the plan; the live object is still read.

    Returns:
        The plan, applied unless ``dry_run``.

    Raises:
        kubernetes.client.exceptions.ApiException: the API server refused.
    """
    api = api or kubernetes_api()
    live = read_inference_service(api, target)
    plan = plan_rollout(target, storage_uri, live)
    if dry_run or plan.action == "unchanged":
        logger.info(
            "rollout %s isvc=%s/%s action=%s",
            "planned" if dry_run else "skipped",
            target.namespace,
            target.name,
            plan.action,
        )
        return plan

    if plan.action == "create":
        api.create_namespaced_custom_object(
            ISVC_GROUP, ISVC_VERSION, target.namespace, ISVC_PLURAL, plan.body
        )
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


def wait_for_ready(
    api: Any, target: ClusterTarget, timeout_s: float = 300
) -> dict[str, Any]:
    """Poll the InferenceService until its Ready condition is True.

    Returns:
        The ready object.

    Raises:
        DeploymentError: not Ready within ``timeout_s``; the message quotes the last
            conditions.
    """
    deadline = time.monotonic() + timeout_s
    conditions: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        live = read_inference_service(api, target) or {}
        conditions = (live.get("status") or {}).get("conditions") or []
        if any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
        ):
            return live
        time.sleep(_POLL_S)
    raise DeploymentError(
        f"InferenceService {target.namespace}/{target.name} was not Ready after "
        f"{timeout_s:.0f} s; conditions: {conditions}"
    )


# --- the search InferenceService and its bundle ---------------------------------------

SEARCH_INDEX_ASSET = "search-index"
SEARCH_BUNDLE_PREFIX = "serving/search"
BUNDLE_MODEL_DIR = "model"
BUNDLE_INDEX_DIR = "index"
BUNDLE_RECORD = "bundle.json"
_BUNDLE_CHARS = 16


def search_target(canary_percent: int = 10, namespace: str = "shopml") -> ClusterTarget:
    """The ``search`` InferenceService (manifests/base/serving) as a rollout target."""
    return ClusterTarget(
        name="search",
        namespace=namespace,
        runtime="shopml-search",
        model_format="shopml-search",
        canary_percent=canary_percent,
    )


@dataclass(frozen=True)
class SearchBundle:
    """A search bundle in the object store: what the ``search`` predictor downloads.

    Attributes:
        version: 16 hex characters of the sha256 of ``model_ref`` and ``index_ref``.
        model_ref: the recommender, ``recommender@<version>`` (folder ``model/``).
        index_ref: the search index, ``search-index@<version>`` (folder ``index/``).
        published: whether this call wrote it (``False``: it was already there).
    """

    version: str
    model_ref: str
    index_ref: str
    published: bool

    @property
    def prefix(self) -> str:
        """Key prefix of the bundle, ``serving/search/<version>`` (no trailing ``/``)."""
        return f"{SEARCH_BUNDLE_PREFIX}/{self.version}"

    @property
    def ref(self) -> str:
        """``search-bundle@<version>``, the name the audit log records."""
        return f"search-bundle@{self.version}"


def bundle_version(model_ref: str, index_ref: str) -> str:
    """The bundle version of a recommender ref and a search index ref."""
    digest = hashlib.sha256(f"{model_ref}\0{index_ref}".encode())
    return digest.hexdigest()[:_BUNDLE_CHARS]


def _models_asset(assets: AssetStore, name: str, version: str | None) -> AssetVersion:
    """A version of a ``models``-zone asset; a clear error when there is none."""
    try:
        asset = assets.get(name, version)
    except KeyError as err:
        raise KeyError(
            f"the search bundle needs asset {name!r}"
            f"{'@' + version if version else ''}: {err.args[0]}; run the stage that "
            "stores it (train, search_index) first, or deploy without search"
        ) from err
    if asset.zone != "models":
        raise ValueError(f"asset {asset.ref} is in zone {asset.zone!r}, not 'models'")
    return asset


def publish_search_bundle(
    assets: AssetStore, model_ref: str, index_version: str | None = None
) -> SearchBundle:
    """Copy a recommender version and a search index into one search bundle.

    Files are read through the asset store (each checked against its manifest and the
    read audited) and written under ``serving/search/<bundle>/model/`` and
    ``.../index/``; ``bundle.json`` (both refs) is written last, so a bundle exists
    once its record does, and an existing bundle is not written again.

    Args:
        assets: the asset store.
        model_ref: the recommender, ``recommender@<version>``.
        index_version: the ``search-index`` version; ``None`` takes the latest.

    Returns:
        The bundle.

    Raises:
        ValueError: ``model_ref`` is not ``name@version``, or an asset is not a model.
        KeyError: the recommender version or the search index does not exist.
    """
    if "@" not in model_ref:
        raise ValueError(f"model_ref={model_ref!r} must be a ref, name@version")
    name, version = model_ref.split("@", 1)
    model = _models_asset(assets, name, version)
    index = _models_asset(assets, SEARCH_INDEX_ASSET, index_version)
    bundle = SearchBundle(
        bundle_version(model.ref, index.ref), model.ref, index.ref, True
    )
    if assets.store.exists(f"{bundle.prefix}/{BUNDLE_RECORD}"):
        logger.info("search bundle=%s unchanged; nothing written", bundle.version)
        _audit(assets, "deploy.bundle", bundle.ref, "unchanged")
        return replace(bundle, published=False)

    with tempfile.TemporaryDirectory(prefix="shopml-bundle-") as tmp:
        for folder, asset in ((BUNDLE_MODEL_DIR, model), (BUNDLE_INDEX_DIR, index)):
            local = Path(tmp) / folder
            assets.fetch_dir(asset.name, asset.version, local)
            for entry in asset.files:
                key = f"{bundle.prefix}/{folder}/{entry['name']}"
                assets.store.put_file(key, local / entry["name"])
    record = {"model": model.ref, "index": index.ref, "version": bundle.version}
    assets.store.put_bytes(
        f"{bundle.prefix}/{BUNDLE_RECORD}", json.dumps(record, indent=2).encode()
    )
    n_files = len(model.files) + len(index.files)
    logger.info(
        "search bundle=%s published model=%s index=%s files=%d",
        bundle.version, model.ref, index.ref, n_files,
    )  # fmt: skip
    _audit(
        assets, "deploy.bundle", bundle.ref, "success",
        model=model.ref, index=index.ref, files=n_files,
    )  # fmt: skip
    return bundle


def _audit(
    assets: AssetStore, action: str, subject: str, outcome: str, **details: Any
) -> None:
    if assets.audit is not None:
        assets.audit.record(None, action, subject, outcome, **details)


def _audit_rollout(
    assets: AssetStore, subject: str, target: ClusterTarget, plan: RolloutPlan
) -> None:
    """Record a rollout (``deploy.rollout``) as the recommender and search both do."""
    _audit(
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
) -> tuple[SearchBundle, RolloutPlan]:
    """Publish the search bundle and roll it out to the ``search`` InferenceService.

    The bundle goes out with the recommender's canary logic (``deploy_kserve``): the
    first one takes all traffic, a new one gets ``cluster.canary_percent``; promote or
    roll back with ``shopml canary analyze --name search``. The search index version
    used is marked live, like the recommender, so retention keeps it.

    Args:
        model_asset: the recommender being deployed, ``recommender@<version>``.
        cluster: the InferenceService; default :func:`search_target`.
        api: a ``kubernetes.client.CustomObjectsApi``; default ``kubernetes_api()``.
        assets: the asset store; default the one the settings describe (audited).
        index_version: the ``search-index`` version; ``None`` takes the latest.

    Returns:
        The bundle and the rollout plan applied.

    Raises:
        ValueError: no S3 object store is configured (the cluster reads the bundle
            there), or a bad ``model_asset``.
        KeyError: the recommender version or the search index does not exist.
    """
    from shopml.assets import asset_store_from_settings, mark_live

    settings = load_settings()
    if settings.s3 is None:
        raise ValueError(
            "the search bundle is served from the object store: set SHOPML_S3_ENDPOINT "
            "(MinIO) so the cluster can download it"
        )
    assets = assets or asset_store_from_settings(settings)
    cluster = cluster or search_target()

    bundle = publish_search_bundle(assets, model_asset, index_version)
    storage_uri = f"s3://{settings.s3.bucket}/{bundle.prefix}"
    plan = deploy_kserve(storage_uri, cluster, api=api)
    _audit_rollout(assets, bundle.ref, cluster, plan)
    mark_live(assets, SEARCH_INDEX_ASSET, bundle.index_ref.split("@", 1)[1])
    return bundle, plan


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

    Returns:
        The v1 model URL: ``http://127.0.0.1:<port>/v1/models/<name>`` locally, the
        cluster-internal URL of the InferenceService on ``kserve``.

    Raises:
        ValueError: ``target`` is not one of ``TARGETS``, ``kserve`` without a
            ``storage_uri``, or ``search`` without a ``model_asset``.
        KeyError: ``search`` and no ``search-index`` asset in the store.
        DeploymentError: the local server did not become ready.
    """
    if target == "local":
        endpoint = deploy_local(model_dir, port=port, name=name).endpoint
    elif target == "kserve":
        cluster = cluster or ClusterTarget(name=name)
        endpoint = _deploy_cluster(storage_uri, model_asset, cluster, api, search)
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
    if search:
        _models_asset(assets, SEARCH_INDEX_ASSET, None)  # fail before any rollout

    plan = deploy_kserve(storage_uri, cluster, api=api)
    _audit_rollout(assets, model_asset or storage_uri, cluster, plan)
    if search:
        target = search_target(cluster.canary_percent, cluster.namespace)
        bundle, _ = deploy_search(model_asset, cluster=target, api=api, assets=assets)
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
