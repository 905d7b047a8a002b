"""Search quality on the real Instacart sample: four methods on derived queries.

Slow (minutes on two cores): it encodes the 14,190 product names bought in the
sample, trains a small SASRec on every user's orders except the last, and scores four
methods on the derived query set (catalog queries plus last-basket queries with user
histories). Nothing is cached; everything lives in ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shopml.artifact import ModelArtifact
from shopml.datasets import load_instacart
from shopml.models.baselines import PopularityRecommender
from shopml.models.sasrec import SASRecConfig
from shopml.search import SASRecPersonalizer, SearchEngine, TextEncoder
from shopml.search.evaluation import (
    evaluate_queries,
    format_table,
    queries_from_baskets,
    queries_from_catalog,
)
from shopml.search.index import build_search_index
from shopml.sequences import split_events
from shopml.training import TrainConfig, train_sasrec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _personalizer(events: pd.DataFrame, catalog: pd.DataFrame) -> SASRecPersonalizer:
    """SASRec trained on every order but each user's last one (the query baskets)."""
    last = events.groupby("user_id")["session_id"].transform("last")
    split = split_events(events[events["session_id"] != last], catalog)
    config = SASRecConfig(n_items=split.n_items, max_seq_len=50, hidden_size=64,
                          dropout=0.3, loss="sampled")  # fmt: skip
    result = train_sasrec(
        split, config, TrainConfig(epochs=4, device="cpu", show_progress=False)
    )
    popularity = PopularityRecommender(split.n_items).fit(split.histories("test"))
    titles = catalog.set_index("item_id")["title"]
    artifact = ModelArtifact(
        result.model,
        config,
        split.vocab.item_ids,
        ["", *titles.reindex(split.vocab.item_ids[1:]).fillna("").tolist()],
        np.asarray(popularity.popularity, dtype=np.float32),
    )
    return SASRecPersonalizer(artifact)


@pytest.fixture(scope="module")
def table(shared_data: Path) -> pd.DataFrame:
    """nDCG@10 and recall@50 of the four methods on the derived query set."""
    folder = shared_data / "instacart-sample"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    torch.set_num_threads(2)
    events, catalog = load_instacart(folder)
    bought = catalog[catalog["item_id"].isin(set(events["item_id"]))]

    encoder = TextEncoder()
    engine = SearchEngine(
        build_search_index(bought, encoder), encoder, _personalizer(events, bought)
    )
    queries = pd.concat(
        [
            queries_from_catalog(bought, 300, 50),
            queries_from_baskets(events, bought, 300),
        ],
        ignore_index=True,
    )
    result = evaluate_queries(engine, queries)
    print(format_table(result))  # the figures, shown with -s
    return result


def _overall(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["kind"] == "all"].set_index("method")


@pytest.mark.parametrize("metric", ["ndcg_10", "recall_50"])
def test_hybrid_beats_dense_only(table: pd.DataFrame, metric: str) -> None:
    overall = _overall(table)
    assert overall.loc["hybrid", metric] > overall.loc["dense", metric]


def test_hybrid_beats_keyword_only_on_recall(table: pd.DataFrame) -> None:
    overall = _overall(table)
    assert overall.loc["hybrid", "recall_50"] > overall.loc["keyword", "recall_50"]


@pytest.mark.xfail(
    reason="on catalog-derived queries (words copied from titles) BM25 alone ranks "
    "the source item higher than any fusion tried (RRF and convex, several weights); "
    "hybrid wins recall@50, not nDCG@10. Needs real logged queries or learned fusion.",
    strict=False,
)
def test_hybrid_beats_keyword_only_on_ndcg(table: pd.DataFrame) -> None:
    overall = _overall(table)
    assert overall.loc["hybrid", "ndcg_10"] > overall.loc["keyword", "ndcg_10"]


def test_personalization_helps_basket_queries(table: pd.DataFrame) -> None:
    baskets = table[table["kind"] == "user_category"].set_index("method")
    assert (
        baskets.loc["personalized_hybrid", "ndcg_10"] > baskets.loc["hybrid", "ndcg_10"]
    )
