"""The training loop and the train stage's core on tiny, learnable, seeded data."""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import shopml.training
from components.train import (
    TrainParams,
    _configs,
    _parse_args,
    final_checkpoint_key,
    train,
    train_model,
)
from shopml.artifact import load_model_artifact
from shopml.checkpoints import Checkpointer
from shopml.distributed import DistContext
from shopml.evaluation import evaluate_scorer
from shopml.final_fit import final_fit, final_fit_split, refit_sasrec
from shopml.models.baselines import PopularityRecommender
from shopml.models.sasrec import SASRec, SASRecConfig
from shopml.optimization import Precision, build_optimizer, lr_lambda
from shopml.sequences import LeaveOneOutSplit, split_events
from shopml.storage import LocalStore
from shopml.train_loop import _make_loop, _train_epoch, train_sasrec, training_windows
from shopml.train_state import TrainConfig

N_USERS = 30


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and stay fast when other jobs load the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_ITEMS = 20
SEQ_LEN = 12


def cyclic_events(n_users: int = N_USERS) -> pd.DataFrame:
    """Users walk the cycle 1 -> 2 -> ... -> N_ITEMS -> 1 from different starts."""
    rows = []
    for user in range(n_users):
        for step in range(SEQ_LEN):
            item = (user * 7 + step) % N_ITEMS + 1
            rows.append((f"u{user:02d}", f"i{item:02d}", 1_000 * user + step))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    return frame.assign(
        event_type="view", timestamp=pd.to_datetime(frame.pop("ts"), unit="s", utc=True)
    )


def catalog() -> pd.DataFrame:
    ids = [f"i{i:02d}" for i in range(1, N_ITEMS + 1)]
    return pd.DataFrame({"item_id": ids, "title": [f"Title {i}" for i in ids]})


@pytest.fixture(scope="module")
def split() -> LeaveOneOutSplit:
    return split_events(cyclic_events(), catalog())


def tiny_configs(
    split: LeaveOneOutSplit, epochs: int = 40, patience: int = 40
) -> tuple[SASRecConfig, TrainConfig]:
    model_config = SASRecConfig(
        n_items=split.n_items, max_seq_len=10, hidden_size=32, n_layers=2, dropout=0.1
    )
    train_config = TrainConfig(
        epochs=epochs, batch_size=16, lr=5e-3, patience=patience, seed=7, device="cpu"
    )
    return model_config, train_config


def test_windows_put_each_target_one_step_after_its_input() -> None:
    rng = np.random.default_rng(0)
    seqs = [np.arange(1, 5), np.array([9]), np.arange(1, 13)]

    item_seq, pos_items = training_windows(seqs, 5, rng)

    # user 0: pairs (1,2) (2,3) (3,4); user 1 has no pair; user 2 has 11 pairs
    assert item_seq[0].tolist() == [0, 0, 1, 2, 3]
    assert pos_items[0].tolist() == [0, 0, 2, 3, 4]
    assert item_seq[1].tolist() == [7, 8, 9, 10, 11]
    assert pos_items[1].tolist() == [8, 9, 10, 11, 12]
    assert ((item_seq == 0) == (pos_items == 0)).all()
    targets = pos_items[1:][pos_items[1:] > 0]  # rows 1.. are user 2's windows
    assert sorted(set(targets.tolist())) == list(range(2, 13))  # every pair is trained


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    factor = lr_lambda(total_steps=100, warmup_ratio=0.1)

    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0)


def test_the_schedule_can_span_fewer_epochs_than_the_cap(
    split: LeaveOneOutSplit,
) -> None:
    model_config, train_config = tiny_configs(split, epochs=10)
    train_config.schedule_epochs = 2
    rng = np.random.default_rng(0)

    # 32 windows in batches of 16: 2 steps an epoch, 4 scheduled steps, 1 warming up
    loop = _make_loop(SASRec(model_config), split, train_config, rng, DistContext(), 32)

    factor = loop.scheduler.lr_lambdas[0]  # type: ignore[attr-defined]
    assert factor(0) == pytest.approx(1.0)
    assert factor(2) == pytest.approx(0.75)
    assert factor(4) == pytest.approx(0.0)
    assert factor(19) == pytest.approx(0.0)  # the cap's last step: still 0
    with pytest.raises(ValueError, match="schedule_epochs=0"):
        TrainConfig(schedule_epochs=0)


