"""``shopml search``: build a search index, query it, evaluate it.

shopml search index --curated DIR --out DIR      # index the curated catalog.parquet
shopml search query "greek yogurt" --index DIR   # answer one query, print JSON
shopml search eval --index DIR --curated DIR --model-dir DIR --out DIR

``app`` is mounted under ``shopml search`` by :mod:`shopml.cli`. Query text is never
logged unmasked (see :func:`shopml.search.text.mask_pii`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Product search: index, query, evaluate.", no_args_is_help=True)


@app.command("index")
def index_command(
    curated: Annotated[Path, typer.Option(help="Folder with catalog.parquet.")],
    out: Annotated[Path, typer.Option(help="Folder for the search index.")],
    ann_threshold: Annotated[
        int, typer.Option(help="Catalogs larger than this get an HNSW graph.")
    ] = 50_000,
    store_asset: Annotated[
        bool, typer.Option(help="Also store it as asset search-index (models zone).")
    ] = False,
) -> None:
    """Build the BM25 + MiniLM index of a curated catalog."""
    from components.search_index import build_index
    from shopml.assets import asset_store_from_settings
    from shopml.config import load_settings
    from shopml.search.index import IndexConfig

    settings = load_settings()
    assets = asset_store_from_settings(settings) if store_asset else None
    summary = build_index(
        curated,
        out,
        IndexConfig(ann_threshold=ann_threshold),
        assets,
        settings.progress,
    )
    typer.echo(json.dumps(asdict(summary), indent=2))


@app.command("query")
def query_command(
    query: Annotated[str, typer.Argument(help="The query; empty for recommendations.")],
    index: Annotated[Path, typer.Option(help="The search index folder.")],
    k: Annotated[int, typer.Option(help="Results to show.")] = 10,
    category: Annotated[
        list[str] | None, typer.Option(help="Allowed category (repeatable).")
    ] = None,
    min_price: Annotated[float | None, typer.Option(help="Lowest price.")] = None,
    max_price: Annotated[float | None, typer.Option(help="Highest price.")] = None,
    mode: Annotated[str, typer.Option(help="hybrid, keyword or dense.")] = "hybrid",
    model_dir: Annotated[
        Path | None, typer.Option(help="Recommender model artifact (personalization).")
    ] = None,
    history: Annotated[
        list[str] | None, typer.Option(help="A history item id (repeatable).")
    ] = None,
) -> None:
    """Answer one query and print the hits as JSON."""
    from shopml.artifact import load_model_artifact
    from shopml.search import (
        SASRecPersonalizer,
        SearchEngine,
        SearchFilters,
        SearchOptions,
        TextEncoder,
        load_search_index,
    )

    personalizer = (
        SASRecPersonalizer(load_model_artifact(model_dir)) if model_dir else None
    )
    engine = SearchEngine(load_search_index(index), TextEncoder(), personalizer)
    try:
        filters = SearchFilters(tuple(category or ()), min_price, max_price)
        options = SearchOptions(mode=mode, k=k)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    response = engine.search(query, filters, options, history or [])
    typer.echo(json.dumps(asdict(response), indent=2, ensure_ascii=False))


@app.command("eval")
def eval_command(
    index: Annotated[Path, typer.Option(help="The search index folder.")],
    curated: Annotated[Path, typer.Option(help="Folder with events and catalog.")],
    out: Annotated[Path, typer.Option(help="Folder for the query set and table.")],
    model_dir: Annotated[
        Path | None, typer.Option(help="Recommender model artifact (personalization).")
    ] = None,
    n_items: Annotated[int, typer.Option(help="Items drawn for title queries.")] = 300,
    max_users: Annotated[
        int, typer.Option(help="Users drawn for basket queries.")
    ] = 300,
) -> None:
    """Score keyword, dense, hybrid and personalized hybrid search; print the table."""
    from components.search_eval import SearchEvalParams, evaluate_search
    from shopml.search.evaluation import format_table

    summary = evaluate_search(
        index,
        curated,
        model_dir,
        out,
        SearchEvalParams(n_items=n_items, max_users=max_users),
    )
    typer.echo(format_table(summary.table))
