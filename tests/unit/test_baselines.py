"""Baselines on tiny hand-made histories: item-to-item co-occurrence and implicit ALS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shopml.models.baselines import (
    MAX_DENSE_ITEMS,
    ImplicitALSRecommender,
    ItemKNNRecommender,
    PopularityRecommender,
)
from shopml.models.sasrec import left_pad

# Two communities: items 1-4 are bought together, items 5-8 are bought together.
HISTORIES = [np.array(seq) for seq in ([1, 2, 3], [2, 3, 4], [1, 3, 4], [1, 2, 4])] + [
    np.array(seq) for seq in ([5, 6, 7], [6, 7, 8], [5, 7, 8], [5, 6, 8], [5, 6, 7, 8])
]
N_ITEMS = 8


@pytest.mark.parametrize(
    "recommender",
    [
        PopularityRecommender(N_ITEMS),
        ItemKNNRecommender(N_ITEMS, n_neighbors=3, shrink=0.0),
        ImplicitALSRecommender(N_ITEMS, factors=4, reg=0.1, iterations=5),
    ],
    ids=["popularity", "itemknn", "als"],
)
def test_scores_have_the_model_contract(recommender: PopularityRecommender) -> None:
    recommender.fit(HISTORIES)

    scores = recommender.full_sort_scores(left_pad([[1], [5, 6]], 4))

    assert scores.shape == (2, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()


@pytest.mark.parametrize(
    "recommender",
    [
        ItemKNNRecommender(N_ITEMS, shrink=0.0),
        ImplicitALSRecommender(N_ITEMS, factors=4, reg=0.1, iterations=10),
    ],
    ids=["itemknn", "als"],
)
def test_a_history_recommends_its_own_community(
    recommender: ItemKNNRecommender,
) -> None:
    recommender.fit(HISTORIES)

    scores = recommender.full_sort_scores(left_pad([[1, 2], [6, 7]], 4))

    # the best unseen item is from the history's community: 3 or 4, 5 or 8
    scores[0, [1, 2]] = float("-inf")
    scores[1, [6, 7]] = float("-inf")
    assert scores[0].argmax().item() in {3, 4}
    assert scores[1].argmax().item() in {5, 8}


def test_itemknn_similarity_is_the_shrunk_cosine() -> None:
    knn = ItemKNNRecommender(N_ITEMS, shrink=1.0).fit(HISTORIES)

    # items 1 and 2 share 2 users, each has 3: 2 / (sqrt(3 * 3) + 1)
    assert knn.similarity[1, 2].item() == pytest.approx(2 / 4)
    assert knn.similarity[1, 5].item() == 0.0
    assert knn.similarity[3, 3].item() == 0.0  # an item is not its own neighbour


def test_itemknn_weighs_recent_history_items_more() -> None:
    knn = ItemKNNRecommender(N_ITEMS, shrink=0.0, decay=0.5).fit(HISTORIES)

    scores = knn.full_sort_scores(left_pad([[1, 5]], 4))  # 5 is the newest

    assert scores[0, 6] > scores[0, 2]


def test_itemknn_keeps_only_the_nearest_neighbours() -> None:
    knn = ItemKNNRecommender(N_ITEMS, n_neighbors=1, shrink=0.0).fit(HISTORIES)

    assert (knn.similarity[1:] > 0).sum(dim=1).tolist() == [1] * N_ITEMS


def test_als_folds_in_a_history_it_was_not_trained_on() -> None:
    als = ImplicitALSRecommender(N_ITEMS, factors=4, reg=0.1, iterations=10, seed=3)
    als.fit(HISTORIES)

    first = als.full_sort_scores(left_pad([[5, 6, 7]], 4))
    again = als.full_sort_scores(left_pad([[5, 6, 7]], 4))

    assert torch.equal(first, again)
    assert first[0, 8] > first[0, 1:5].max()


@pytest.mark.parametrize(
    "make",
    [
        lambda: ItemKNNRecommender(N_ITEMS),
        lambda: ImplicitALSRecommender(N_ITEMS),
        lambda: PopularityRecommender(N_ITEMS),
    ],
    ids=["itemknn", "als", "popularity"],
)
def test_an_item_outside_the_vocabulary_is_rejected(make: object) -> None:
    recommender = make()  # type: ignore[operator]

    with pytest.raises(ValueError, match=r"expected 1\.\.8"):
        recommender.fit([np.array([1, 9])])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_neighbors": 0}, "n_neighbors=0"),
        ({"shrink": -1.0}, "shrink=-1.0"),
        ({"decay": 0.0}, r"decay=0.0 must be in \(0, 1\]"),
    ],
    ids=["neighbors", "shrink", "decay"],
)
def test_itemknn_rejects_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ItemKNNRecommender(N_ITEMS, **kwargs)  # type: ignore[arg-type]


def test_a_catalog_too_large_for_a_dense_matrix_is_not_supported() -> None:
    with pytest.raises(NotImplementedError, match="sparse top-k"):
        ItemKNNRecommender(MAX_DENSE_ITEMS + 1)
