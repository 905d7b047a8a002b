"""The shopml lifecycle pipeline: collect, clean, store, features, train, evaluate, deploy,
monitor.

One definition serves both ways to run it: ``shopml run`` executes it through
``kfp.local`` on one machine, and ``shopml pipeline compile -o lifecycle.yaml`` writes the
YAML a platform team uploads to the Kubeflow Pipelines UI.
"""

from typing import NamedTuple

from kfp import dsl

from components.clean import clean
from components.deploy import deploy
from components.evaluate import evaluate
from components.features import features
from components.ingest import ingest
from components.monitor import monitor
from components.search_eval import search_eval
from components.search_index import search_index
from components.store import store
from components.train import train
from pipelines.platform import on_cluster, on_gpu, transient, with_work_volume

PIPELINE_NAME = "shopml-lifecycle"


class LifecycleOutputs(NamedTuple):
    """What a run returns: where the model is served and how it scored."""

    endpoint: str
    evaluation: str


@dsl.pipeline(
    name=PIPELINE_NAME,
    description=(
        "Collect e-commerce events, clean and version them, build Feast features, train "
        "the SASRec recommender, gate it against a popularity baseline, deploy it behind "
        "KServe and probe the endpoint."
    ),
)
def lifecycle_pipeline(
    source: str = "movielens-100k",
    events_uri: str = "",
    catalog_uri: str = "",
    users_uri: str = "",
    train_source: str = "events",
    epochs: int = 200,
    max_seq_len: int = 50,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_heads: int = 2,
    loss: str = "ce",
    device: str = "auto",
    gpus: int = 1,
    seed: int = 42,
    final_fit: bool = True,
    min_lift: float = 0.0,
    deploy_target: str = "local",
    monitor_users: int = 20,
    search_eval_queries: int = 100,
) -> LifecycleOutputs:
    """Run the whole data-asset lifecycle once.

    Args:
        source: ``movielens-100k`` to fetch the public dataset, or ``files`` to ingest the
            canonical files named by the three URIs below.
        events_uri: events file (CSV, JSONL or Parquet) when ``source`` is ``files``.
        catalog_uri: catalog file when ``source`` is ``files``.
        users_uri: optional users file when ``source`` is ``files``.
        train_source: where training sequences come from: ``events`` (the curated
            events) or ``feast`` (point-in-time joins from the offline feature store).
        epochs: upper bound on training epochs (early stopping usually ends sooner).
        max_seq_len: number of most recent items the recommender reads per user.
        hidden_size: width of the Transformer.
        n_layers: number of Transformer blocks.
        n_heads: attention heads per block.
        loss: training loss: ``ce`` (full softmax), ``sampled`` or ``bce``.
        device: ``auto`` (CUDA when present), ``cuda`` or ``cpu``.
        gpus: GPUs the training pod asks for on a cluster; 0 trains on CPU nodes.
        seed: random seed for training.
        final_fit: after early stopping, refit on train + validation for the chosen
            epoch count and deploy that model (the gate's baselines learn the same).
        min_lift: relative NDCG@10 lift over popularity the model needs to pass the gate.
        deploy_target: ``local`` (a KServe ModelServer on this machine) or ``kserve``.
        monitor_users: how many users the monitor stage sends to the endpoint.
        search_eval_queries: catalog-derived and basket-derived queries (each) in the
            search evaluation.

    Returns:
        The endpoint URL and the evaluation table as JSON.
    """
    # External data is read afresh on every run, so new data never comes from a cache;
    # later stages are keyed by the content-versioned artifacts ingest hands on.
    ingest_task = ingest(
        source=source,
        events_uri=events_uri,
        catalog_uri=catalog_uri,
        users_uri=users_uri,
    )
    transient(on_cluster(ingest_task)).set_caching_options(False)
    clean_task = clean(raw=ingest_task.outputs["raw"])
    with_work_volume(on_cluster(clean_task, memory="4Gi"))
    store_task = store(
        curated=clean_task.outputs["curated"],
        quarantine=clean_task.outputs["quarantine"],
    )
    transient(on_cluster(store_task))
    curated = store_task.outputs["stored"]

    features_task = features(curated=curated, max_seq_len=max_seq_len)
    transient(on_cluster(features_task, memory="4Gi"))
    train_task = train(
        curated=curated,
        source=train_source,
        epochs=epochs,
        max_seq_len=max_seq_len,
        hidden_size=hidden_size,
        n_layers=n_layers,
        n_heads=n_heads,
        loss=loss,
        device=device,
        seed=seed,
        final_fit=final_fit,
    )
    # Feast-sourced training reads the offline store the features stage writes.
    train_task.after(features_task)
    on_gpu(on_cluster(train_task, cpu="4", memory="8Gi"), gpus)
    # Search: a BM25 + MiniLM index over the catalog, evaluated with and without the
    # recommender's personalization.
    search_index_task = search_index(curated=curated)
    on_cluster(search_index_task, memory="4Gi")
    search_eval_task = search_eval(
        index=search_index_task.outputs["index"],
        curated=curated,
        model=train_task.outputs["model"],
        n_items=search_eval_queries,
        max_users=search_eval_queries,
    )
    on_cluster(search_eval_task, memory="4Gi")

    evaluate_task = evaluate(
        curated=curated, model=train_task.outputs["model"], min_lift=min_lift
    )
    on_cluster(evaluate_task, memory="4Gi")

    # Serving side effects must never come from a cache. On kserve, deploy also rolls
    # out the search endpoint from the latest search-index asset in the store, so it
    # runs after the index is stored.
    deploy_task = deploy(
        model=train_task.outputs["model"],
        features=features_task.outputs["features"],
        target=deploy_target,
    ).after(evaluate_task, search_index_task)
    transient(on_cluster(deploy_task)).set_caching_options(False)
    monitor_task = monitor(
        endpoint=deploy_task.output,
        raw=ingest_task.outputs["raw"],
        curated=curated,
        n_users=monitor_users,
    )
    on_cluster(monitor_task).set_caching_options(False)

    return LifecycleOutputs(
        endpoint=deploy_task.output, evaluation=evaluate_task.outputs["Output"]
    )
