"""The co-occurrence graph SASRec smooths its item table over."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shopml.models.cooccurrence import cooccurrence_neighbors, item_similarity_topk


def seqs(*histories: list[int]) -> list[np.ndarray]:
    return [np.asarray(h, dtype=np.int64) for h in histories]


def test_weights_are_cosine_similarities_normalised_per_item() -> None:
    # Users: {1, 2, 3}, {1, 2}, {4}; item 5 is never seen.
    index, weight = cooccurrence_neighbors(
        seqs([1, 2, 3], [1, 2], [4]), 5, k=2, shrink=0
    )

    sim_12, sim_13 = 2 / math.sqrt(2 * 2), 1 / math.sqrt(2 * 1)
    assert index[1].tolist() == [2, 3]  # strongest first
    torch.testing.assert_close(
        weight[1], torch.tensor([sim_12, sim_13]) / (sim_12 + sim_13)
    )
    assert index[3].tolist() == [1, 2]  # 3 co-occurs once with each, equal weights
    torch.testing.assert_close(weight[3], torch.tensor([0.5, 0.5]))


def test_an_item_without_links_is_its_own_neighbour_and_padding_has_none() -> None:
    index, weight = cooccurrence_neighbors(seqs([1, 2], [4]), 5, k=3)

    for lonely in (3, 4, 5):  # never seen; seen alone; never seen
        assert index[lonely].tolist() == [lonely, 0, 0]
        assert weight[lonely].tolist() == [1.0, 0.0, 0.0]
    assert index[0].tolist() == [0, 0, 0] and weight[0].sum() == 0


def test_only_the_k_strongest_links_are_kept() -> None:
    # Item 1 co-occurs with 2 (three users), 3 (two users) and 4 (one user).
    histories = seqs([1, 2, 3, 4], [1, 2, 3], [1, 2], [2, 3, 4, 5], [3, 5], [4, 5])

    index, weight = cooccurrence_neighbors(histories, 5, k=2)

    assert index[1].tolist() == [2, 3]
    assert weight[1, 0] > weight[1, 1] > 0
    torch.testing.assert_close(weight[1:].sum(1), torch.ones(5))


def test_repeats_in_one_history_count_once() -> None:
    once = cooccurrence_neighbors(seqs([1, 2], [2, 3]), 3, k=2)
    repeated = cooccurrence_neighbors(seqs([1, 2, 1, 2], [2, 3, 3]), 3, k=2)

    assert torch.equal(once[0], repeated[0])
    assert torch.equal(once[1], repeated[1])


def test_the_links_are_the_strongest_shrunk_cosines_on_random_histories() -> None:
    rng = np.random.default_rng(0)
    n_items, k, shrink = 40, 5, 10.0
    histories = [
        rng.choice(np.arange(1, n_items + 1), size=rng.integers(2, 9))
        for _ in range(60)
    ]
    # Brute force from the definition: users per item, then every pair.
    users_of = {item: set() for item in range(1, n_items + 1)}
    for user, history in enumerate(histories):
        for item in history:
            users_of[int(item)].add(user)

    def cosine(i: int, j: int) -> float:
        shared = len(users_of[i] & users_of[j])
        return shared / (np.sqrt(len(users_of[i]) * len(users_of[j])) + shrink)

    index, similarity = item_similarity_topk(histories, n_items, k, shrink)
    _, weight = cooccurrence_neighbors(histories, n_items, k=k, shrink=shrink)

    for item in range(1, n_items + 1):
        row = {j: cosine(item, j) for j in range(1, n_items + 1) if j != item}
        linked = [j for j in sorted(row, key=lambda j: (-row[j], j)) if row[j] > 0]
        expected = linked[:k]
        got = [int(j) for j in index[item] if j > 0]
        assert got == expected, item
        np.testing.assert_allclose(
            similarity[item, : len(got)], [row[j] for j in got], rtol=1e-9
        )
        if got:
            np.testing.assert_allclose(
                weight[item, : len(got)].numpy(),
                similarity[item, : len(got)] / similarity[item].sum(),
                rtol=1e-5,
            )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k=0 must be at least 1"),
        ({"k": 2, "shrink": -1.0}, "shrink=-1.0 must be non-negative"),
    ],
)
def test_bad_parameters_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cooccurrence_neighbors(seqs([1, 2]), 3, **kwargs)  # type: ignore[arg-type]


def test_an_index_outside_the_catalog_is_named() -> None:
    with pytest.raises(ValueError, match=r"item_seqs\[1\].*max=9.*expected 1..5"):
        cooccurrence_neighbors(seqs([1, 2], [3, 9]), 5, k=2)
