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

Both run with the same number of torch threads (``--threads``, default 2) and the same
allocator setting (jemalloc keeping freed pages, else a glibc heap that is never trimmed;
see ``JEMALLOC_CONF``). Nothing is asserted: the figures are printed. ``--only ours`` /
``--only recbole`` runs one side and reports against the other side's last figures in
``--work``; ``--only report`` just prints the table. RecBole leaves a per-epoch
``recbole.json.progress.jsonl`` there, readable while it runs; until it stops, the
report says how far it has got.

Why RecBole takes so long (profiled with cProfile): its SASRec trains on every prefix
of every history (97,171 prefixes of MovieLens-100K, each a full 50-step forward pass
with the loss on its last position only), ours on 2,866 windows with a loss at every
position: RecBole runs ~34x more Transformer positions per epoch for about the same
number of loss terms (97k vs 113k), and nearly all its time is the forward/backward
pass (data preparation ~4 s, one full-ranking validation ~1 s). On top of that glibc
unmapped and re-faulted its 100 MB activations every step, which the allocator setting
removes (2.7x less CPU per step). The ``reproducibility`` flag only touches cuDNN, and
the NumPy-2 shims are aliases: neither costs anything on the CPU.

How long each side takes here (2 cores; figures of one run on this machine):
ours ~36 epochs of ~4.3 s, about 2.5 min to early stop on a quiet machine (10-20 min
when the machine is shared); RecBole about 6 CPU-seconds per 2048-prefix batch, 48
batches an epoch: ~2 min per epoch quiet on 2 threads, ~3 min on one thread pinned to
its own core (``taskset -c 1 ... --threads 1``), 20-30 min per epoch when shared, and
tens of epochs to its early stop, so hours. Run it with ``nohup`` and ``--only
recbole`` and read the progress file; ``--resume`` goes on from RecBole's last
checkpoint when a run had to be stopped, so it can be spread over several sittings.
The progress file records wall and CPU seconds; a run pinned to a core of its own
has the two alike.
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECBOLE_PINS = ("recbole==1.2.1", "torch==2.13.0")

# glibc returns every freed block above 32 MiB to the kernel (munmap), so each training
# step of either library faults its activations in afresh, page by page: RecBole's
# 2048 x 50 x 256 activations made its step 2.7x slower (a third of its CPU time in the
# kernel). Both sides run with jemalloc keeping freed pages (no purging), the same peak
# RSS as glibc; without jemalloc, glibc keeps its heap (no mmap, no trim), which costs
# some peak RSS. Neither changes any result.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
ALLOCATOR_MARK = "SHOPML_BENCH_ALLOCATOR"

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
resume = sys.argv[4] if len(sys.argv) > 4 else ""
torch.set_num_threads(threads)
# RecBole's documented defaults (overall.yaml, SASRec.yaml: 2 layers, 2 heads, hidden
# 64, inner 256, dropout 0.5, gelu, Adam lr 1e-3, batch 2048, CE, MAX_ITEM_LIST_LENGTH
# 50, eval_step 1, stopping_step 10, reproducibility, worker 0, no AMP). Set otherwise
# (none is a modelling choice): data_path/checkpoint_dir/device/use_gpu (where to run),
# show_progress off (no bars), the atomic-file fields and load_col (our schema),
# eval_args LS valid_and_test + TO + by user + full ranking (our leave-one-out split;
# RecBole's default is a random 80/10/10 split), metrics Hit/NDCG@10 and valid_metric
# NDCG@10 (our selection metric; default MRR@10), train_neg_sample_args None (required
# by CE), epochs 200 instead of 300 (an upper bound; stopping_step ends it sooner).
# Outside the config: torch threads = OMP_NUM_THREADS = --threads, and the allocator
# (see JEMALLOC_CONF), as on our side.
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
marks = {"best": None, "best_cpu": None, "best_score": -1.0}
kept, offset, offset_cpu = [], 0.0, 0.0
if resume:  # go on from the last best epoch's checkpoint; later epochs are re-run
    trainer.resume_checkpoint(resume)
    rows = [json.loads(line) for line in open(out + ".progress.jsonl") if line.strip()]
    kept = [row for row in rows if row["epoch"] < trainer.start_epoch]
    if not kept:
        sys.exit(f"no epoch before {trainer.start_epoch} in {out}.progress.jsonl")
    last = kept[-1]
    if (last["epoch"] != trainer.start_epoch - 1
            or abs(last["valid_ndcg_10"] - trainer.best_valid_score) > 1e-6):
        sys.exit(f"{resume} is not the best epoch of the progress file: {last}")
    offset, offset_cpu = last["seconds"], last["cpu_seconds"]
    marks.update(best=offset, best_cpu=offset_cpu, best_score=last["valid_ndcg_10"])
