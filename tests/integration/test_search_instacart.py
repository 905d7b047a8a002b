"""Search quality on the real Instacart sample: four methods on held-out queries.

Slow (minutes on two cores): it encodes the 14,190 product names bought in the
sample, trains a small SASRec on every user's orders except the last, derives the
query set (known-item title queries, their misspellings, aisle names, and last-basket
queries with user histories), splits it with :func:`split_queries` and scores four
methods on the *test* part only. The fusion settings (the defaults of
``SearchOptions``) were chosen with ``tune_fusion`` on the validation part. Nothing is
cached; everything lives in ``tmp_path``.

Hybrid wins recall@50 through its category prior: an aisle-name query (every
``user_category`` query, where the relevant items are the 1-3 of an aisle's ~190 that
the user bought) gets the aisle's best sellers first, where keyword and dense order
the aisle by text similarity alone, which says nothing about which items are bought.
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
    split_queries,
)
from shopml.search.index import build_search_index
from shopml.sequences import split_events
from shopml.training import TrainConfig, train_sasrec

# Index build + SASRec training on the real catalog: minutes on two cores.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


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
    """nDCG@10 and recall@50 of the four methods on the test part of the query set."""
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
            queries_from_catalog(bought, 300, 134),
            queries_from_baskets(events, bought, 593, per_user=2),
        ],
        ignore_index=True,
    )
    _, test = split_queries(queries)
    result = evaluate_queries(engine, test)
    print(format_table(result))  # the figures, shown with -s
    return result


def _overall(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["kind"] == "all"].set_index("method")


@pytest.mark.parametrize("metric", ["ndcg_10", "recall_50"])
def test_hybrid_beats_dense_only(table: pd.DataFrame, metric: str) -> None:
    overall = _overall(table)
    assert overall.loc["hybrid", metric] > overall.loc["dense", metric]


@pytest.mark.parametrize("metric", ["ndcg_10", "recall_50"])
def test_hybrid_beats_keyword_only(table: pd.DataFrame, metric: str) -> None:
    overall = _overall(table)
    assert overall.loc["hybrid", metric] > overall.loc["keyword", metric]


def test_personalization_helps_basket_queries(table: pd.DataFrame) -> None:
    baskets = table[table["kind"] == "user_category"].set_index("method")
    assert (
        baskets.loc["personalized_hybrid", "ndcg_10"] > baskets.loc["hybrid", "ndcg_10"]
    )
