"""SASRec against every baseline on real data: Amazon Scientific 2018 5-core.

Slow (many minutes on two cores): trains full-size models on 8,442 users and 4,385
items, and the text-tower tests encode every title with MiniLM. Run with
``make test-slow``. Figures are printed (``pytest -s``) as well as asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.evaluate import BASELINE_SEQ_LEN, BASELINES, fit_baselines
from shopml.datasets import load_amazon_scientific
from shopml.evaluation import SegmentRules, evaluate_ranking, evaluate_scorer
from shopml.models.sasrec import SASRecConfig
from shopml.models.text import item_text_embeddings
from shopml.sequences import LeaveOneOutSplit, Stage, cold_start_split, split_events
from shopml.training import TrainConfig, TrainResult, refit_sasrec, train_sasrec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_SEQ_LEN = 20
# Amazon's own settings, tuned on the validation split only (issue 6); the train
# stage's defaults stay tuned on MovieLens. Histories are short (mean 7) and sparse
# (13.6 interactions per item), so 20 positions suffice and dropout is high. Width 128:
# a 64-wide item table underfits the item-to-item relations ItemKNN reads directly
# (valid NDCG@10 with text 0.085 at 64, 0.089 at 128). A cosine schedule over 20
# epochs (warm-up 100 steps) at lr 1e-3 with a little decay on the embedding tables
# anneals within the run instead of overfitting at a constant rate (valid 0.0895).
HIDDEN_SIZE = 256  # 128 until graph smoothing (below): 256 overfitted without it
EPOCHS = 20
LR = 1e-3
EMBEDDING_WEIGHT_DECAY = 0.1
WARMUP_RATIO = 0.065  # 100 of the 20 x 77 steps
# Graph smoothing of the item table over the training co-occurrence graph and a moving
# average of the weights: the two changes that moved valid NDCG@10 past noise (see
# the end of this comment). Seed 0, the seed of every trial recorded here.
COOCCURRENCE_MIX = 0.6
COOCCURRENCE_NEIGHBORS = 20
EMA_DECAY = 0.995
SEED = 0
# Tried on top of these settings (text tower on, one seed, SASRecConfig options that
# all default to off), valid NDCG@10 (HR@10) -> test NDCG@10 (HR@10); ItemKNN is
# valid 0.0899 (0.1270) -> test 0.0888 (0.1227); 10-epoch runs: cosine schedule over
# 10 epochs, the rest as above:
#   these settings, dot-product scores          0.0895          -> 0.0821 (0.1195)
#   normalize (cosine, temp. 0.1), 20 epochs    0.0888 (0.1352) -> 0.0814 (0.1181)
#   normalize + label_smoothing 0.1, 10 epochs  0.0890 (0.1356) -> 0.0813 (0.1169)
#   normalize + reverse_prob 0.5, 10 epochs     0.0892 (0.1375) -> 0.0809 (0.1153)
#   norm. + smoothing 0.1 + item_mask_prob 0.1  0.0896 (0.1369) -> 0.0819 (0.1194)
#   norm. + smoothing 0.1 + reverse_prob 0.5    0.0899 (0.1387) -> 0.0813 (0.1154)
#   norm. + smoothing + popularity_adjust 0.5   0.0860 (0.1273) -> 0.0800 (0.1128)
# Cosine scores learn twice as fast (valid 0.085 after 3 epochs) but overfit after
# epoch 6; smoothing, masking and reversal trade that back, to within a seed's noise
# of the dot-product settings, which are kept. Valid HR@10 beats ItemKNN's by 6-9 %
# in every cosine run but the last, valid NDCG@10 never by more than noise, and
# every SASRec loses 8-9 % NDCG@10 from valid to test while ItemKNN loses 1 %
# (popularity 16 %, ALS 8 %): the test targets are the newest interactions, and what
# a model learns of the training period's popularity holds less there. Taking
# popularity out in training (logit adjustment) did not help either.
#
# The final fit (shopml.training.refit_sasrec): phase 1 above picks the epoch count on
# valid (11 of 20, early-stopped at 16; valid NDCG@10 0.0895); phase 2 retrains from
# scratch, same seed and schedule, on train + every validation item for 11 epochs,
# and every baseline is fitted on train + valid too (fit_baselines(split, "test")).
# Test NDCG@10 (HR@10), fitted on train -> fitted on train + valid:
#   SASRec+text  0.0821 (0.1195) -> 0.0893 (0.1320)   +8.8 % NDCG, +10.5 % HR
#   ItemKNN      0.0888 (0.1227) -> 0.0948 (0.1294)   +6.8 %, +5.5 %
#   ALS          0.0685 (0.1031) -> 0.0719 (0.1079)
#   popularity   0.0180 (0.0316) -> 0.0180 (0.0315)
# SASRec gains most from the newest transitions and now leads on HR@10, but ItemKNN
# still ranks its hits higher (NDCG@10 -5.8 %, was -7.5 %).
#
# Seed ensembles and weight averaging, phase 1 on valid only (these settings, text
# on, seeds 0..K-1, each member early-stopped on its own raw weights, patience 5).
# An ensemble scores by the mean of its members' logits, which still serves as one
# dot product of K*H-wide vectors. EMA: an exponential moving average of the weights
# updated every step, evaluated each epoch, its best epoch kept. Valid NDCG@10
# (HR@10); ItemKNN 0.0899 (0.1270):
#                        best weights      EMA 0.995/step    EMA 0.99/step
#   seed 0 (K = 1)       0.0879 (0.1341)   0.0887 (0.1347)   0.0885 (0.1346)
#   seed 1               0.0898 (0.1369)   0.0915 (0.1408)   0.0910 (0.1393)
#   seed 2               0.0888 (0.1356)   0.0904 (0.1391)   0.0900 (0.1385)
#   K = 2 (seeds 0, 1)   0.0902 (0.1374)   0.0905 (0.1368)   0.0907 (0.1378)
#   K = 3 (seeds 0-2)    0.0908 (0.1381)   0.0912 (0.1398)   0.0909 (0.1386)
# (seed 0 with EMA 0.998: 0.0889 (0.1346); best epochs 15, 9, 7 of 20, 14, 12 run.)
# The seed alone moves valid NDCG@10 by 2 % (0.0879-0.0898). EMA adds 1-2 % to
# a single run and 3 members add 2 % to the mean single run (0.0888), but the two
# gains overlap (both average noise away: 3 EMA members add 1 % to the mean EMA
# run). The best, 3 members with EMA, is 0.0912:
# +1.4 % over ItemKNN on NDCG@10 (+10 % on HR@10), short of the 3 % margin asked
# for before test is looked at. So test was not looked at and neither was built.
# Width 256 (seed 0, the rest as above): best weights 0.0887 (0.1361) at epoch 5,
# EMA 0.995 0.0912 (0.1395) at epoch 6, overfitting from epoch 7 (128 wide, same
# seed: 0.0879 / 0.0887): +1 % / +3 %, about one seed's noise.
# Width 256, seeds 0-2, EMA 0.995 (best EMA epochs 6, 7, 7): members 0.0912 / 0.0908 /
# 0.0913; K = 2 0.0924-0.0935; K = 3 0.0940 (HR@10 0.1442), +4.6 % over ItemKNN on
# valid (raw weights, K = 3: 0.0930 (0.1419)): the first variant past the 3 % margin.
# So test was looked at, once, with the final fit (each member refitted on train +
# valid for its EMA epoch count, EMA kept; /tmp script, not built here). Test NDCG@10
# (HR@10): ensemble 0.0921 (0.1341) vs ItemKNN 0.0948 (0.1294), ALS 0.0719, popularity
# 0.0180; members 0.0886 / 0.0920 / 0.0912; fitted on train only, ensemble 0.0872
# (0.1265) vs ItemKNN 0.0888 (0.1227). NDCG@10 -2.8 % (was -5.8 %), HR@10 +3.6 %: the
# valid lead (+4.6 %) shrinks on test by about as much as every SASRec's did before.
#
# Where the test gap is (segments of evaluate_ranking; a "cold" target is an item seen
# at most COLD_ITEM_MAX_COUNT times in the histories; 22 % of test targets, 26 % of
# valid): NDCG@10 of that ensemble vs ItemKNN, valid (fitted on train) / test (final
# fit): warm targets 0.1187 vs 0.1093 / 0.1121 vs 0.1117, cold targets 0.0253 vs
# 0.0357 / 0.0215 vs 0.0351. SASRec ties ItemKNN on warm targets on test and loses on
# rare ones by 39 %; its +8.6 % on warm valid targets does not carry over to test.
# Over the epochs of one run (128 wide, seed 0) warm valid NDCG@10 peaks near epoch
# 10 (0.1126) and falls, while cold valid NDCG@10 still climbs at epoch 20 (0.0221 at
# epoch 1 from the text alone, 0.0038 at epoch 3, 0.0262 at epoch 20): rare items are
# learnt last, by their ids.
# Tried next on valid (128 wide, seed 0, EMA 0.995; the same without: raw 0.0879
# (0.1341), EMA 0.0887 (0.1347)), best raw / best EMA NDCG@10 (EMA HR@10):
#   also the 2nd and 3rd next items as targets (weight 0.5)   0.0893 / 0.0889 (0.1362)
#   text = title + category + brand (the whole item text)     0.0887 / 0.0896 (0.1388)
#   label smoothing onto the target's 100 ItemKNN neighbours,
#     0.2 of the mass, by similarity                         0.0894 / 0.0898 (0.1369)
#   whole text + that smoothing                               0.0894 / 0.0909 (0.1401)
#   id_dropout 0.2                                            0.0895 / 0.0895 (0.1386)
#   a learnt last-item -> next-item table (item x item logits) added to the
#     scores: at lr 1e-3 it stays near 0 (EMA 0.0885 at epoch 11), at its own lr
#     1e-2 it memorises and overfits (EMA best 0.0807)
#   id part scaled by c / (c + 10), c = the item's training count (rare items lean
#     on text): cold valid NDCG@10 falls to 0.008 at epoch 11 (0.0225 without)
# and, 256 wide, whole text + smoothing, seed 0: EMA 0.0920 (0.1414) vs 0.0912: +1 %.
# Logit adjustment in training (popularity_adjust, dot-product scores, EMA): 0.25 EMA
# 0.0883 (0.1340), 0.5 EMA 0.0870 (0.1320); cold valid NDCG@10 rises (0.026 / 0.032 at
# epoch 10, 0.0206 without) and warm falls (0.1106 / 0.1060, 0.1126 without).
# A popularity discount at scoring time on the 256-wide ensemble (scores minus
# beta * log(1 + training count)), valid NDCG@10: beta 0 0.0940, 0.1 0.0936, 0.2
# 0.0927, 0.5 0.0895 (cold targets gain, warm ones lose more). None of these is past
# a seed's noise (2 %), so test was not looked at again and none is built, except the
# moving average of the weights (TrainConfig.ema_decay), which added 0.9-2.8 % at
# every seed and width tried (128 wide, seeds 0-2: +0.9 / +1.9 / +1.8 %; 256 wide:
# +2.8 %). Built, it reproduces the trial: train_sasrec with ema_decay 0.995 (128
# wide, seed 0) early-stops on the average at epoch 17, keeping epoch 12: valid
# NDCG@10 0.0887 (HR@10 0.1347), as the trial script's average.
#
# What closed the gap: graph smoothing of the item table (SASRecConfig.
# cooccurrence_mix): every item's representation is 1 - mix of its own and mix of
# the weighted mean of its 20 most co-occurring items in the training histories
# (ItemKNN's cosine with shrink 10, normalised per item). A rare item scores through
# the items bought with it from the first epoch instead of waiting for its id.
# Valid NDCG@10 (HR@10), 128 wide, seed 0, EMA 0.995 (0.0887 without the mix):
#   mix 0.3  0.0907 (0.1389)     mix 0.6  0.0931 (0.1425)
#   mix 0.8  0.0911 (0.1413)     mix 0.95 0.0854 (0.1344)
# (a first trial script; the built option, whose ties between equal links break by
# item index, gives 0.0925 (0.1418) at 0.6). At 0.6, seeds 1 and 2: 0.0931 / 0.0922
# (0.0915 / 0.0904 without): 3 seeds 0.0926 against 0.0902, and the seeds spread
# 1 % instead of 3 %. 50 links instead of 20: 0.0917; 30 epochs instead of 20: best
# 0.0925 at epoch 15, no change. Cold valid targets 0.0275-0.0297 (0.0225 without),
# warm 0.1146-0.1162 (0.1126): rare targets gain most, warm ones do not lose.
# Width 256 with the mix (it overfitted from epoch 7 without, 0.0912): seed 0 valid
# 0.0953 (0.1493) at epoch 9 of 14, seed 1 0.0948 (0.1457) at 9, seed 2 0.0949
# (0.1457) at 10: +5.5-6.0 % over ItemKNN's 0.0899, past the 3 % asked for before
# test is looked at. Test, final fit (refitted on train + valid for those epochs),
# NDCG@10 (HR@10), ItemKNN 0.0948 (0.1294):
#   seed 0  0.0972 (0.1440)   seed 1  0.0958 (0.1423)   seed 2  0.0977 (0.1436)
# +2.5 / +1.1 / +3.1 % NDCG@10, +10-11 % HR@10. By segment, seed 0 vs ItemKNN:
# warm targets 0.1164 vs 0.1117, cold 0.0293 vs 0.0351 (0.0215 for the 256-wide
# ensemble without the mix): ItemKNN still ranks rare items better, SASRec now wins
# overall. These are the settings above (256 wide, mix 0.6, EMA 0.995, seed 0);
# this test, run with them on two threads, measured the same: valid 0.0953 at epoch
# 9; test 0.0972 (0.1440) vs ItemKNN 0.0948 (0.1294), ALS 0.0719 (0.1079),
# popularity 0.0180 (0.0315); fitted on train only 0.0898 (0.1335) vs ItemKNN 0.0888
# (0.1227).
# Since ItemKNN takes its neighbours from shopml.models.cooccurrence (ties broken by
# index), its train-only HR@10 is 0.1226; every other ItemKNN figure is unchanged.


@pytest.fixture(scope="module")
def amazon(shared_data: Path) -> tuple[LeaveOneOutSplit, list[str]]:
    """The split and the item titles (index 0 is padding)."""
    events, catalog = load_amazon_scientific(
        shared_data / "amazon-scientific-2018-5core"
    )
    split = split_events(events, catalog)
    titles = catalog.set_index("item_id")["title"].astype(str)
    return split, ["", *(titles.get(i, i) for i in split.vocab.item_ids[1:])]


def configs(
    split: LeaveOneOutSplit,
    item_text: torch.Tensor | None = None,
    id_dropout: float = 0.0,
) -> tuple[SASRecConfig, TrainConfig]:
    """The Amazon settings above, with or without a text tower."""
    text_dim = 0 if item_text is None else item_text.size(1)
    model_config = SASRecConfig(
        n_items=split.n_items,
        max_seq_len=MAX_SEQ_LEN,
        hidden_size=HIDDEN_SIZE,
        dropout=0.5,
        text_dim=text_dim,
        id_dropout=id_dropout,
        cooccurrence_mix=COOCCURRENCE_MIX,
        cooccurrence_neighbors=COOCCURRENCE_NEIGHBORS,
    )
    train_config = TrainConfig(
        epochs=EPOCHS,
        patience=5,
        lr=LR,
        embedding_weight_decay=EMBEDDING_WEIGHT_DECAY,
        warmup_ratio=WARMUP_RATIO,
        device="cpu",
        ema_decay=EMA_DECAY,
        seed=SEED,
    )
    return model_config, train_config


# Histories the baselines are fitted on (``LeaveOneOutSplit.histories``) -> label.
PROTOCOLS: tuple[tuple[Stage, str], ...] = (("valid", "train"), ("test", "train+valid"))


def train(
    split: LeaveOneOutSplit,
    item_text: torch.Tensor | None = None,
    id_dropout: float = 0.0,
) -> TrainResult:
    """Phase 1: train on the training histories, early-stopping on validation."""
    model_config, train_config = configs(split, item_text, id_dropout)
    return train_sasrec(split, model_config, train_config, item_text=item_text)


def refit(
    split: LeaveOneOutSplit, epochs: int, item_text: torch.Tensor | None = None
) -> TrainResult:
    """Phase 2: the same run from scratch on train + valid for phase 1's epochs."""
    model_config, train_config = configs(split, item_text)
    return refit_sasrec(split, model_config, train_config, epochs, item_text=item_text)


