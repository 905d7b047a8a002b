"""Kubernetes settings every pipeline task gets on a cluster (through kfp-kubernetes).

The pipeline itself only composes stages; this module says how their pods run: the
non-secret settings from the ``shopml-settings`` ConfigMap, credentials from the
``shopml-credentials`` Secret (created outside the repository, see docs/platform.md), a
writable emptyDir for ``SHOPML_HOME`` (root filesystems are read-only), resources,
retries, and a GPU for training. ``kfp.local`` ignores all of it.
"""

import os

from kfp import dsl, kubernetes
from kfp.dsl.pipeline_channel import PipelineChannel

SETTINGS_CONFIG_MAP = "shopml-settings"
CREDENTIALS_SECRET = "shopml-credentials"
SCRATCH_PATH = "/tmp/shopml"
GPU_RESOURCE = "nvidia.com/gpu"

# Secret key -> environment variable read by shopml/config.py.
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "SHOPML_S3_ACCESS_KEY",
    "AWS_SECRET_ACCESS_KEY": "SHOPML_S3_SECRET_KEY",
    "SHOPML_PSEUDONYMIZATION_KEY": "SHOPML_PSEUDONYMIZATION_KEY",
}


def on_cluster(
    task: dsl.PipelineTask, *, cpu: str = "1", memory: str = "2Gi"
) -> dsl.PipelineTask:
    """Give a task the shopml settings, credentials, scratch space and resources."""
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=SETTINGS_CONFIG_MAP,
        config_map_key_to_env={key: key for key in _CONFIG_MAP_KEYS},
    )
    kubernetes.use_secret_as_env(
        task, secret_name=CREDENTIALS_SECRET, secret_key_to_env=SECRET_ENV
    )
    kubernetes.empty_dir_mount(task, volume_name="scratch", mount_path=SCRATCH_PATH)
    task.set_cpu_request(cpu).set_cpu_limit(cpu)
    task.set_memory_request(memory).set_memory_limit(memory)
    return task


#: Claim shared by the clean pod and the Dask workers (manifests/base/
#: persistentvolumeclaim.shopml-work.yaml) and where both mount it.
WORK_CLAIM = "shopml-work"
WORK_PATH = "/mnt/shopml-work"


def with_work_volume(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Mount the shared work claim, where Dask workers read the buckets the task wrote."""
    kubernetes.mount_pvc(task, pvc_name=WORK_CLAIM, mount_path=WORK_PATH)
    return task


def transient(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Retry a task whose failures are usually passing (network, object store, API).

    ``SHOPML_TASK_RETRIES`` (default 3) sets the count when the pipeline is built; the
    local runner sets 0, so a bad input file fails a local run at once instead of
    after minutes of back-off (kfp.local honours retries).
    """
    retries = int(os.environ.get("SHOPML_TASK_RETRIES", "3"))
    if retries <= 0:
        return task
    return task.set_retry(
        num_retries=retries, backoff_duration="30s", backoff_factor=2.0
    )


def on_gpu(task: dsl.PipelineTask, gpus: int | PipelineChannel) -> dsl.PipelineTask:
    """Ask for ``gpus`` NVIDIA GPUs (0 runs on CPU nodes) and tolerate GPU taints."""
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.add_toleration(
        task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule"
    )
    return task


# Keys of manifests/base/configmap.shopml-settings.yaml passed to every task.
_CONFIG_MAP_KEYS = (
    "SHOPML_S3_ENDPOINT",
    "SHOPML_S3_BUCKET",
    "SHOPML_S3_SECURE",
    "SHOPML_S3_REGION",
    "SHOPML_REDIS_URL",
    "SHOPML_HOME",
    "SHOPML_PROGRESS",
    "SHOPML_DASK_ADDRESS",
    "SHOPML_DASK_WORK_DIR",
    "SHOPML_FEAST_BATCH_ENGINE",
    "SHOPML_RAY_ADDRESS",
)
