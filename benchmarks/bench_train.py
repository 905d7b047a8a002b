"""Side by side: our SASRec against RecBole's SASRec on the same MovieLens-100K split.

Run (``make bench-train``)::

    .venv/bin/python benchmarks/bench_train.py [--recbole-venv build/recbole-venv]

What it does:

1. fetches MovieLens-100K (shopml.datasets) and builds our leave-one-out split: events
   ordered per user by (timestamp, item_id), last item test, the one before validation;
2. trains our SASRec with the train stage's defaults, early stopping on validation
   NDCG@10, and scores the test targets with full ranking, history excluded;
3. creates a separate virtual environment (never a dependency of shopml) with
   ``recbole==1.2.1`` and ``torch==2.13.0`` (the CPU wheel; an unpinned torch would pull
   a multi-GB CUDA build), writes the same interactions as RecBole atomic files with
   each user's order encoded in the timestamp (so RecBole's leave-one-out by time makes
   the very same split), and trains RecBole's SASRec with its default hyper-parameters,
   full ranking, NDCG@10 as the validation metric;
4. prints for both: test NDCG@10 and HR@10, wall time to the best validation checkpoint
   (an "epoch" is different work in each library, so time to quality is compared) and
   peak RSS, and the two targets (NDCG@10 >= 1.15 x RecBole's, time to best <= 0.5 x).

Both run with the same number of torch threads (``--threads``, default 2). Nothing is
asserted: the figures are printed. ``--only ours`` / ``--only recbole`` runs one side
and reports against the other side's last figures in ``--work`` (RecBole also leaves a
per-epoch ``recbole.json.progress.jsonl`` there, readable while it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECBOLE_PINS = ("recbole==1.2.1", "torch==2.13.0")

# Runs inside the RecBole environment: argv = data dir, threads, output json.
RECBOLE_RUN = r"""
import json, resource, sys, time
import torch
_load = torch.load
torch.load = lambda *a, **k: _load(*a, **{"weights_only": False, **k})  # RecBole 1.2.1
import numpy as np
for name, alias in (("float_", np.float64), ("complex_", np.complex128),
                    ("unicode_", np.str_)):
    if not hasattr(np, name):
        setattr(np, name, alias)  # RecBole 1.2.1 predates NumPy 2
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed

data_dir, threads, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(threads)
# RecBole's documented defaults (overall.yaml, SASRec.yaml: 2 layers, 2 heads, hidden
# 64, dropout 0.5, Adam lr 1e-3, batch 2048, CE, MAX_ITEM_LIST_LENGTH 50, validation
# every epoch, stopping_step 10) except the protocol settings that make the split ours,
# epochs 200 (early stopping ends far sooner), and the pure speed knobs, kept at their
# defaults too: worker 0 (in-process loading), eval_batch_size 4096 (all 943 users in
# one full-ranking batch), eval_step 1 (full ranking of ML-100K costs ~1 % of an epoch).
config = Config(model="SASRec", dataset="bench", config_dict={
    "data_path": data_dir, "checkpoint_dir": data_dir + "/saved", "device": "cpu",
    "use_gpu": False, "seed": 42, "reproducibility": True, "show_progress": False,
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                  "group_by": "user", "mode": "full"},
    "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
    "train_neg_sample_args": None, "loss_type": "CE", "epochs": 200,
    "stopping_step": 10, "MAX_ITEM_LIST_LENGTH": 50,
})
init_seed(config["seed"], config["reproducibility"])
dataset = create_dataset(config)
train_data, valid_data, test_data = data_preparation(config, dataset)
model = SASRec(config, train_data.dataset)
trainer = Trainer(config, model)
marks = {"best": None, "best_score": -1.0}
started = time.monotonic()
progress = open(out + ".progress.jsonl", "w")
def on_valid(epoch, score):
    elapsed = time.monotonic() - started
    if score > marks["best_score"]:
        marks["best_score"], marks["best"] = score, elapsed
    progress.write(json.dumps({"epoch": epoch, "valid_ndcg_10": score,
                               "seconds": elapsed}) + "\n")
    progress.flush()
trainer.fit(train_data, valid_data, saved=True, show_progress=False,
            callback_fn=on_valid)
total = time.monotonic() - started
test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
json.dump({"ndcg_10": float(test["ndcg@10"]), "hr_10": float(test["hit@10"]),
           "seconds_to_best": marks["best"], "seconds_total": total,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "n_users": int(dataset.user_num - 1), "n_items": int(dataset.item_num - 1)},
          open(out, "w"))