started = time.monotonic() - offset
started_cpu = time.process_time() - offset_cpu
progress = open(out + ".progress.jsonl", "w")
progress.writelines(json.dumps(row) + "\n" for row in kept)
progress.flush()
if resume:
    print(f"RecBole resumes at epoch {trainer.start_epoch} from {resume}", flush=True)
def on_valid(epoch, score):
    elapsed, cpu = time.monotonic() - started, time.process_time() - started_cpu
    if score > marks["best_score"]:
        marks["best_score"], marks["best"], marks["best_cpu"] = score, elapsed, cpu
    progress.write(json.dumps({"epoch": epoch, "valid_ndcg_10": score,
                               "seconds": elapsed, "cpu_seconds": cpu}) + "\n")
    progress.flush()
trainer.fit(train_data, valid_data, saved=True, show_progress=False,
            callback_fn=on_valid)
total = time.monotonic() - started
test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
json.dump({"ndcg_10": float(test["ndcg@10"]), "hr_10": float(test["hit@10"]),
           "seconds_to_best": marks["best"], "seconds_total": total,
           "cpu_seconds_to_best": marks["best_cpu"],
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
    from shopml.train_loop import train_sasrec

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
        "valid_ndcg_10": result.best_valid["ndcg_10"],
        "best_epoch": float(result.best_epoch),
        "epochs": float(result.epochs_run),
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


def last_checkpoint(work: Path) -> Path:
    """RecBole's newest checkpoint (saved at each new best validation epoch)."""
    saved = sorted(
        (work / "saved").glob("SASRec-*.pth"), key=lambda p: p.stat().st_mtime
    )
    if not saved:
        raise SystemExit(f"--resume: no RecBole checkpoint in {work / 'saved'}")
    return saved[-1]


def run_recbole(  # type: ignore[no-untyped-def]
    split, venv: Path, work: Path, threads: int, resume: bool = False
) -> dict[str, float]:
    """Train RecBole's SASRec in its own environment on the same split.

    With ``resume``, training goes on from the newest checkpoint (the last best epoch);
    the epochs run after it before the interruption are run again, and their time is
    not counted (in RecBole's favour). Random draws after a resume differ from an
    uninterrupted run's.
    """
    python = ensure_recbole_venv(venv)
    write_atomic_files(split, work / "bench")
    out = work / "recbole.json"
    out.unlink(missing_ok=True)  # a stale result must not pass for this run's
    env = {**os.environ, **allocator_env(), "OMP_NUM_THREADS": str(threads)}
    checkpoint = [str(last_checkpoint(work))] if resume else []
    subprocess.run(
        [
            str(python),
            "-c",
            RECBOLE_RUN,
            str(work),
            str(threads),
            str(out),
            *checkpoint,
        ],
        check=True,
        cwd=work,
        env=env,
    )
    figures: dict[str, float] = json.loads(out.read_text())
    return figures


def recbole_progress(work: Path) -> dict[str, float] | None:
    """RecBole's best validation so far, from its per-epoch progress file."""
    path = work / "recbole.json.progress.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    if not rows:
        return None
    best = max(rows, key=lambda row: row["valid_ndcg_10"])  # first of equals
    return {
        "epochs": float(rows[-1]["epoch"] + 1),
        "best_epoch": float(best["epoch"] + 1),
        "valid_ndcg_10": float(best["valid_ndcg_10"]),
        "seconds_to_best": float(best["seconds"]),
        "seconds_total": float(rows[-1]["seconds"]),
    }


def report(ours: dict[str, float], theirs: dict[str, float]) -> None:
    """Print the two rows and the two targets with their ratios."""
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
        f"NDCG@10 ours/recbole = {quality:.2f} (target >= 1.15): "
        f"{'met' if quality >= 1.15 else 'MISSED'}"
    )
    print(
        f"time to best ours/recbole = {speed:.2f} (target <= 0.50): "
        f"{'met' if speed <= 0.5 else 'MISSED'}"
    )


def report_partial(ours: dict[str, float], progress: dict[str, float]) -> None:
    """RecBole has not stopped yet: what its progress file says so far."""
    print(
        f"recbole still running: {progress['epochs']:.0f} epochs in "
        f"{progress['seconds_total']:.0f} s, best validation NDCG@10 "
        f"{progress['valid_ndcg_10']:.4f} at epoch {progress['best_epoch']:.0f} "
        f"({progress['seconds_to_best']:.0f} s); no test figures until it stops"
    )
    print(
        f"shopml: test NDCG@10 {ours['ndcg_10']:.4f}, HR@10 {ours['hr_10']:.4f}, "
        f"{ours['seconds_to_best']:.1f} s to best; time to best ours/recbole <= "
        f"{ours['seconds_to_best'] / progress['seconds_to_best']:.2f} "
        f"(a later best epoch of recbole's can only come later)"
    )


def allocator_env() -> dict[str, str]:
    """Environment that makes a process keep freed memory (see ``JEMALLOC_CONF``)."""
    jemalloc = ctypes.util.find_library("jemalloc")
    if jemalloc:
        env = {"LD_PRELOAD": jemalloc, "MALLOC_CONF": JEMALLOC_CONF}
    else:
        env = {"GLIBC_TUNABLES": MALLOC_TUNABLES}
    return {**env, ALLOCATOR_MARK: next(iter(env.values()))}


def _reexec_with_allocator() -> None:
    """Restart this process under :func:`allocator_env` (read at start-up only)."""
    if ALLOCATOR_MARK not in os.environ:
        env = {**os.environ, **allocator_env()}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--recbole-venv", type=Path, default=REPO / "build" / "recbole-venv"
    )
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-recbole", action="store_true")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="RecBole only: go on from its newest checkpoint in --work (hours-long "
        "runs can be split over several sittings)",
    )
    parser.add_argument(
        "--only",
        choices=("both", "ours", "recbole", "report"),
        default="both",
        help="run one side (the other side's last figures are read from --work), "
        "or none and print the table from the last figures",
    )
    args = parser.parse_args()
    if args.only != "report":
        _reexec_with_allocator()
    from shopml.logs import configure_logging

    configure_logging()  # one line per epoch of ours
    args.work.mkdir(parents=True, exist_ok=True)
    ours_file, theirs_file = args.work / "shopml.json", args.work / "recbole.json"
    if args.only != "report":
        home = Path(os.environ.get("SHOPML_HOME", REPO / ".shopml"))
        split = load_split(home / "datasets" / "movielens-100k")
        print(
            f"MovieLens-100K: users={len(split.user_ids)} items={split.n_items}",
            flush=True,
        )
    if args.only in ("both", "ours"):
        ours = run_ours(split, args.threads)
        ours_file.write_text(json.dumps(ours))
        print(f"shopml: {json.dumps(ours)}", flush=True)
    if args.skip_recbole:
        return
    if args.only in ("both", "recbole"):
        theirs = run_recbole(
            split, args.recbole_venv, args.work, args.threads, args.resume
        )
        print(f"recbole: {json.dumps(theirs)}", flush=True)
    if not ours_file.is_file():
        print(f"no figures of ours in {args.work}: run with --only ours")
        return
    ours = json.loads(ours_file.read_text())
    if theirs_file.is_file():
        report(ours, json.loads(theirs_file.read_text()))
    elif (progress := recbole_progress(args.work)) is not None:
        report_partial(ours, progress)
    else:
        print(f"no figures of RecBole in {args.work}: run with --only recbole")


if __name__ == "__main__":
    main()
