"""SASRec on tiny seeded models: shapes, causality, padding and that it can learn."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch convention)

from shopml.models.export import InferenceModel
from shopml.models.sasrec import SASRec, SASRecConfig, left_pad

N_ITEMS = 30
MAX_SEQ_LEN = 20


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and stay fast when other jobs load the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(loss: str = "ce", dropout: float = 0.0, seed: int = 0) -> SASRec:
    """A seeded 2-layer model with hidden size 32."""
    torch.manual_seed(seed)
    config = SASRecConfig(
        n_items=N_ITEMS,
        max_seq_len=MAX_SEQ_LEN,
        hidden_size=32,
        n_heads=2,
        n_layers=2,
        dropout=dropout,
        loss=loss,
        n_negatives=8,
    )
    return SASRec(config)


def random_seqs(batch: int, seed: int = 1) -> torch.Tensor:
    """Left-padded histories of varying length, items 1..N_ITEMS."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, MAX_SEQ_LEN + 1, (batch,), generator=gen).tolist()
    seqs = [
        torch.randint(1, N_ITEMS + 1, (n,), generator=gen).tolist() for n in lengths
    ]
    return left_pad(seqs, MAX_SEQ_LEN)


def test_left_pad_keeps_newest_items_on_the_right() -> None:
    padded = left_pad([[1, 2, 3], list(range(1, 26))], 5)

    assert padded.tolist() == [[0, 0, 1, 2, 3], [21, 22, 23, 24, 25]]
    assert padded.dtype == torch.long


def test_forward_and_scores_have_documented_shapes() -> None:
    model = tiny_model().eval()
    item_seq = random_seqs(4)

    hidden = model(item_seq)
    scores = model.full_sort_scores(item_seq)

    assert hidden.shape == (4, MAX_SEQ_LEN, 32)
    assert scores.shape == (4, N_ITEMS + 1)
    assert torch.isfinite(scores[:, 1:]).all()


def test_padding_positions_output_zeros() -> None:
    model = tiny_model().eval()
    item_seq = left_pad([[5, 6, 7]], MAX_SEQ_LEN)

    hidden = model(item_seq)

    assert torch.count_nonzero(hidden[0, :-3]) == 0
    assert torch.count_nonzero(hidden[0, -3:]) > 0


def test_padding_is_never_recommended() -> None:
    model = tiny_model().eval()

    scores = model.full_sort_scores(random_seqs(6))

    assert torch.isneginf(scores[:, 0]).all()
    assert (scores.argmax(dim=1) > 0).all()


def test_a_later_item_never_changes_earlier_positions() -> None:
    model = tiny_model().eval()
    item_seq = random_seqs(3, seed=2)
    item_seq[:, -6:] = torch.tensor([3, 4, 5, 6, 7, 8])
    changed = item_seq.clone()
    changed[:, -2] = 20  # a different item at position L-2

    before, after = model(item_seq), model(changed)

    torch.testing.assert_close(before[:, :-2], after[:, :-2])
    assert not torch.allclose(before[:, -2:], after[:, -2:])


def test_extra_left_padding_does_not_change_the_scores() -> None:
    model = tiny_model().eval()
    history = [[4, 9, 2, 11]]

    full = model.full_sort_scores(left_pad(history, MAX_SEQ_LEN))
    short = model.full_sort_scores(left_pad(history, 8))

    torch.testing.assert_close(full, short)