def test_embedding_tables_get_their_own_weight_decay(split: LeaveOneOutSplit) -> None:
    model_config, train_config = tiny_configs(split)
    train_config.embedding_weight_decay = 0.05
    model = SASRec(model_config)

    optimizer = build_optimizer(model, train_config)

    decay = {
        id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]
    }
    assert len(decay) == len(list(model.parameters()))  # each parameter exactly once
    assert decay[id(model.item_embedding.weight)] == 0.05
    assert decay[id(model.position_embedding.weight)] == 0.05
    named = dict(model.named_parameters())
    assert decay[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.1
    assert decay[id(named["encoder.blocks.0.attn.qkv.bias"])] == 0.0
    assert decay[id(named["encoder.ln_f.weight"])] == 0.0


def test_training_beats_popularity_on_a_learnable_pattern(
    split: LeaveOneOutSplit,
) -> None:

    result = train_sasrec(split, *tiny_configs(split, epochs=30))

    popularity = PopularityRecommender(split.n_items).fit(split.histories("test"))
    sasrec_test = evaluate_scorer(
        result.model.full_sort_scores, split, "test", max_seq_len=10
    )
    popularity_test = evaluate_scorer(popularity.full_sort_scores, split, "test")
    assert sasrec_test["hr_10"] > 0.9
    assert sasrec_test["ndcg_10"] > popularity_test["ndcg_10"] + 0.3
    assert result.best_valid["ndcg_10"] > 0.5
    assert not result.model.training
    assert next(result.model.parameters()).device.type == "cpu"


def test_training_is_deterministic_on_cpu(split: LeaveOneOutSplit) -> None:
    first = train_sasrec(split, *tiny_configs(split, epochs=3))
    second = train_sasrec(split, *tiny_configs(split, epochs=3))

    assert [r.loss for r in first.history] == [r.loss for r in second.history]
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_early_stopping_keeps_the_best_epoch(split: LeaveOneOutSplit) -> None:
    model_config, train_config = tiny_configs(split, epochs=60, patience=2)
    train_config.lr = 0.05  # too high: validation soon stops improving
    train_config.min_steps = 0

    result = train_sasrec(split, model_config, train_config)

    assert result.epochs_run < 60
    assert result.epochs_run - result.best_epoch == 2
    best = max(r.valid["ndcg_10"] for r in result.history if r.valid is not None)
    assert result.best_valid["ndcg_10"] == best


def test_early_stopping_waits_for_min_steps(split: LeaveOneOutSplit) -> None:
    model_config, train_config = tiny_configs(split, epochs=30, patience=1)
    train_config.lr = 0.05
    # at most 60 windows of 16 (4 steps) per epoch here: no stop before epoch 10
    train_config.min_steps = 40

    result = train_sasrec(split, model_config, train_config)

    assert result.epochs_run >= 10


def test_the_final_fit_split_trains_on_every_validation_item(
    split: LeaveOneOutSplit,
) -> None:
    final = final_fit_split(split)

    for before, after, valid in zip(
        split.train_seqs, final.train_seqs, split.valid_items, strict=True
    ):
        assert after.tolist() == [*before.tolist(), valid]
    assert not final.valid_items.any()
    assert final.test_items.tolist() == split.test_items.tolist()
    for a, b in zip(final.histories("test"), split.histories("test"), strict=True):
        assert a.tolist() == b.tolist()  # test figures read the same histories


def test_a_run_without_validation_trains_every_epoch_and_keeps_the_last(
    split: LeaveOneOutSplit,
) -> None:
    model_config, train_config = tiny_configs(split, epochs=4, patience=1)
    train_config.lr, train_config.min_steps = 0.05, 0  # would stop early if validated

    validated = train_sasrec(split, model_config, train_config)
    blind = train_sasrec(split, model_config, replace(train_config, validate=False))

    assert [r.valid for r in blind.history] == [None] * 4
    assert (blind.epochs_run, blind.best_epoch, blind.best_valid) == (4, 4, {})
    # evaluating draws nothing: both runs take the same steps while both run
    n = validated.epochs_run
    assert [r.loss for r in blind.history[:n]] == [r.loss for r in validated.history]


def test_refit_retrains_on_train_and_valid_with_the_phase_1_schedule(
    split: LeaveOneOutSplit,
) -> None:
    model_config, train_config = tiny_configs(split, epochs=40)

    refit = refit_sasrec(split, model_config, train_config, epochs=3)

    # the same run by hand: the schedule still spans phase 1's 40 epochs
    by_hand = train_sasrec(
        final_fit_split(split),
        model_config,
        replace(train_config, epochs=3, schedule_epochs=40, validate=False),
    )
    assert (refit.epochs_run, refit.best_epoch, refit.best_valid) == (3, 3, {})
    assert [r.loss for r in refit.history] == [r.loss for r in by_hand.history]
    phase_1 = train_sasrec(split, model_config, replace(train_config, epochs=3))
    assert [r.loss for r in refit.history] != [r.loss for r in phase_1.history]
    with pytest.raises(ValueError, match="epochs=0 must be at least 1"):
        refit_sasrec(split, model_config, train_config, epochs=0)


def test_final_fit_refits_for_the_selected_epoch_count(
    split: LeaveOneOutSplit, tmp_path: Path
) -> None:
    model_config, train_config = tiny_configs(split, epochs=6, patience=1)
    train_config.lr, train_config.min_steps = 0.05, 0

    result = final_fit(split, model_config, train_config)

    assert result.final.epochs_run == result.selection.best_epoch
    assert result.selection.best_valid["ndcg_10"] > 0.0
    assert result.model is result.final.model
    same = Checkpointer(LocalStore(tmp_path), "ckpt/last.pt")
    with pytest.raises(ValueError, match="use two keys"):
        final_fit(
            split,
            model_config,
            train_config,
            selection_checkpointer=same,
            final_checkpointer=same,
        )


def test_the_moving_average_follows_every_step_with_its_decay(
    split: LeaveOneOutSplit,
) -> None:
    model_config, train_config = tiny_configs(split)
    train_config.ema_decay = 0.8
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    windows = training_windows(split.train_seqs, model_config.max_seq_len, rng)
    loop = _make_loop(
        SASRec(model_config), split, train_config, rng, DistContext(), len(windows[0])
    )
    after_each_step: list[dict[str, torch.Tensor]] = []
    loop.optimizer.register_step_post_hook(
        lambda *_: after_each_step.append(
            {k: v.detach().clone() for k, v in loop.model.named_parameters()}
        )
    )

    _train_epoch(loop, windows, Precision(torch.device("cpu")))

    assert len(after_each_step) > 2
    expected = dict(after_each_step[0])  # the first step's weights, then the average
    for weights in after_each_step[1:]:
        expected = {k: 0.8 * expected[k] + 0.2 * weights[k] for k in expected}
    for name, value in loop.scored_model.named_parameters():
        torch.testing.assert_close(value, expected[name])
        assert not torch.equal(value, dict(loop.model.named_parameters())[name])


def test_the_moving_average_is_validated_kept_and_leaves_training_alone(
    split: LeaveOneOutSplit,
) -> None:
    model_config, train_config = tiny_configs(split, epochs=3)
    train_config.lr = 5e-4  # slow enough that no epoch ranks every target first
    plain = train_sasrec(split, model_config, train_config)
    averaged = train_sasrec(split, model_config, replace(train_config, ema_decay=0.9))

    assert [r.loss for r in averaged.history] == [r.loss for r in plain.history]
    assert [r.valid for r in averaged.history] != [r.valid for r in plain.history]
    kept = evaluate_scorer(
        averaged.model.full_sort_scores, split, stage="valid", max_seq_len=10
    )
    assert kept == pytest.approx(averaged.best_valid)
    best = max(r.valid["ndcg_10"] for r in averaged.history if r.valid is not None)
    assert averaged.best_valid["ndcg_10"] == best
    blind = train_sasrec(
        split,
        model_config,
        replace(train_config, epochs=3, ema_decay=0.9, validate=False),
    )
    raw = train_sasrec(
        split, model_config, replace(train_config, epochs=3, validate=False)
    )
    for name, value in raw.model.state_dict().items():
        if value.is_floating_point() and "embedding" in name:
            assert not torch.equal(blind.model.state_dict()[name], value), name


def test_a_moving_average_decay_of_one_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"ema_decay=1.0 must be in \[0, 1\)"):
        TrainConfig(ema_decay=1.0)


