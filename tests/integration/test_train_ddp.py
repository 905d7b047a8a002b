"""The PyTorchJob entry point: ``torchrun -m components.train`` with 2 CPU processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shopml.artifact import load_model_artifact, load_model_card
from tests.unit.test_training import catalog, cyclic_events

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_torchrun_trains_with_ddp_on_two_processes_and_rank_0_publishes(
    tmp_path: Path,
) -> None:
    curated = tmp_path / "curated"
    curated.mkdir()
    cyclic_events().to_parquet(curated / "events.parquet")
    catalog().to_parquet(curated / "catalog.parquet")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "components.train",
        f"--curated-uri={curated}",
        f"--model-uri={tmp_path / 'model'}",
        "--epochs=8",
        "--max-seq-len=10",
        "--hidden-size=32",
        "--device=cpu",
        "--ema-decay=0.9",  # each rank averages the same weights
        "--checkpoint-key=checkpoints/ddp/last.pt",
    ]

    done = subprocess.run(
        command,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend=gloo rank=1 world_size=2" in done.stderr
    artifact = load_model_artifact(tmp_path / "model")
    card = load_model_card(tmp_path / "model")
    assert artifact.config.n_items == 20
    assert card is not None and card.training["valid"]["ndcg_10"] > 0.5
    checkpoint = Path(os.environ["SHOPML_HOME"]) / "store" / "checkpoints" / "ddp"
    assert (checkpoint / "last.pt").is_file()
    # The final fit (on by default) also ran on both ranks, with its own checkpoint.
    assert (checkpoint / "last-final.pt").is_file()
    assert card.training["fit_on"] == "train+valid"
    assert json.loads((tmp_path / "model" / "config.json").read_text())["n_layers"] == 2