def test_too_long_a_sequence_is_rejected() -> None:
    model = tiny_model()

    with pytest.raises(ValueError, match="max_seq_len=20"):
        model(torch.ones((1, MAX_SEQ_LEN + 1), dtype=torch.long))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_heads", 3, "multiple of n_heads=3"),
        ("loss", "hinge", "loss='hinge' is not supported"),
        ("dropout", 1.0, "dropout=1.0"),
        ("n_items", 0, "n_items=0"),
        ("temperature", 0.0, "temperature=0.0 must be positive"),
        ("label_smoothing", 1.0, "label_smoothing=1.0"),
        ("item_mask_prob", -0.1, "item_mask_prob=-0.1"),
        ("reverse_prob", 1.0, "reverse_prob=1.0"),
        ("popularity_adjust", -1.0, "popularity_adjust=-1.0"),
        ("cooccurrence_mix", 1.0, "cooccurrence_mix=1.0 must be in"),
        ("cooccurrence_neighbors", 0, "cooccurrence_neighbors=0 must be at least 1"),
    ],
    ids=[
        "heads-not-dividing-hidden",
        "unknown-loss",
        "dropout-one",
        "no-items",
        "zero-temperature",
        "smoothing-one",
        "negative-mask",
        "reverse-one",
        "negative-popularity-adjust",
        "mix-one",
        "no-neighbours",
    ],
)
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    values: dict[str, object] = {"n_items": 10, "hidden_size": 32, field: value}

    with pytest.raises(ValueError, match=message):
        SASRecConfig(**values)  # type: ignore[arg-type]


def test_config_round_trips_through_a_dict() -> None:
    config = SASRecConfig(n_items=7, hidden_size=32, loss="sampled", n_negatives=3)

    assert SASRecConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown SASRecConfig keys \\['colour'\\]"):
        SASRecConfig.from_dict({**config.to_dict(), "colour": "red"})


