"""Typed settings for every shopml process, read once from the environment.

Local runs need no configuration: everything lives under ``SHOPML_HOME`` (default
``./.shopml``). A cluster points the same code at MinIO and Redis through the variables
below, normally set from a ConfigMap and a Secret by the manifests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_IMAGE = "ghcr.io/shopml/shopml:0.1.0"


@dataclass(frozen=True)
class S3Settings:
    """Connection to an S3-compatible object store (MinIO on a cluster).

    Attributes:
        endpoint: ``host:port`` of the server, without scheme.
        bucket: bucket that holds every asset zone.
        access_key: access key id (from a Secret, never from the repo).
        secret_key: secret key (from a Secret, never from the repo).
        secure: use TLS.
        region: region name sent to the server.
    """

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    secure: bool = False
    region: str = "us-east-1"

    @property
    def endpoint_url(self) -> str:
        """The endpoint with its scheme, as s3fs, pyarrow and Feast expect it."""
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.endpoint}"


@dataclass(frozen=True)
class Settings:
    """Where shopml keeps its state and which services it talks to.

    Attributes:
        home: local working folder: the object store (when no S3 is set), the Feast
            registry and SQLite online store, logs and keys of local runs.
        s3: the S3/MinIO object store; ``None`` keeps assets in ``home/store``.
        redis_url: Feast online store on Redis (``redis://host:port/db``); ``None``
            uses SQLite in ``home/feast``.
        pseudonymization_key: secret for the keyed hash of user identifiers; when
            unset, local runs create one in ``home/secrets`` (never in the repo).
        image: container image that runs the pipeline components on Kubeflow.
        progress: show progress bars (pipeline runs switch them off).
        dask_address: scheduler of a Dask cluster (``tcp://host:8786``) that runs the
            data stages; ``None`` runs the same Dask graph in-process.
        dask_work_dir: folder for the clean stage's event buckets
            (``SHOPML_DASK_WORK_DIR``); with a Dask cluster, a shared (ReadWriteMany)
            volume mounted at this path in the stage's pod and every worker; ``None``
            uses a temporary folder.
        feast_batch_engine: Feast compute engine that materializes features:
            ``local`` (in-process), ``k8s`` (Kubernetes Jobs, cluster runs) or
            ``ray`` (Feast's Ray engine on ``ray_address``).
        ray_address: Ray cluster of the ``ray`` engine, as a Ray Client address
            (``ray://host:10001``, a KubeRay head Service); ``None`` starts an
            in-process Ray (Ray 2.58 listens on every interface whatever it is
            told; tests run it in a loopback-only network namespace).
    """

    home: Path
    s3: S3Settings | None = None
    redis_url: str | None = None
    pseudonymization_key: str | None = field(default=None, repr=False)
    image: str = DEFAULT_IMAGE
    progress: bool = True
    dask_address: str | None = None
    dask_work_dir: Path | None = None
    feast_batch_engine: str = "local"
    ray_address: str | None = None

    @property
    def store_root(self) -> Path:
        """Local object-store folder used when no S3 endpoint is configured."""
        return self.home / "store"

    @property
    def feast_dir(self) -> Path:
        """Folder for the Feast registry and the SQLite online store of local runs."""
        return self.home / "feast"


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(
        f"{name}={raw!r} is not a boolean; use one of 1/0, true/false, yes/no"
    )


def load_settings() -> Settings:
    """Read settings from ``SHOPML_*`` environment variables.

    Returns:
        The settings; S3 is configured only when ``SHOPML_S3_ENDPOINT`` is set.

    Raises:
        ValueError: a variable has a value that cannot be used, or S3 is half set up.
    """
    home = Path(os.environ.get("SHOPML_HOME") or ".shopml").expanduser().resolve()

    s3: S3Settings | None = None
    endpoint = os.environ.get("SHOPML_S3_ENDPOINT")
    if endpoint:
        if "://" in endpoint:
            raise ValueError(
                f"SHOPML_S3_ENDPOINT={endpoint!r} must be host:port without a scheme; "
                "set SHOPML_S3_SECURE=1 for TLS"
            )
        access = os.environ.get("SHOPML_S3_ACCESS_KEY") or os.environ.get(
            "AWS_ACCESS_KEY_ID"
        )
        secret = os.environ.get("SHOPML_S3_SECRET_KEY") or os.environ.get(
            "AWS_SECRET_ACCESS_KEY"
        )
        if not access or not secret:
            raise ValueError(
                "SHOPML_S3_ENDPOINT is set but SHOPML_S3_ACCESS_KEY/SHOPML_S3_SECRET_KEY "
                "(or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) are not"
            )
        s3 = S3Settings(
            endpoint=endpoint,
            bucket=os.environ.get("SHOPML_S3_BUCKET", "shopml"),
            access_key=access,
            secret_key=secret,
            secure=_flag("SHOPML_S3_SECURE", False),
            region=os.environ.get("SHOPML_S3_REGION", "us-east-1"),
        )

    return Settings(
        home=home,
        s3=s3,
        redis_url=os.environ.get("SHOPML_REDIS_URL") or None,
        pseudonymization_key=os.environ.get("SHOPML_PSEUDONYMIZATION_KEY") or None,
        image=os.environ.get("SHOPML_IMAGE", DEFAULT_IMAGE),
        progress=_flag("SHOPML_PROGRESS", True),
        dask_address=os.environ.get("SHOPML_DASK_ADDRESS") or None,
        dask_work_dir=Path(os.environ["SHOPML_DASK_WORK_DIR"])
        if os.environ.get("SHOPML_DASK_WORK_DIR")
        else None,
        feast_batch_engine=_batch_engine(),
        ray_address=_ray_address(),
    )


FEAST_BATCH_ENGINES: tuple[str, ...] = ("local", "k8s", "ray")


def _batch_engine() -> str:
    value = os.environ.get("SHOPML_FEAST_BATCH_ENGINE") or "local"
    if value not in FEAST_BATCH_ENGINES:
        raise ValueError(
            f"SHOPML_FEAST_BATCH_ENGINE={value!r} is not one of "
            f"{', '.join(FEAST_BATCH_ENGINES)}"
        )
    return value


def _ray_address() -> str | None:
    value = os.environ.get("SHOPML_RAY_ADDRESS") or None
    if value is not None and not value.startswith("ray://"):
        raise ValueError(
            f"SHOPML_RAY_ADDRESS={value!r} is not a Ray Client address; use "
            "ray://<head-service>:10001, or leave it empty for an in-process Ray"
        )
    return value


def component_image() -> str:
    """The container image that runs pipeline components and model servers.

    One setting for both, ``SHOPML_IMAGE``; the manifests pin the same tag.
    """
    return os.environ.get("SHOPML_IMAGE", DEFAULT_IMAGE)