def test_a_config_for_another_vocabulary_is_rejected(split: LeaveOneOutSplit) -> None:
    model_config, train_config = tiny_configs(split)
    model_config.n_items = split.n_items + 1

    with pytest.raises(ValueError, match=f"split has {split.n_items} items"):
        train_sasrec(split, model_config, train_config)


def test_unknown_device_is_rejected() -> None:
    with pytest.raises(ValueError, match="device='tpu' is not supported"):
        TrainConfig(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_rejected(split: LeaveOneOutSplit) -> None:
    model_config, train_config = tiny_configs(split)
    train_config.device = "cuda"

    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        train_sasrec(split, model_config, train_config)


def write_curated(folder: Path) -> Path:
    folder.mkdir(parents=True)
    cyclic_events().to_parquet(folder / "events.parquet")
    catalog().to_parquet(folder / "catalog.parquet")
    return folder


def test_train_model_saves_a_loadable_artifact_with_titles(tmp_path: Path) -> None:
    curated = write_curated(tmp_path / "curated")
    params = TrainParams(
        epochs=4, max_seq_len=10, hidden_size=32, batch_size=16, device="cpu", seed=3
    )

    summary = train_model(curated, tmp_path / "model", params)

    artifact = load_model_artifact(tmp_path / "model")
    assert artifact.config.n_items == N_ITEMS
    assert artifact.item_ids[1] == "i01"
    assert artifact.titles[N_ITEMS] == "Title i20"
    assert artifact.popularity[0] == 0
    assert artifact.popularity.sum() == N_USERS * (SEQ_LEN - 1)
    assert summary.n_users == N_USERS
    assert summary.epochs_run == 4
    assert summary.metrics()["valid_ndcg_10"] == summary.valid["ndcg_10"]
    assert artifact.extra["train"]["best_epoch"] == summary.best_epoch


def test_the_train_stage_saves_the_final_fit_and_says_so(tmp_path: Path) -> None:
    curated = write_curated(tmp_path / "curated")
    params = TrainParams(
        epochs=3, max_seq_len=10, hidden_size=32, batch_size=16, device="cpu", seed=3
    )
    refitted = train_model(curated, tmp_path / "final", params)
    selected = train_model(
        curated, tmp_path / "selected", replace(params, final_fit=False)
    )

    split = split_events(cyclic_events(), catalog())
    model_config, train_config = _configs(params, split.n_items)
    expected = refit_sasrec(split, model_config, train_config, refitted.best_epoch)
    saved = {
        name: load_model_artifact(tmp_path / name).model.state_dict()
        for name in ("final", "selected")
    }
    for name, tensor in expected.model.state_dict().items():
        torch.testing.assert_close(saved["final"][name], tensor, msg=name)
    weights = "item_embedding.weight"
    assert not torch.equal(saved["final"][weights], saved["selected"][weights])
    assert (refitted.best_epoch, refitted.valid) == (
        selected.best_epoch,
        selected.valid,
    )
    assert (refitted.fit_on, selected.fit_on) == ("train+valid", "train")
    assert refitted.final_fit_seconds > 0
    assert selected.final_fit_seconds == 0
    assert refitted.metrics()["final_fit"] == 1.0
    extra = load_model_artifact(tmp_path / "final").extra["train"]
    assert extra["fit_on"] == "train+valid"


@pytest.mark.parametrize(
    ("key", "final"),
    [
        ("checkpoints/ddp/last.pt", "checkpoints/ddp/last-final.pt"),
        ("runs/r1/state", "runs/r1/state-final"),
        ("", ""),
    ],
)
def test_the_final_fit_checkpoints_beside_the_selection(key: str, final: str) -> None:
    assert final_checkpoint_key(key) == final


def test_the_command_line_turns_the_final_fit_off() -> None:
    def final(*flags: str) -> bool:
        args = _parse_args(["--curated-uri", "c", "--model-uri", "m", *flags])
        return bool(args.final_fit)

    assert final() is TrainParams().final_fit is True
    assert final("--no-final-fit") is False


def test_a_graph_smoothed_model_keeps_its_item_links_in_the_artifact(
    tmp_path: Path,
) -> None:
    curated = write_curated(tmp_path / "curated")
    params = TrainParams(
        epochs=2,
        max_seq_len=10,
        hidden_size=32,
        batch_size=16,
        device="cpu",
        seed=3,
        cooccurrence_mix=0.5,
    )

    train_model(curated, tmp_path / "model", params)

    model = load_model_artifact(tmp_path / "model").model
    assert model.config.cooccurrence_mix == 0.5
    # The cyclic histories link every item to others: no item is its own only link.
    linked = model.neighbor_index[1:, 0] != torch.arange(1, N_ITEMS + 1)
    assert bool(linked.all())
    torch.testing.assert_close(model.neighbor_weight[1:].sum(1), torch.ones(N_ITEMS))


def test_the_command_line_turns_graph_smoothing_off_or_changes_it() -> None:
    def mix(*flags: str) -> float:
        args = _parse_args(["--curated-uri", "c", "--model-uri", "m", *flags])
        return float(args.cooccurrence_mix)

    assert mix() == TrainParams().cooccurrence_mix == 0.6
    assert mix("--cooccurrence-mix", "0") == 0.0
    assert mix("--cooccurrence-mix", "0.3") == 0.3


def test_train_model_names_a_missing_table(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"events\.parquet"):
        train_model(tmp_path, tmp_path / "model")


def test_train_component_declares_its_interface() -> None:
    spec = train.component_spec

    assert set(spec.inputs) >= {
        "curated",
        "epochs",
        "max_seq_len",
        "loss",
        "device",
        "seed",
        "ema_decay",
        "cooccurrence_mix",
    }
    assert set(spec.outputs) == {"model", "metrics"}


KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from shopml.storage import LocalStore
from shopml.checkpoints import Checkpointer
from shopml.train_loop import train_sasrec
from tests.unit.test_training import cyclic_events, catalog, tiny_configs
from shopml.sequences import split_events

split = split_events(cyclic_events(), catalog())
checkpointer = Checkpointer(LocalStore(sys.argv[1]), "checkpoints/run/last.pt")

def kill_after_two(record):
    if record.epoch == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill, no cleanup runs

model_config, train_config = tiny_configs(split, epochs=5)
train_config.ema_decay = float(sys.argv[2])
train_sasrec(split, model_config, train_config, checkpointer=checkpointer,
             on_epoch_end=kill_after_two)
"""


@pytest.mark.parametrize("ema_decay", [0.0, 0.9], ids=["weights", "moving-average"])
def test_resume_after_a_kill_reproduces_the_uninterrupted_weights(
    split: LeaveOneOutSplit, tmp_path: Path, ema_decay: float
) -> None:
    store_root = tmp_path / "store"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(store_root), str(ema_decay)],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    checkpointer = Checkpointer(LocalStore(store_root), "checkpoints/run/last.pt")
    state = checkpointer.load()
    assert state is not None and state["epoch"] == 2

    model_config, train_config = tiny_configs(split, epochs=5)
    train_config.ema_decay = ema_decay
    resumed = train_sasrec(split, model_config, train_config, checkpointer=checkpointer)
    uninterrupted = train_sasrec(split, model_config, train_config)

    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4, 5]
    assert [r.loss for r in resumed.history] == [r.loss for r in uninterrupted.history]
    assert resumed.best_epoch == uninterrupted.best_epoch
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_a_checkpoint_of_another_configuration_is_not_resumed(
    split: LeaveOneOutSplit, tmp_path: Path
) -> None:
    checkpointer = Checkpointer(LocalStore(tmp_path), "ckpt/last.pt")
    train_sasrec(split, *tiny_configs(split, epochs=2), checkpointer=checkpointer)
    model_config, train_config = tiny_configs(split, epochs=2)
    train_config.lr = 1e-2

    result = train_sasrec(split, model_config, train_config, checkpointer=checkpointer)

    assert checkpointer.load() is not None
    assert result.epochs_run == 2
    assert result.history[0].loss != pytest.approx(0.0)


def test_training_with_a_text_tower_uses_the_item_text(split: LeaveOneOutSplit) -> None:
    model_config, train_config = tiny_configs(split, epochs=2)
    model_config.text_dim = 8
    item_text = torch.randn(
        split.n_items + 1, 8, generator=torch.Generator().manual_seed(0)
    )

    result = train_sasrec(split, model_config, train_config, item_text=item_text)

    assert torch.equal(result.model.get_buffer("item_text"), item_text)
    assert result.model.text_proj is not None


# Every public name of shopml.training before it was split, and the module holding it.
TRAINING_HOMES = {
    "Checkpointer": "shopml.checkpoints",
    "DEVICES": "shopml.distributed",
    "DistContext": "shopml.distributed",
    "init_distributed": "shopml.distributed",
    "is_main_process": "shopml.distributed",
    "resolve_device": "shopml.distributed",
    "FinalFitResult": "shopml.final_fit",
    "final_fit": "shopml.final_fit",
    "final_fit_split": "shopml.final_fit",
    "refit_sasrec": "shopml.final_fit",
    "train_sasrec": "shopml.train_loop",
    "training_windows": "shopml.train_loop",
    "SELECTION_METRIC": "shopml.train_state",
    "EpochCallback": "shopml.train_state",
    "EpochRecord": "shopml.train_state",
    "TrainConfig": "shopml.train_state",
    "TrainResult": "shopml.train_state",
}


def test_training_exports_every_name_it_held_before_the_split() -> None:
    assert sorted(shopml.training.__all__) == sorted(TRAINING_HOMES)


@pytest.mark.parametrize("name", sorted(TRAINING_HOMES))
def test_training_re_exports_the_object_of_its_home_module(name: str) -> None:
    home = importlib.import_module(TRAINING_HOMES[name])

    assert getattr(shopml.training, name) is getattr(home, name)
