"""Search evaluation stage: nDCG@10 and recall@50 of keyword, dense, hybrid, personalized.

The core :func:`evaluate_search` builds the labelled query set (from ``search`` events
when the logs have them, otherwise from the catalog; plus basket queries with user
histories when events carry sessions, see :mod:`shopml.search.evaluation`), stores it
as asset ``search-queries`` when asked, and scores the four methods side by side. The
KFP component :func:`search_eval` maps artifacts and parameters onto it.

Known weakness: basket queries use each user's last basket, and the model artifact of
the train stage has seen part of it (its leave-one-out split holds out only the last
two items), so the personalized figures on those queries are optimistic.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
from kfp import dsl

from components.common import stage_component
from shopml.artifact import load_model_artifact
from shopml.assets import AssetStore
from shopml.search.encoder import TextEncoder
from shopml.search.engine import SearchEngine
from shopml.search.evaluation import (
    evaluate_queries,
    format_table,
    queries_from_baskets,
    queries_from_catalog,
    queries_from_logs,
)
from shopml.search.index import load_search_index
from shopml.search.personal import SASRecPersonalizer

logger = logging.getLogger(__name__)

ASSET_NAME = "search-queries"
QUERY_CLASSES = {
    "query_id": "internal",
    "query": "sensitive",
    "kind": "internal",
    "relevant": "public",
    "history": "internal",
}


@dataclass(frozen=True)
class SearchEvalParams:
    """Size of the derived query set.

    Attributes:
        n_items: catalog items drawn for title and misspelling queries.
        n_categories: categories drawn for category-phrase queries.
        max_users: users drawn for basket queries.
        seed: seed of every draw.
    """

    n_items: int = 300
    n_categories: int = 50
    max_users: int = 300
    seed: int = 7


@dataclass
class SearchEvalSummary:
    """Scores of every method; ``table`` has one row per query kind and method."""

    table: pd.DataFrame
    n_queries: int
    source: str
    asset_ref: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def build_query_set(
    events: pd.DataFrame, catalog: pd.DataFrame, params: SearchEvalParams
) -> tuple[pd.DataFrame, str]:
    """The labelled queries and where they came from (``logs`` or ``catalog``)."""
    queries = queries_from_logs(events)
    source = "logs"
    if queries.empty:
        queries = queries_from_catalog(
            catalog, params.n_items, params.n_categories, params.seed
        )
        source = "catalog"
    if "session_id" in events.columns and events["session_id"].notna().any():
        baskets = queries_from_baskets(
            events, catalog, params.max_users, seed=params.seed
        )
        queries = pd.concat([queries, baskets], ignore_index=True)
        queries["query_id"] = [f"q{i:05d}" for i in range(len(queries))]
    return queries, source


def evaluate_search(
    index_dir: Path,
    curated_dir: Path,
    model_dir: Path | None,
    out_dir: Path,
    params: SearchEvalParams | None = None,
    assets: AssetStore | None = None,
    encoder: TextEncoder | None = None,
) -> SearchEvalSummary:
    """Score keyword, dense, hybrid and personalized hybrid search on a query set.

    Args:
        index_dir: the search index folder.
        curated_dir: folder with ``events.parquet`` and ``catalog.parquet``.
        model_dir: the recommender's model artifact; ``None`` makes the personalized
            method equal to hybrid.
        out_dir: receives ``queries.parquet``, ``table.csv`` and ``table.md``.
        params: query set sizes; defaults when ``None``.
        assets: when given, the query set is stored as asset ``search-queries``.
        encoder: the text encoder; the bundled MiniLM is loaded when ``None``.

    Returns:
        The table and the overall figures as flat metrics.
    """
    params = params or SearchEvalParams()
    events = pd.read_parquet(curated_dir / "events.parquet")
    catalog = pd.read_parquet(curated_dir / "catalog.parquet")
    queries, source = build_query_set(events, catalog, params)
    logger.info("search_eval start queries=%d source=%s", len(queries), source)

    personalizer = None
    if model_dir is not None:
        personalizer = SASRecPersonalizer(load_model_artifact(model_dir))
    encoder = encoder or TextEncoder()
    engine = SearchEngine(load_search_index(index_dir), encoder, personalizer)
    table = evaluate_queries(engine, queries)

    out_dir.mkdir(parents=True, exist_ok=True)
    queries.to_parquet(out_dir / "queries.parquet", index=False)
    table.to_csv(out_dir / "table.csv", index=False)
    (out_dir / "table.md").write_text(format_table(table) + "\n")
    overall = table[table["kind"] == "all"]
    metrics = {
        f"{row.method}_{name}": float(getattr(row, name))
        for row in overall.itertuples(index=False)
        for name in ("ndcg_10", "recall_50")
    }
    summary = SearchEvalSummary(table, len(queries), source, metrics=metrics)
    if assets is not None:
        version = assets.put_table(
            ASSET_NAME,
            "curated",
            pa.Table.from_pandas(queries, preserve_index=False),
            owner="search",
            classification=QUERY_CLASSES,
            producer="search_eval",
            inputs=[],
            quality={"source": source, "queries": len(queries)},
        )
        summary.asset_ref = version.ref
    logger.info("search_eval done\n%s", format_table(table))
    return summary


@stage_component
def search_eval(
    index: dsl.Input[dsl.Model],
    curated: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    queries: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    n_items: int = 300,
    max_users: int = 300,
    store_asset: bool = True,
) -> None:
    """Evaluate product search: four methods side by side on a labelled query set.

    Args:
        index: the search index folder from ``search_index``.
        curated: folder with ``events.parquet`` and ``catalog.parquet``.
        model: the recommender's model artifact (personalization).
        queries: receives the query set and the result table.
        metrics: ``<method>_ndcg_10`` and ``<method>_recall_50`` over all queries.
        n_items: catalog items drawn for title and misspelling queries.
        max_users: users drawn for basket queries.
        store_asset: also store the query set as asset ``search-queries``.
    """
    import os
    from pathlib import Path

    from components.search_eval import SearchEvalParams, evaluate_search
    from shopml.assets import asset_store_from_settings
    from shopml.config import load_settings
    from shopml.logs import configure_logging

    configure_logging()
    os.makedirs(queries.path, exist_ok=True)
    assets = asset_store_from_settings(load_settings()) if store_asset else None
    summary = evaluate_search(
        Path(index.path),
        Path(curated.path),
        Path(model.path),
        Path(queries.path),
        SearchEvalParams(n_items=n_items, max_users=max_users),
        assets,
    )
    for name, value in summary.metrics.items():
        metrics.log_metric(name, value)