# Two 256-wide trainings and the baselines: 19 min on 2 cores.
@pytest.mark.timeout(3600)
def test_sasrec_beats_every_baseline(
    amazon: tuple[LeaveOneOutSplit, list[str]],
) -> None:
    """The final fit: the epoch count chosen on valid, every model refitted on
    train + valid and scored on test; the training-only protocol is printed too."""
    split, titles = amazon
    torch.set_num_threads(2)
    item_text = item_text_embeddings(titles)

    selected = train(split, item_text)  # phase 1: the epoch count, on valid only
    final = refit(split, selected.best_epoch, item_text)  # phase 2: train + valid

    figures = {
        f"{name}/{fitted_on}": evaluate_scorer(
            model.full_sort_scores, split, max_seq_len=BASELINE_SEQ_LEN
        )
        for stage, fitted_on in PROTOCOLS
        for name, model in fit_baselines(split, stage).items()
    }
    for fitted_on, result in (("train", selected), ("train+valid", final)):
        figures[f"sasrec/{fitted_on}"] = evaluate_scorer(
            result.model.full_sort_scores, split, max_seq_len=MAX_SEQ_LEN
        )
    print(
        json.dumps(
            {
                "epochs": selected.best_epoch,
                "sasrec_valid": round(selected.best_valid["ndcg_10"], 4),
                "test": {
                    m: {k: round(r[k], 4) for k in ("ndcg_10", "hr_10")}
                    for m, r in figures.items()
                },
            }
        )
    )
    sasrec = figures["sasrec/train+valid"]
    for name in BASELINES:
        baseline = figures[f"{name}/train+valid"]
        assert sasrec["ndcg_10"] > baseline["ndcg_10"], name
        assert sasrec["hr_10"] > baseline["hr_10"], name


@pytest.mark.timeout(3600)  # two trainings: 12 min on 2 cores
def test_the_text_tower_recommends_items_never_seen_in_training(
    amazon: tuple[LeaveOneOutSplit, list[str]],
) -> None:
    split, titles = amazon
    cold_split, cold = cold_start_split(split, fraction=0.1, seed=0)
    torch.set_num_threads(2)
    rules = SegmentRules(cold_item_max_count=0)

    with_text = train(cold_split, item_text_embeddings(titles), id_dropout=0.3)
    id_only = train(cold_split)

    cold_hr = {
        name: evaluate_ranking(
            result.model.full_sort_scores,
            cold_split,
            rules=rules,
            max_seq_len=MAX_SEQ_LEN,
        ).segments["cold_item"]
        for name, result in (("text", with_text), ("id_only", id_only))
    }
    print(json.dumps({"cold_items": len(cold), **cold_hr}))
    # measured: text tower HR@10 0.1649 (NDCG@10 0.1075) on 861 cold targets (312
    # items), id-only 0.0; 0.0627 at 128 wide without the mix and the moving average
    assert cold_hr["text"]["hr_10"] > 0.03
    assert cold_hr["text"]["hr_10"] > 5 * cold_hr["id_only"]["hr_10"]
