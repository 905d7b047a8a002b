"""The Kubernetes API as the deploy stage and canary decisions use it.

``kubernetes_api`` opens a ``CustomObjectsApi`` from the pod's service account or a
kubeconfig (``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``) and tells "nothing is
configured" (:class:`KubeconfigNotFoundError`, the one case where ``shopml deploy
--dry-run`` may print a create without reading the cluster) apart from a configuration
that exists but fails. Every call that fails at the API server raises
:class:`ClusterAccessError` naming the server, the object and what the server said.
Every call is bounded by a connect and a read timeout (``timeout_s`` of
:func:`kubernetes_api`, default :data:`DEFAULT_TIMEOUT_S`) and is not retried, so a
server that accepts connections and never answers fails in that time.
"""

from __future__ import annotations

import contextlib
import json
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
# Seconds each API call may take to connect, and then to answer.
DEFAULT_TIMEOUT_S = 10.0
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
        ClusterAccessError: ``kubeconfig`` or an entry of ``$KUBECONFIG`` exists but
            is not a file (a directory).
    """
    if kubeconfig is not None:
        _refuse_non_file("--kubeconfig", kubeconfig)
        if not Path(kubeconfig).expanduser().is_file():
            raise FileNotFoundError(f"kubeconfig {kubeconfig}: no such file")
        return kubeconfig
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    for entry in listed:
        _refuse_non_file("$KUBECONFIG", entry)
    if listed:
        existing = [p for p in listed if Path(p).expanduser().is_file()]
        return os.pathsep.join(existing) if existing else None
    default = DEFAULT_KUBECONFIG.expanduser()
    return str(default) if default.is_file() else None


def _refuse_non_file(source: str, entry: str) -> None:
    path = Path(entry).expanduser()
    if path.exists() and not path.is_file():
        raise ClusterAccessError(
            f"{source} names {entry}, which is not a kubeconfig file (a directory?); "
            "point it at the file itself"
        )


def kubernetes_api(
    kubeconfig: str | None = None,
    context: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Any:
    """A ``CustomObjectsApi`` from the pod's service account or a kubeconfig.

    Args:
        kubeconfig: kubeconfig file; ``None`` tries the pod's service account first,
            then ``$KUBECONFIG`` / ``~/.kube/config``.
        context: kubeconfig context; ``None`` for the current one.
        timeout_s: connect and read timeout of every call made through it; calls
            are not retried.

    Raises:
        KubeconfigNotFoundError: not in a pod and no kubeconfig file exists.
        FileNotFoundError: the explicit ``kubeconfig`` does not exist.
        ClusterAccessError: the kubeconfig exists but cannot be used (bad file,
            unknown context).
    """
    import yaml
    from kubernetes import client, config

    configuration = client.Configuration()
    configuration.retries = False  # one try: urllib3 would retry 3 times, warning
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            api = client.CustomObjectsApi(client.ApiClient(configuration))
            return _with_timeout(api, timeout_s)
        except config.ConfigException:
            logger.debug("not in a pod; looking for a kubeconfig")
    path = find_kubeconfig(kubeconfig)
    if path is None:
        raise KubeconfigNotFoundError(
            "no kubeconfig found: not in a pod, $KUBECONFIG names no existing file and "
            f"{DEFAULT_KUBECONFIG} does not exist; pass --kubeconfig FILE"
        )
    try:
        config.load_kube_config(
            config_file=path, context=context, client_configuration=configuration
        )
    except (config.ConfigException, yaml.YAMLError, TypeError, AttributeError) as err:
        # A file that is YAML but no kubeconfig (a list, a string) gives TypeError
        # or AttributeError inside the loader.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ClusterAccessError(
            f"kubeconfig {path} (context {context or 'current'}) is not usable: "
            f"{type(err).__name__}: {first_line}"
        ) from err
    api = client.CustomObjectsApi(client.ApiClient(configuration))
    return _with_timeout(api, timeout_s)


def _with_timeout(api: Any, timeout_s: float) -> Any:
    """Record on ``api`` the timeout every call of this module passes."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive")
    api.shopml_timeout_s = float(timeout_s)
    return api


