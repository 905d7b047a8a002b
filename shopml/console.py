"""What ``shopml run`` and ``shopml serve`` show a person at the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import typer

from shopml.config import Settings


def print_evaluation(evaluation: dict[str, Any]) -> None:
    """Print the evaluation table: one row per model, one column per metric.

    Args:
        evaluation: ``{"models": {name: {metric: value}}, "protocol": str, ...}`` as the
            evaluate stage returns it.
    """
    models: dict[str, dict[str, float]] = evaluation["models"]
    metrics = [m for m in next(iter(models.values())) if m.endswith("@10")]
    typer.echo(
        f"Evaluation ({evaluation.get('protocol', 'leave-one-out, full ranking')})"
    )
    widths = [max(10, len(m) + 2) for m in metrics]
    header = f"  {'model':<12}" + "".join(
        f"{m:>{w}}" for m, w in zip(metrics, widths, strict=True)
    )
    typer.echo(header)
    for name, row in models.items():
        cells = (f"{row[m]:>{w}.4f}" for m, w in zip(metrics, widths, strict=True))
        typer.echo(f"  {name:<12}" + "".join(cells))
    if "gate" in evaluation:
        typer.echo(f"  gate: {evaluation['gate']}")


def sample_raw_users(raw_dir: Path, n: int, settings: Settings) -> list[str]:
    """The first ``n`` distinct raw user ids of the ingested events, in file order.

    ``raw_dir`` is the ingest stage's output: refs to the raw tables in the restricted
    raw zone (read through the audited asset store), or a folder of raw tables.
    """
    from shopml.assets import asset_store_from_settings, read_refs

    refs = read_refs(raw_dir)
    if refs is None:
        table = pq.read_table(raw_dir / "events.parquet", columns=["user_id"])
    else:
        name, _, version = refs["events"].partition("@")
        assets = asset_store_from_settings(settings)
        table = assets.read_table(name, version).select(["user_id"])
    column = table.column(0)
    seen: list[str] = []
    for value in column.to_pylist():
        if value is not None and value not in seen:
            seen.append(str(value))
            if len(seen) == n:
                break
    return seen


def print_recommendations(endpoint: str, users: list[str], k: int = 10) -> None:
    """Ask the running endpoint (v1 protocol) for each user's top-k and print them."""
    url = f"{endpoint}:predict"
    body = {"instances": [{"user_id": user, "k": k} for user in users]}
    response = httpx.post(url, json=body, timeout=30)
    response.raise_for_status()
    typer.echo(f"\nTop-{k} from {url}")
    for user, prediction in zip(users, response.json()["predictions"], strict=True):
        typer.echo(f"  user {user}:")
        for rank, (title, score) in enumerate(
            zip(prediction["titles"], prediction["scores"], strict=True), start=1
        ):
            typer.echo(f"    {rank:>2}. {title}  ({score:.3f})")


def latest_model_dir(settings: Settings) -> Path:
    """The model to serve, fetched into ``home/serving``.

    The live version (``models/recommender/_live``, marked by the deploy stage) when
    there is one, else the newest version whose evaluation gate passed: a model the
    gate blocked is never served by default.

    Raises:
        FileNotFoundError: no model was trained yet, or none passed the gate.
    """
    from shopml.assets import LIVE_POINTER, asset_store_from_settings

    assets = asset_store_from_settings(settings)
    pointer = f"models/recommender/{LIVE_POINTER}"
    versions = [v for v in assets.list() if v.name == "recommender"]
    if not versions:
        raise FileNotFoundError(
            "no trained model in the asset store yet; run `shopml run` first"
        )
    if assets.store.exists(pointer):
        chosen = assets.get(
            "recommender", json.loads(assets.store.get_bytes(pointer))["version"]
        )
    else:
        passed = [v for v in versions if _gate_passed(v.quality)]
        if not passed:
            raise FileNotFoundError(
                f"no recommender version passed the evaluation gate (newest: "
                f"{versions[-1].ref}); retrain with `shopml run`, or serve a model "
                "folder explicitly with --model-dir"
            )
        chosen = passed[-1]
    folder = settings.home / "serving" / f"recommender-{chosen.version}"
    if not (folder / "manifest.json").exists():
        assets.fetch_dir("recommender", chosen.version, folder)
    return folder


def _gate_passed(quality: dict[str, Any] | None) -> bool:
    gate = (quality or {}).get("gate")
    return isinstance(gate, dict) and gate.get("passed") is True