"""


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_split(data_dir: Path):  # type: ignore[no-untyped-def]
    """Our leave-one-out split of MovieLens-100K."""
    import pandas as pd

    from shopml.datasets import fetch_movielens_100k
    from shopml.sequences import split_events

    files = fetch_movielens_100k(data_dir)
    events, catalog = pd.read_parquet(files.events), pd.read_parquet(files.catalog)
    return split_events(events, catalog)


def run_ours(split, threads: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Train with the train stage's defaults; time to best = epochs up to the best."""
    import torch

    from components.train import TrainParams, _configs
    from shopml.evaluation import evaluate_scorer
    from shopml.training import train_sasrec

    torch.set_num_threads(threads)
    params = TrainParams(device="cpu", show_progress=False)
    model_config, train_config = _configs(params, split.n_items)
    result = train_sasrec(split, model_config, train_config)
    test = evaluate_scorer(
        result.model.full_sort_scores, split, "test", max_seq_len=params.max_seq_len
    )
    to_best = sum(r.seconds for r in result.history if r.epoch <= result.best_epoch)
    return {
        "ndcg_10": test["ndcg_10"],
        "hr_10": test["hr_10"],
        "seconds_to_best": to_best,
        "seconds_total": result.seconds,
        "peak_rss_mb": peak_rss_mb(),
        "n_users": float(len(split.user_ids)),
        "n_items": float(split.n_items),
    }


def write_atomic_files(split, folder: Path) -> None:  # type: ignore[no-untyped-def]
    """Our sequences as RecBole's ``bench.inter``; timestamp = position in the order.

    Training history, then the validation item, then the test item: RecBole's
    leave-one-out by time (stable sort) then holds out exactly our targets.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user, seq, valid, test in zip(
        split.user_ids, split.train_seqs, split.valid_items, split.test_items,
        strict=True,
    ):  # fmt: skip
        full = [*seq.tolist(), *(x for x in (valid, test) if x > 0)]
        lines += [f"{user}\t{item}\t{t}" for t, item in enumerate(full)]
    (folder / "bench.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")


def ensure_recbole_venv(venv: Path) -> Path:
    """Create the separate environment once; returns its python."""
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *RECBOLE_PINS], check=True
        )
        (venv / ".installed").touch()
    return python


def run_recbole(  # type: ignore[no-untyped-def]
    split, venv: Path, work: Path, threads: int
) -> dict[str, float]:
    """Train RecBole's SASRec in its own environment on the same split."""
    python = ensure_recbole_venv(venv)
    write_atomic_files(split, work / "bench")
    out = work / "recbole.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(
        [str(python), "-c", RECBOLE_RUN, str(work), str(threads), str(out)],
        check=True,
        cwd=work,
        env=env,
    )
    figures: dict[str, float] = json.loads(out.read_text())
    return figures


def report(ours: dict[str, float], theirs: dict[str, float]) -> None:
    """Print the two rows and the targets."""
    print(
        f"{'':10}{'NDCG@10':>9}{'HR@10':>8}{'s to best':>11}{'s total':>9}{'RSS MiB':>9}"
    )
    for name, row in (("shopml", ours), ("recbole", theirs)):
        print(
            f"{name:10}{row['ndcg_10']:>9.4f}{row['hr_10']:>8.4f}"
            f"{row['seconds_to_best']:>11.1f}{row['seconds_total']:>9.1f}"
            f"{row['peak_rss_mb']:>9.0f}"
        )
    quality = ours["ndcg_10"] / theirs["ndcg_10"]
    speed = ours["seconds_to_best"] / theirs["seconds_to_best"]
    print(
        f"NDCG@10 ratio {quality:.2f} (target >= 1.15): {'met' if quality >= 1.15 else 'missed'}"
    )
    print(
        f"time-to-best ratio {speed:.2f} (target <= 0.50): {'met' if speed <= 0.5 else 'missed'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--recbole-venv", type=Path, default=REPO / "build" / "recbole-venv"
    )
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-recbole", action="store_true")
    parser.add_argument(
        "--only",
        choices=("both", "ours", "recbole"),
        default="both",
        help="run one side; the other side's last figures are read from --work",
    )
    args = parser.parse_args()
    home = Path(os.environ.get("SHOPML_HOME", REPO / ".shopml"))
    args.work.mkdir(parents=True, exist_ok=True)

    split = load_split(home / "datasets" / "movielens-100k")
    print(
        f"MovieLens-100K: users={len(split.user_ids)} items={split.n_items}", flush=True
    )
    ours_file = args.work / "shopml.json"
    if args.only in ("both", "ours"):
        ours = run_ours(split, args.threads)
        ours_file.write_text(json.dumps(ours))
        print(f"shopml: {json.dumps(ours)}", flush=True)
    if args.skip_recbole:
        return
    if args.only in ("both", "recbole"):
        theirs = run_recbole(split, args.recbole_venv, args.work, args.threads)
        print(f"recbole: {json.dumps(theirs)}", flush=True)
    if ours_file.is_file() and (args.work / "recbole.json").is_file():
        ours = json.loads(ours_file.read_text())
        report(ours, json.loads((args.work / "recbole.json").read_text()))


if __name__ == "__main__":
    main()