def request_timeout(api: Any) -> tuple[float, float]:
    """``(connect, read)`` timeout for a call through ``api``."""
    timeout_s = float(getattr(api, "shopml_timeout_s", DEFAULT_TIMEOUT_S))
    return (timeout_s, timeout_s)


def api_server(api: Any) -> str:
    """The API server URL ``api`` talks to (``https://host:port``)."""
    try:
        return str(api.api_client.configuration.host)
    except AttributeError:
        return "(unknown API server)"


def _status_message(err: Any) -> str:
    """The ``message`` of the Kubernetes ``Status`` an error answer carries, or ``""``."""
    try:
        status = json.loads(err.body or "")
    except (TypeError, ValueError):
        return ""
    return str(status.get("message", "")) if isinstance(status, dict) else ""


@contextlib.contextmanager
def _cluster_errors(api: Any, doing: str) -> Iterator[None]:
    """Turn an API or connection failure into a ``ClusterAccessError`` naming both."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError
    from urllib3.exceptions import TimeoutError as RequestTimeoutError

    try:
        yield
    except ApiException as err:
        message = _status_message(err)
        raise ClusterAccessError(
            f"the Kubernetes API server {api_server(api)} answered {err.status} "
            f"{err.reason} {doing}" + (f": {message}" if message else "")
        ) from err
    except HTTPError as err:
        reason = getattr(err, "reason", None) or err  # MaxRetryError wraps the cause
        if isinstance(reason, RequestTimeoutError) or isinstance(
            err, RequestTimeoutError
        ):
            raise ClusterAccessError(
                f"the Kubernetes API server {api_server(api)} did not answer within "
                f"{request_timeout(api)[1]:.0f} s {doing} (pass a longer --timeout if "
                "it is only slow)"
            ) from err
        raise ClusterAccessError(
            f"the Kubernetes API server {api_server(api)} could not be reached "
            f"{doing}: {reason}"
        ) from err


def _as_object(api: Any, doing: str, answer: Any) -> dict[str, Any]:
    """The answer as a Kubernetes object; an error naming the server otherwise."""
    if isinstance(answer, dict):
        return answer
    shown = str(answer)[:80].replace("\n", " ")
    raise ClusterAccessError(
        f"the Kubernetes API server {api_server(api)} answered {doing} with something "
        f"that is not a Kubernetes object: {shown!r}; is it an API server?"
    )


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
            answer = api.get_namespaced_custom_object(
                ISVC_GROUP, ISVC_VERSION, target.namespace, ISVC_PLURAL, target.name,
                _request_timeout=request_timeout(api),
            )  # fmt: skip
        except ApiException as err:
            if err.status == 404:
                return None
            raise
    return _as_object(api, doing, answer)


def create_inference_service(
    api: Any, target: ClusterTarget, body: dict[str, Any]
) -> dict[str, Any]:
    """Create the InferenceService and return it as stored.

    Raises:
        ClusterAccessError: the server refused or could not be reached.
    """
    doing = f"creating InferenceService {target.namespace}/{target.name}"
    with _cluster_errors(api, doing):
        answer = api.create_namespaced_custom_object(
            ISVC_GROUP, ISVC_VERSION, target.namespace, ISVC_PLURAL, body,
            _request_timeout=request_timeout(api),
        )  # fmt: skip
    return _as_object(api, doing, answer)


def patch_inference_service(
    api: Any, target: ClusterTarget, body: dict[str, Any]
) -> dict[str, Any]:
    """Merge-patch the InferenceService and return it as stored.

    Raises:
        ClusterAccessError: the server refused or could not be reached.
    """
    doing = f"patching InferenceService {target.namespace}/{target.name}"
    with _cluster_errors(api, doing):
        answer = api.patch_namespaced_custom_object(
            ISVC_GROUP, ISVC_VERSION, target.namespace, ISVC_PLURAL, target.name, body,
            _request_timeout=request_timeout(api),
        )  # fmt: skip
    return _as_object(api, doing, answer)


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