def cyclic_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences following the cycle 1 -> 2 -> ... -> 10 -> 1 from different starts."""
    rows = [
        [(start + i) % 10 + 1 for i in range(MAX_SEQ_LEN + 1)] for start in range(10)
    ]
    seqs = torch.tensor(rows)
    return seqs[:, :-1], seqs[:, 1:]


@pytest.mark.parametrize("loss", ["ce", "sampled", "bce"])
def test_loss_decreases_on_a_learnable_sequence(loss: str) -> None:
    model = tiny_model(loss=loss, dropout=0.1)
    item_seq, pos_items = cyclic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)

    losses = []
    for _ in range(60):
        loss_value = model.calculate_loss(item_seq, pos_items)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(loss_value.item())

    assert losses[-1] < 0.5 * losses[0]


def test_a_trained_model_predicts_the_next_item_of_the_cycle() -> None:
    model = tiny_model(loss="ce", dropout=0.0)
    item_seq, pos_items = cyclic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(80):
        loss = model.calculate_loss(item_seq, pos_items)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    predicted = model.full_sort_scores(left_pad([[3, 4, 5], [9, 10]], MAX_SEQ_LEN))

    assert predicted.argmax(dim=1).tolist() == [6, 1]


def test_padding_targets_are_ignored_by_the_loss() -> None:
    model = tiny_model().eval()
    item_seq = left_pad([[1, 2, 3]], MAX_SEQ_LEN)
    pos_items = left_pad([[2, 3, 4]], MAX_SEQ_LEN)
    garbage = pos_items.clone()
    garbage[0, 0] = 0  # still padding: must make no difference

    expected = torch.nn.functional.cross_entropy(
        model._item_logits(model(item_seq)[0, -3:]), torch.tensor([2, 3, 4])
    )

    torch.testing.assert_close(model.calculate_loss(item_seq, pos_items), expected)
    torch.testing.assert_close(model.calculate_loss(item_seq, garbage), expected)


def tiny_text_model(id_dropout: float = 0.0) -> SASRec:
    """A seeded tiny model with an 8-wide text tower over random item texts."""
    torch.manual_seed(0)
    config = SASRecConfig(
        n_items=N_ITEMS,
        max_seq_len=MAX_SEQ_LEN,
        hidden_size=32,
        dropout=0.0,
        text_dim=8,
        id_dropout=id_dropout,
    )
    item_text = torch.randn(N_ITEMS + 1, 8, generator=torch.Generator().manual_seed(5))
    return SASRec(config, item_text=item_text)


def test_the_text_tower_gives_items_their_text_representation() -> None:
    model = tiny_text_model().eval()
    assert model.text_proj is not None

    table = model.item_table()

    expected = model.item_embedding.weight[1:] + model.text_proj(model.item_text[1:])
    assert torch.allclose(table[1:], expected)
    assert torch.equal(table[0], torch.zeros(32))  # padding stays zero


def test_two_untrained_items_with_the_same_text_score_the_same() -> None:
    model = tiny_text_model().eval()
    with torch.no_grad():
        model.item_text[7] = model.item_text[3]
        model.item_embedding.weight[[3, 7]] = 0.0  # neither item was ever trained

    scores = model.full_sort_scores(random_seqs(2))

    assert torch.allclose(scores[:, 3], scores[:, 7])


def test_id_dropout_hides_ids_only_in_training() -> None:
    model = tiny_text_model(id_dropout=0.5)
    assert model.text_proj is not None
    text_only = model.text_proj(model.item_text)

    train_table = model.train().item_table()
    eval_table = model.eval().item_table()

    hidden_ids = torch.isclose(train_table[1:], text_only[1:]).all(dim=1)
    assert 0 < hidden_ids.sum() < N_ITEMS
    assert not torch.isclose(eval_table[1:], text_only[1:]).all(dim=1).any()


def test_item_text_of_the_wrong_shape_is_rejected() -> None:
    config = SASRecConfig(n_items=N_ITEMS, text_dim=8)

    with pytest.raises(ValueError, match=r"expected \(31, 8\)"):
        SASRec(config, item_text=torch.zeros(N_ITEMS, 8))


def test_a_text_model_round_trips_through_its_state_dict() -> None:
    model = tiny_text_model().eval()
    restored = SASRec(model.config)  # text buffer zeros until loaded

    restored.load_state_dict(model.state_dict())

    item_seq = random_seqs(3)
    assert torch.equal(
        restored.eval().full_sort_scores(item_seq), model.full_sort_scores(item_seq)
    )


def test_unseen_items_score_by_text_alone_and_are_no_negatives() -> None:
    model = tiny_text_model().eval()
    assert model.text_proj is not None
    model.set_seen_items([torch.arange(1, 11).numpy()])  # items 11.. never seen

    table = model.item_table()
    item_seq = left_pad([[1, 2, 3]], MAX_SEQ_LEN)
    pos_items = left_pad([[2, 3, 4]], MAX_SEQ_LEN)
    loss = model.calculate_loss(item_seq, pos_items)
    loss.backward()

    text_only = model.text_proj(model.item_text)
    assert torch.allclose(table[11:], text_only[11:])
    assert not torch.allclose(table[1:11], text_only[1:11])
    grad = model.item_embedding.weight.grad
    assert grad is not None and grad[11:].abs().sum() == 0.0


def option_model(text: bool = False, **options: Any) -> SASRec:
    """A seeded tiny model (no dropout) with the given SASRecConfig options and, with
    ``text``, an 8-wide text tower over random item texts."""
    torch.manual_seed(0)
    config = SASRecConfig(
        n_items=N_ITEMS,
        max_seq_len=MAX_SEQ_LEN,
        hidden_size=32,
        dropout=0.0,
        text_dim=8 if text else 0,
        **options,
    )
    item_text = torch.randn(N_ITEMS + 1, 8) if text else None
    return SASRec(config, item_text=item_text)


def cosine_model(text: bool = False) -> SASRec:
    """A seeded tiny model that scores by scaled cosine similarity."""
    return option_model(text, normalize=True, temperature=0.05)


@pytest.mark.parametrize("text", [False, True], ids=["id-only", "text"])
def test_cosine_scores_are_scaled_cosines_of_unit_items(text: bool) -> None:
    model = cosine_model(text).eval()
    item_seq = random_seqs(3)

    table = model.item_table()
    hidden = model(item_seq)[:, -1, :]
    scores = model.full_sort_scores(item_seq)

    torch.testing.assert_close(table[1:].norm(dim=1), torch.ones(N_ITEMS))
    assert torch.equal(table[0], torch.zeros(32))
    torch.testing.assert_close(hidden.norm(dim=1), torch.full((3,), 20.0))  # 1 / 0.05
    cosines = F.normalize(hidden, dim=1) @ F.normalize(table[1:], dim=1).T
    torch.testing.assert_close(scores[:, 1:], 20.0 * cosines)


def test_a_cosine_model_serves_through_the_item_matrix_export() -> None:
    model = cosine_model(text=True).eval()
    item_seq = random_seqs(3)

    served = InferenceModel.from_model(model).full_sort_scores(item_seq)

    torch.testing.assert_close(served, model.full_sort_scores(item_seq))


def test_the_cosine_temperature_is_learned() -> None:
    model = cosine_model()
    item_seq, pos_items = cyclic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    assert model.logit_scale is not None
    before = float(model.logit_scale.detach())

    for _ in range(60):
        loss = model.calculate_loss(item_seq, pos_items)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    predicted = model.full_sort_scores(left_pad([[3, 4, 5], [9, 10]], MAX_SEQ_LEN))
    assert predicted.argmax(dim=1).tolist() == [6, 1]
    assert float(model.logit_scale.detach()) != before


def test_label_smoothing_spreads_mass_over_candidate_items_only() -> None:
    torch.manual_seed(0)
    config = SASRecConfig(
        n_items=N_ITEMS,
        max_seq_len=MAX_SEQ_LEN,
        hidden_size=32,
        dropout=0.0,
        text_dim=8,
        label_smoothing=0.2,
    )
    model = SASRec(config, item_text=torch.randn(N_ITEMS + 1, 8)).eval()
    model.set_seen_items([torch.arange(1, 11).numpy()])  # only items 1..10 count
    item_seq = left_pad([[1, 2, 3]], MAX_SEQ_LEN)
    pos_items = left_pad([[2, 3, 4]], MAX_SEQ_LEN)

    loss = model.calculate_loss(item_seq, pos_items)

    logits = model._item_logits(model(item_seq)[0, -3:])[:, 1:11]  # [3, 10]
    expected = F.cross_entropy(logits, torch.tensor([1, 2, 3]), label_smoothing=0.2)
    torch.testing.assert_close(loss, expected)


def test_item_masking_hides_history_items_only_in_training() -> None:
    torch.manual_seed(0)
    config = SASRecConfig(
        n_items=N_ITEMS,
        max_seq_len=MAX_SEQ_LEN,
        hidden_size=32,
        dropout=0.0,
        item_mask_prob=0.5,
    )
    model = SASRec(config)
    item_seq = random_seqs(4)

    torch.manual_seed(1)
    masked = model.train()(item_seq)
    torch.manual_seed(2)
    masked_again = model(item_seq)
    plain = model.eval()(item_seq)

    assert not torch.allclose(masked, masked_again)
    assert torch.equal(plain, model(item_seq))
    assert torch.equal(masked == 0, plain == 0)  # padding stays padding


def test_reversed_windows_read_the_same_items_backwards() -> None:
    config = SASRecConfig(n_items=N_ITEMS, max_seq_len=5, reverse_prob=0.999999)
    model = SASRec(config)
    item_seq = left_pad([[1, 2, 3], [4, 5, 6, 7, 8], [9]], 5)
    pos_items = left_pad([[2, 3, 10], [5, 6, 7, 8, 11], [12]], 5)

    inputs, targets = model._reverse_some(item_seq, pos_items)

    assert inputs.tolist() == [[0, 0, 10, 3, 2], [11, 8, 7, 6, 5], [0, 0, 0, 0, 12]]
    assert targets.tolist() == [[0, 0, 3, 2, 1], [8, 7, 6, 5, 4], [0, 0, 0, 0, 9]]


def test_windows_are_reversed_only_in_training() -> None:
    torch.manual_seed(0)
    config = SASRecConfig(
        n_items=N_ITEMS,
        max_seq_len=MAX_SEQ_LEN,
        hidden_size=32,
        dropout=0.0,
        reverse_prob=0.5,
    )
    model = SASRec(config)
    item_seq, pos_items = cyclic_batch()

    evaluated = model.eval().calculate_loss(item_seq, pos_items)
    torch.testing.assert_close(model.calculate_loss(item_seq, pos_items), evaluated)
    trained = model.train().calculate_loss(item_seq, pos_items)
    assert not torch.isclose(trained, evaluated)


def test_logit_adjustment_adds_log_counts_in_training_only() -> None:
    torch.manual_seed(0)
    config = SASRecConfig(
        n_items=N_ITEMS,
        max_seq_len=MAX_SEQ_LEN,
        hidden_size=32,
        dropout=0.0,
        popularity_adjust=0.5,
    )
    model = SASRec(config)
    model.set_seen_items(
        [torch.tensor([1, 2, 3, 3]).numpy(), torch.tensor([3]).numpy()]
    )
    item_seq = left_pad([[1, 2, 3]], MAX_SEQ_LEN)
    pos_items = left_pad([[2, 3, 4]], MAX_SEQ_LEN)
    counts = torch.zeros(N_ITEMS + 1)
    counts[[1, 2, 3]] = torch.tensor([1.0, 1.0, 3.0])

    logits = model._item_logits(model(item_seq)[0, -3:])  # [3, N], no dropout
    adjusted = F.cross_entropy(logits + 0.5 * torch.log1p(counts), pos_items[0, -3:])
    plain = F.cross_entropy(logits, pos_items[0, -3:])

    torch.testing.assert_close(
        model.train().calculate_loss(item_seq, pos_items), adjusted
    )
    torch.testing.assert_close(model.eval().calculate_loss(item_seq, pos_items), plain)


def graph_model(text: bool = False) -> SASRec:
    """A tiny model smoothing its items over co-occurrence, linked on two histories."""
    model = option_model(text, cooccurrence_mix=0.25, cooccurrence_neighbors=3)
    # Item 1 co-occurs with 2 and 3, item 4 with 5; 6..N never occur.
    model.set_seen_items([np.array([1, 2, 3]), np.array([1, 2]), np.array([4, 5])])
    return model


def test_cooccurrence_mix_blends_each_item_with_its_neighbours() -> None:
    model = graph_model().eval()
    own = model.item_embedding.weight.detach()
    index, weight = model.neighbor_index, model.neighbor_weight

    table = model.item_table().detach()

    neighbours = (weight[:, :, None] * own[index]).sum(1)  # [N, H]
    torch.testing.assert_close(table[1:], 0.75 * own[1:] + 0.25 * neighbours[1:])
    assert set(index[1, :2].tolist()) == {2, 3} and index[4, 0] == 5
    torch.testing.assert_close(table[6:], own[6:])  # no links: unchanged
    assert torch.equal(table[0], torch.zeros(32))  # padding stays zero


def test_a_target_pulls_its_linked_items_towards_the_user() -> None:
    model = graph_model().train()  # dropout 0: the forward pass is deterministic
    item_seq = left_pad([[1]], MAX_SEQ_LEN)
    pos_items = left_pad([[5]], MAX_SEQ_LEN)
    user = model(item_seq)[0, -1].detach()  # [H], the state that scores item 5

    model.calculate_loss(item_seq, pos_items).backward()

    grad = model.item_embedding.weight.grad
    assert grad is not None
    # A descent step moves -grad: towards the user for the target and for item 4,
    # linked to 5 only; away from the user for an unlinked item such as 10.
    assert grad[5] @ user < 0
    assert grad[4] @ user < 0
    assert grad[10] @ user > 0


def test_a_graph_model_round_trips_and_serves_through_the_item_matrix() -> None:
    model = graph_model(text=True).eval()
    restored = SASRec(model.config)  # buffers unlinked until loaded
    item_seq = random_seqs(3)

    restored.load_state_dict(model.state_dict())
    served = InferenceModel.from_model(model).full_sort_scores(item_seq)

    expected = model.full_sort_scores(item_seq)
    assert torch.equal(restored.eval().full_sort_scores(item_seq), expected)
    torch.testing.assert_close(served, expected)
    assert torch.isinf(expected[:, 0]).all()


def test_unseen_items_keep_their_text_representation_under_the_mix() -> None:
    model = graph_model(text=True).eval()
    assert model.text_proj is not None

    table = model.item_table().detach()

    torch.testing.assert_close(table[6:], model.text_proj(model.item_text[6:]).detach())
