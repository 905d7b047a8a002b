"""The evaluation protocol: sequences, leave-one-out split, full-ranking metrics."""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.evaluate import (
    EvaluationResult,
    GateError,
    check_gate,
    decide_gate,
    evaluate,
    evaluate_models,
    find_live_model,
    fit_baselines,
    model_card_with,
    render_report,
)
from components.train import TrainParams, read_curated, train_model
from shopml.artifact import ArtifactError, ModelCard, save_model_card
from shopml.assets import AssetStore
from shopml.evaluation import (
    SegmentRules,
    evaluate_ranking,
    evaluate_scorer,
    metrics_from_ranks,
    popularity_percentiles,
    target_ranks,
)
from shopml.models.baselines import PopularityRecommender
from shopml.sequences import build_item_vocab, cold_start_split, split_events
from shopml.storage import LocalStore


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads inside the block."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and stay fast when other jobs load the CPUs."""
    with torch_threads(1):
        yield


def make_events(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """Canonical events from (user_id, item_id, unix seconds) rows."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    return pd.DataFrame(
        {
            "user_id": frame["user_id"],
            "item_id": frame["item_id"],
            "event_type": "rate",
            "timestamp": pd.to_datetime(frame["ts"], unit="s", utc=True),
            "value": 4.0,
        }
    )


EVENTS = make_events(
    [
        ("u2", "b", 30),
        ("u1", "c", 10),
        ("u1", "a", 10),  # same time as c: a comes first (item-id order)
        ("u1", "d", 20),
        ("u1", "b", 40),
        ("u1", "e", 50),
        ("u2", "a", 20),
    ]
)
CATALOG = pd.DataFrame(
    {"item_id": ["a", "b", "c", "d", "e", "f"], "title": list("ABCDEF")}
)


def test_vocab_indexes_catalog_and_event_items_in_id_order() -> None:
    events = pd.concat([EVENTS, make_events([("u3", "zz", 5)])])

    vocab = build_item_vocab(events, CATALOG)

    assert vocab.item_ids == ["", "a", "b", "c", "d", "e", "f", "zz"]
    assert vocab.n_items == 7
    assert vocab.index_of("f") == 6
    assert vocab.index_of("nope") is None


def test_split_orders_by_time_then_item_id_and_holds_out_the_last_two() -> None:
    split = split_events(EVENTS, CATALOG)

    assert split.user_ids == ["u1", "u2"]
    # u1: a(10) c(10) d(20) b(40) e(50) -> train a c d, valid b, test e
    assert split.train_seqs[0].tolist() == [1, 3, 4]
    assert (split.valid_items[0], split.test_items[0]) == (2, 5)
    # u2 has 2 events: training only
    assert split.train_seqs[1].tolist() == [1, 2]
    assert (split.valid_items[1], split.test_items[1]) == (0, 0)


def test_test_histories_add_the_validation_item() -> None:
    split = split_events(EVENTS, CATALOG)

    assert split.histories("test")[0].tolist() == [1, 3, 4, 2]
    assert split.histories("valid")[0].tolist() == [1, 3, 4]
    assert split.histories("test")[1].tolist() == [1, 2]


def test_missing_event_columns_are_named() -> None:
    with pytest.raises(ValueError, match=r"missing columns \['timestamp'\]"):
        split_events(EVENTS.drop(columns=["timestamp"]))


@pytest.mark.parametrize(
    ("rank", "ndcg", "mrr"),
    [
        (0, 1.0, 1.0),
        (2, 1 / math.log2(4), 1 / 3),
        (9, 1 / math.log2(11), 1 / 10),
        (10, 0, 0),
    ],
    ids=["first", "third", "tenth", "eleventh"],
)
def test_metrics_of_one_ranked_target(rank: int, ndcg: float, mrr: float) -> None:
    result = metrics_from_ranks(np.array([rank]), ks=(10,))

    assert result["hr_10"] == (1.0 if rank < 10 else 0.0)
    assert result["ndcg_10"] == pytest.approx(ndcg)
    assert result["mrr_10"] == pytest.approx(mrr)


def test_metrics_average_over_users_and_cutoffs() -> None:
    result = metrics_from_ranks(np.array([0, 2, 15, 40]), ks=(10, 20))

    assert result["hr_10"] == pytest.approx(0.5)
    assert result["hr_20"] == pytest.approx(0.75)
    assert result["ndcg_10"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert result["mrr_20"] == pytest.approx((1 + 1 / 3 + 1 / 16) / 4)


def test_ranks_skip_padding_and_excluded_items_and_break_ties_by_index() -> None:
    #                       pad  1    2    3    4    5
    scores = torch.tensor([[9.0, 0.5, 0.9, 0.8, 0.7, 0.5]])
    exclude = torch.tensor([[False, False, True, False, False, False]])

    # item 2 (0.9) is history: item 3 then 4 lead; item 1 ties with 5 and wins on index
    assert target_ranks(scores, torch.tensor([4]), exclude).tolist() == [1]
    assert target_ranks(scores, torch.tensor([1]), exclude).tolist() == [2]
    assert target_ranks(scores, torch.tensor([5]), exclude).tolist() == [3]


def test_a_target_inside_the_history_is_a_miss() -> None:
    scores = torch.tensor([[0.0, 5.0, 1.0, 1.0]])
    exclude = torch.tensor([[False, True, False, False]])

    assert target_ranks(scores, torch.tensor([1]), exclude).tolist() == [4]


def fixed_scorer(preferred: list[float]) -> PopularityRecommender:
    """A scorer that gives every user the same scores (popularity with set counts)."""
    scorer = PopularityRecommender(len(preferred) - 1)
    scorer.popularity = np.asarray(preferred, dtype=np.float32)
    return scorer


def test_evaluate_scorer_excludes_each_users_history() -> None:
    split = split_events(EVENTS, CATALOG)
    # items:      pad  a    b    c    d    e    f
    scorer = fixed_scorer([0, 9.0, 8.0, 7.0, 6.0, 5.0, 1.0])

    test = evaluate_scorer(scorer.full_sort_scores, split, "test", ks=(1, 10))
    valid = evaluate_scorer(scorer.full_sort_scores, split, "valid", ks=(1, 10))

    # test: history a c d b excluded -> e ranks first among e, f
    assert test["hr_1"] == 1.0
    assert test["ndcg_10"] == 1.0
    # valid: history a c d excluded -> b ranks first among b, e, f
    assert valid["mrr_10"] == 1.0


def test_history_items_never_push_the_target_down() -> None:
    split = split_events(EVENTS, CATALOG)
    scorer = fixed_scorer([0, 1.0, 2.0, 9.0, 8.0, 3.0, 0.5])

    result = evaluate_scorer(scorer.full_sort_scores, split, "valid", ks=(10,))

    # valid for u1: target b; c and d score highest but are history, so only e is
    # ahead of b (rank 1, not 3)
    assert result["mrr_10"] == pytest.approx(1 / 2)


def test_popularity_counts_training_interactions() -> None:
    split = split_events(EVENTS, CATALOG)

    popularity = PopularityRecommender(split.n_items).fit(split.histories("valid"))
    scores = popularity.full_sort_scores(torch.zeros((2, 5), dtype=torch.long))

    assert popularity.popularity.tolist() == [0, 2, 1, 1, 1, 0, 0]
    assert scores.shape == (2, 7)
    assert torch.isneginf(scores[:, 0]).all()


def test_a_scorer_with_the_wrong_width_is_rejected() -> None:
    split = split_events(EVENTS, CATALOG)

    with pytest.raises(ValueError, match=r"expected \(1, 7\)"):
        evaluate_scorer(lambda seq: torch.zeros((seq.size(0), 3)), split, "test")


def cyclic_curated(folder: Path) -> Path:
    """A curated folder where 20 users walk a 12-item cycle: learnable, unpopular."""
    rows = [
        (f"u{user:02d}", f"i{(user * 5 + step) % 12 + 1:02d}", 100 * user + step)
        for user in range(20)
        for step in range(10)
    ]
    folder.mkdir(parents=True)
    make_events(rows).to_parquet(folder / "events.parquet")
    ids = [f"i{i:02d}" for i in range(1, 13)]
    pd.DataFrame({"item_id": ids, "title": ids}).to_parquet(folder / "catalog.parquet")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(curated folder, model folder) of a tiny model trained to fit the cycle."""
    root = tmp_path_factory.mktemp("stage")
    curated = cyclic_curated(root / "curated")
    params = TrainParams(
        epochs=40, max_seq_len=8, hidden_size=32, batch_size=8, lr=5e-3, device="cpu"
    )
    with torch_threads(1):
        train_model(curated, root / "model", params)
    return curated, root / "model"


def test_evaluate_models_scores_both_models_on_every_test_user(
    trained: tuple[Path, Path],
) -> None:
    result = evaluate_models(*trained)

    assert set(result.models) == {"sasrec", "popularity", "itemknn", "als"}
    assert result.n_users == 20
    assert result.models["sasrec"]["hr_10"] > 0.9
    assert result.models["sasrec"]["ndcg_10"] > result.models["popularity"]["ndcg_10"]
    assert result.metrics()["sasrec_ndcg_10"] == result.models["sasrec"]["ndcg_10"]
    assert set(result.table()["models"]["popularity"]) >= {"hr@10", "ndcg@10", "mrr@20"}
    assert 0 < result.models["itemknn"]["coverage_10"] <= 1
    segments = result.segments["sasrec"]
    assert segments["short_history"]["n_users"] + segments["long_history"][
        "n_users"
    ] == pytest.approx(20)
    assert result.metrics()["als_cold_item_n_users"] == segments["cold_item"]["n_users"]


def test_the_baselines_learn_from_what_the_model_learned_from(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)  # random walks: validation items change the fits
    rows = [
        (f"u{user:02d}", f"i{int(rng.integers(1, 13)):02d}", 100 * user + step)
        for user in range(20)
        for step in range(6)
    ]
    curated = cyclic_curated(tmp_path / "curated")
    make_events(rows).to_parquet(curated / "events.parquet")
    split = split_events(*read_curated(curated))
    params = TrainParams(epochs=2, max_seq_len=8, hidden_size=16, batch_size=8)

    figures = {}
    for final_fit, stage in ((True, "test"), (False, "valid")):
        model_dir = tmp_path / stage
        train_model(curated, model_dir, replace(params, final_fit=final_fit))
        result = evaluate_models(curated, model_dir)
        expected = {
            name: evaluate_ranking(
                baseline.full_sort_scores, split, "test", max_seq_len=200
            ).metrics
            for name, baseline in fit_baselines(split, stage).items()
        }
        for name, metrics in expected.items():
            assert result.models[name] == pytest.approx(metrics), (stage, name)
        assert result.fit_on == result.table()["fit_on"]
        figures[result.fit_on] = expected

    assert set(figures) == {"train+valid", "train"}
    # The two fits differ, so the test would notice the wrong one.
    assert figures["train+valid"]["itemknn"] != figures["train"]["itemknn"]


def test_an_unknown_fit_on_in_the_manifest_is_named(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    curated, model_dir = trained
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["extra"]["train"]["fit_on"] = "everything"
    (copy / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ArtifactError, match=r"train\.fit_on='everything'"):
        evaluate_models(curated, copy)


def test_a_champion_as_good_as_the_model_fails_the_gate(
    trained: tuple[Path, Path],
) -> None:
    result = evaluate_models(*trained, champion_dir=trained[1])

    assert result.models["champion"]["ndcg_10"] == result.models["sasrec"]["ndcg_10"]
    decision = decide_gate(result)
    assert not decision.passed  # a tie with the live model is no improvement
    assert decision.references["champion"] == result.models["sasrec"]["ndcg_10"]


def test_the_model_card_records_figures_and_decision(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    curated, model_dir = trained
    result = result_with(0.08, 0.03)
    save_model_card(model_dir, ModelCard("sasrec", {"events": "x"}, {"epochs": 40}, {}))

    card = model_card_with(model_dir, curated, result, decide_gate(result))

    assert card.gate["passed"] is True
    assert card.gate["references"] == {"popularity": 0.03}
    assert card.evaluation["models"]["sasrec"]["ndcg_10"] == 0.08
    assert set(card.evaluation["data"]) == {"events", "catalog"}
    assert card.parameters == {"epochs": 40}
    assert ModelCard.from_json(card.to_json()) == card


def test_the_newest_live_model_version_is_the_champion(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    assets = AssetStore(LocalStore(tmp_path / "store"))
    assert find_live_model(assets, "recommender", tmp_path / "none") is None
    assets.put_dir(
        "recommender",
        "models",
        trained[1],
        owner="ml",
        producer="test",
        inputs=[],
        quality={"live": True},
    )

    found = find_live_model(assets, "recommender", tmp_path / "champion")

    assert found is not None and (found / "model.pt").is_file()


def test_evaluate_models_refuses_data_the_model_was_not_trained_on(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    curated = cyclic_curated(tmp_path / "other")
    extra = pd.DataFrame({"item_id": ["i99"], "title": ["new"]})
    catalog = pd.read_parquet(curated / "catalog.parquet")
    pd.concat([catalog, extra]).to_parquet(curated / "catalog.parquet")

    with pytest.raises(ValueError, match="index 13 items but the model"):
        evaluate_models(curated, trained[1])


def result_with(sasrec_ndcg: float, popularity_ndcg: float) -> EvaluationResult:
    return EvaluationResult(
        models={
            "sasrec": {"hr_10": 0.2, "ndcg_10": sasrec_ndcg, "mrr_10": 0.05},
            "popularity": {"hr_10": 0.1, "ndcg_10": popularity_ndcg, "mrr_10": 0.02},
        },
        n_users=10,
        n_items=50,
        seconds=0.1,
    )


def test_gate_compares_with_the_best_reference() -> None:
    result = result_with(0.08, 0.03)
    result.models["itemknn"] = {"ndcg_10": 0.07}

    decision = decide_gate(result, min_lift=0.2)

    assert not decision.passed
    assert decision.reference == "itemknn"
    assert decision.threshold == pytest.approx(0.084)
    assert "itemknn ndcg@10 0.0700" in decision.message


def test_gate_passes_a_model_that_clears_the_lift() -> None:
    message = check_gate(result_with(0.08, 0.03), min_lift=1.0)

    assert message.startswith("passed")
    assert "0.0800" in message and "0.0600" in message


@pytest.mark.parametrize(
    ("sasrec", "min_lift"), [(0.05, 1.0), (0.03, 0.0)], ids=["below-lift", "a-tie"]
)
def test_gate_fails_naming_both_figures_and_the_threshold(
    sasrec: float, min_lift: float
) -> None:
    with pytest.raises(GateError) as caught:
        check_gate(result_with(sasrec, 0.03), min_lift=min_lift)

    message = str(caught.value)
    assert f"sasrec ndcg@10 {sasrec:.4f}" in message
    assert "popularity ndcg@10 0.0300" in message
    assert f"threshold {0.03 * (1 + min_lift):.4f}" in message


def test_report_is_html_with_the_table_and_an_embedded_chart() -> None:
    result = result_with(0.08, 0.03)

    page = render_report(result, decide_gate(result).message)

    assert page.startswith("<!DOCTYPE html>")
    assert "<td>sasrec</td>" in page and "<td>0.0800</td>" in page
    assert "Gate: passed" in page
    png = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(png).startswith(b"\x89PNG")


def test_evaluate_component_declares_its_interface() -> None:
    spec = evaluate.component_spec

    assert set(spec.inputs) == {"curated", "model", "min_lift", "champion_model"}
    assert set(spec.outputs) == {"metrics", "report", "card", "Output"}


def test_coverage_and_popularity_bias_of_a_popularity_ranking() -> None:
    split = split_events(EVENTS, CATALOG)
    scorer = fixed_scorer([0, 9.0, 8.0, 7.0, 6.0, 5.0, 1.0])

    result = evaluate_ranking(scorer.full_sort_scores, split, "test", ks=(1,))

    # one test user (u1, history a c d b): top-1 is e -> 1 of 6 items covered
    assert result.metrics["coverage_1"] == pytest.approx(1 / 6)
    # e is never in any history: least popular, tied with f at percentile 0.1
    assert result.metrics["popularity_bias_1"] == pytest.approx(0.1)
    assert result.n_users == 1


def test_popularity_percentiles_average_ties() -> None:
    percentiles = popularity_percentiles(np.array([0, 5, 1, 1, 9]))

    assert percentiles.tolist() == pytest.approx([0.0, 2 / 3, 1 / 6, 1 / 6, 1.0])


def test_segments_split_users_by_history_length_and_target_coldness() -> None:
    split = split_events(EVENTS, CATALOG)
    scorer = fixed_scorer([0, 9.0, 8.0, 7.0, 6.0, 5.0, 1.0])

    result = evaluate_ranking(
        scorer.full_sort_scores,
        split,
        "test",
        ks=(1,),
        rules=SegmentRules(short_history_max=3, cold_item_max_count=0),
    )

    # u1's history has 4 items (long); target e never occurs in any history (cold)
    assert result.segments["long_history"]["n_users"] == 1
    assert result.segments["short_history"]["n_users"] == 0
    assert result.segments["cold_item"]["hr_1"] == 1.0
    assert result.segments["warm_item"]["n_users"] == 0


def test_cold_start_split_hides_cold_items_until_the_test() -> None:
    rows = [
        (f"u{user}", f"i{(user + step) % 6}", 10 * step)
        for user in range(6)
        for step in range(5)
    ]
    split = split_events(make_events(rows))

    cold_split, cold = cold_start_split(split, fraction=0.5, seed=1)

    assert len(cold) == 3
    for seq in cold_split.train_seqs:
        assert not np.isin(seq, cold).any()
    assert not np.isin(cold_split.valid_items, cold).any()
    assert np.array_equal(cold_split.test_items, split.test_items)
    assert np.isin(cold_split.test_items, cold).sum() == 3
