"""What ``shopml run`` and ``shopml serve`` show a person at the terminal."""

from __future__ import annotations

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


def sample_raw_users(raw_dir: Path, n: int) -> list[str]:
    """The first ``n`` distinct raw user ids of the ingested events, in file order."""
    column = pq.read_table(raw_dir / "events.parquet", columns=["user_id"]).column(0)
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
    """The newest model: the latest ``recommender`` asset, fetched into ``home/serving``.

    Raises:
        FileNotFoundError: no model was trained yet.
    """
    from shopml.assets import AssetStore
    from shopml.storage import open_store

    assets = AssetStore(open_store(settings))
    try:
        version = assets.get("recommender")
    except KeyError as err:
        raise FileNotFoundError(
            "no trained model in the asset store yet; run `shopml run` first"
        ) from err
    folder = settings.home / "serving" / f"recommender-{version.version}"
    if not (folder / "manifest.json").exists():
        assets.fetch_dir("recommender", version.version, folder)
    return folder
