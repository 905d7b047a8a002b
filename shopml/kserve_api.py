"""The Kubernetes API as the deploy stage and canary decisions use it.

``kubernetes_api`` opens a ``CustomObjectsApi`` from the pod's service account or a
kubeconfig (``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``) and tells "nothing is
configured" (:class:`KubeconfigNotFoundError`, the one case where ``shopml deploy
--dry-run`` may print a create without reading the cluster) apart from a configuration
that exists but fails. Every call that fails at the API server raises
:class:`ClusterAccessError` naming the server, the object and what the server said.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shopml.kserve_objects import ISVC_GROUP, ISVC_PLURAL, ISVC_VERSION, ClusterTarget
from shopml.local_serving import DeploymentError

logger = logging.getLogger(__name__)

DEFAULT_KUBECONFIG = Path("~/.kube/config")
_POLL_S = 0.2


class ClusterAccessError(DeploymentError):
    """The Kubernetes API could not be used; the message names the server or file."""


class KubeconfigNotFoundError(ClusterAccessError):
    """No cluster is configured at all: not in a pod and no kubeconfig file exists."""


def find_kubeconfig(kubeconfig: str | None = None) -> str | None:
    """The kubeconfig to read, as the ``kubernetes`` client accepts it.

    Args:
        kubeconfig: an explicit file; ``None`` looks at ``$KUBECONFIG`` (a
            ``:``-separated list; missing files are skipped, as kubectl does) and
            then at ``~/.kube/config``.

    Returns:
        The file (or list of files), or ``None`` when none exists.

    Raises:
        FileNotFoundError: the explicit ``kubeconfig`` does not exist.
    """
    if kubeconfig is not None:
        if not Path(kubeconfig).expanduser().is_file():
            raise FileNotFoundError(f"kubeconfig {kubeconfig}: no such file")
        return kubeconfig
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        existing = [p for p in listed if Path(p).expanduser().is_file()]
        return os.pathsep.join(existing) if existing else None
    default = DEFAULT_KUBECONFIG.expanduser()
    return str(default) if default.is_file() else None


def kubernetes_api(kubeconfig: str | None = None, context: str | None = None) -> Any:
    """A ``CustomObjectsApi`` from the pod's service account or a kubeconfig.

    Args:
        kubeconfig: kubeconfig file; ``None`` tries the pod's service account first,
            then ``$KUBECONFIG`` / ``~/.kube/config``.
        context: kubeconfig context; ``None`` for the current one.

    Raises:
        KubeconfigNotFoundError: not in a pod and no kubeconfig file exists.
        FileNotFoundError: the explicit ``kubeconfig`` does not exist.
        ClusterAccessError: the kubeconfig exists but cannot be used (bad file,
            unknown context).
    """
    from kubernetes import client, config

    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.CustomObjectsApi()
        except config.ConfigException:
            logger.debug("not in a pod; looking for a kubeconfig")
    path = find_kubeconfig(kubeconfig)
    if path is None:
        raise KubeconfigNotFoundError(
            "no kubeconfig found: not in a pod, $KUBECONFIG names no existing file and "
            f"{DEFAULT_KUBECONFIG} does not exist; pass --kubeconfig FILE"
        )
    try:
        api_client = config.new_client_from_config(config_file=path, context=context)
    except config.ConfigException as err:
        raise ClusterAccessError(
            f"kubeconfig {path} (context {context or 'current'}) is not usable: {err}"
        ) from err
    return client.CustomObjectsApi(api_client)


def api_server(api: Any) -> str:
    """The API server URL ``api`` talks to (``https://host:port``)."""
    try:
        return str(api.api_client.configuration.host)
    except AttributeError:
        return "(unknown API server)"


@contextlib.contextmanager
def _cluster_errors(api: Any, doing: str) -> Iterator[None]:
    """Turn an API or connection failure into a ``ClusterAccessError`` naming both."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as err:
        raise ClusterAccessError(
            f"the Kubernetes API server {api_server(api)} answered {err.status} "
            f"{err.reason} {doing}"
        ) from err
    except HTTPError as err:
        reason = getattr(err, "reason", None) or err  # MaxRetryError wraps the cause
        raise ClusterAccessError(
            f"the Kubernetes API server {api_server(api)} could not be reached "
            f"{doing}: {reason}"
        ) from err


def read_inference_service(api: Any, target: ClusterTarget) -> dict[str, Any] | None:
    """The live InferenceService, or ``None`` when it does not exist.

    Raises:
        ClusterAccessError: the server failed or could not be reached (anything but
            404 Not Found).
    """
    from kubernetes.client.exceptions import ApiException

    doing = f"reading InferenceService {target.namespace}/{target.name}"
    with _cluster_errors(api, doing):
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


def create_inference_service(
    api: Any, target: ClusterTarget, body: dict[str, Any]
) -> dict[str, Any]:
    """Create the InferenceService and return it as stored.

    Raises:
        ClusterAccessError: the server refused or could not be reached.
    """
    doing = f"creating InferenceService {target.namespace}/{target.name}"
    with _cluster_errors(api, doing):
        return dict(
            api.create_namespaced_custom_object(
                ISVC_GROUP, ISVC_VERSION, target.namespace, ISVC_PLURAL, body
            )
        )


def patch_inference_service(
    api: Any, target: ClusterTarget, body: dict[str, Any]
) -> dict[str, Any]:
    """Merge-patch the InferenceService and return it as stored.

    Raises:
        ClusterAccessError: the server refused or could not be reached.
    """
    doing = f"patching InferenceService {target.namespace}/{target.name}"
    with _cluster_errors(api, doing):
        return dict(
            api.patch_namespaced_custom_object(
                ISVC_GROUP,
                ISVC_VERSION,
                target.namespace,
                ISVC_PLURAL,
                target.name,
                body,
            )
        )


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
