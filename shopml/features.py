"""Feast feature store of shopml: one import for the store, online reads, training data.

The code lives in four modules, each of which reads on its own:

* ``shopml.feast_store``: ``feature_store_from_settings`` (registry, online store and
  batch engine from settings), ``offline_root`` and the join keys of feature services.
* ``shopml.online_features``: ``OnlineFeatureClient`` (what the model servers read,
  with defaults and ``FeatureStoreUnavailable``) and its Redis fast path
  ``RedisFeatureReader``.
* ``shopml.feature_push``: ``push_events``, live events appended to online sequences.
* ``shopml.training_data``: point-in-time joins and the train stage's split.

This module re-exports their public names, so imports written against it (KFP
component bodies, model servers, tests) keep working; new code imports a name from the
module that holds it. Feast is imported lazily, so importing this module is cheap.
"""

from shopml.feast_store import (
    RAY_LOCAL_NUM_CPUS,
    RAY_LOCAL_OBJECT_STORE_BYTES,
    RAY_WRITE_CONCURRENCY,
    REDIS_TIMEOUT_S,
    REGISTRY_CACHE_TTL_S,
    check_join_keys,
    feature_service_join_keys,
    feature_store_from_settings,
    offline_root,
    redis_connection_string,
)
from shopml.feature_push import push_events
from shopml.online_features import (
    SERVING_FEATURES,
    FeatureStoreUnavailable,
    OnlineFeatureClient,
    RedisFeatureReader,
    UserFeatures,
    read_online_features,
)
from shopml.training_data import (
    TRAINING_SOURCES,
    feast_training_split,
    prepare_entity_frame,
    split_for_training,
    training_cutoffs,
    training_examples,
)

__all__ = [
    "RAY_LOCAL_NUM_CPUS",
    "RAY_LOCAL_OBJECT_STORE_BYTES",
    "RAY_WRITE_CONCURRENCY",
    "REDIS_TIMEOUT_S",
    "REGISTRY_CACHE_TTL_S",
    "SERVING_FEATURES",
    "TRAINING_SOURCES",
    "FeatureStoreUnavailable",
    "OnlineFeatureClient",
    "RedisFeatureReader",
    "UserFeatures",
    "check_join_keys",
    "feast_training_split",
    "feature_service_join_keys",
    "feature_store_from_settings",
    "offline_root",
    "prepare_entity_frame",
    "push_events",
    "read_online_features",
    "redis_connection_string",
    "split_for_training",
    "training_cutoffs",
    "training_examples",
]
