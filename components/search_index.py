"""Search index stage: BM25 + MiniLM vectors over the curated catalog, as a model asset.

The core :func:`build_index` reads ``catalog.parquet`` from the curated folder, builds
the index (:mod:`shopml.search.index`), writes it into the output folder and, when
asked, stores it as a versioned asset ``search-index`` in the ``models`` zone. The KFP
component :func:`search_index` only maps artifacts and parameters onto it.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from kfp import dsl

from components.common import stage_component
from shopml.assets import AssetStore
from shopml.search.encoder import ENCODER_NAME, TextEncoder
from shopml.search.index import IndexConfig, build_search_index, save_search_index

logger = logging.getLogger(__name__)

CATALOG_FILE = "catalog.parquet"
ASSET_NAME = "search-index"


@dataclass(frozen=True)
class IndexSummary:
    """What the stage built.

    Attributes:
        index_dir: the index folder.
        n_items: items indexed.
        vocab_size: distinct BM25 tokens.
        has_ann: whether an HNSW graph was built (catalog above ``ann_threshold``).
        seconds: build time.
        asset_ref: ``search-index@version`` when stored as an asset, else ``""``.
    """

    index_dir: str
    n_items: int
    vocab_size: int
    has_ann: bool
    seconds: float
    asset_ref: str = ""


def build_index(
    curated_dir: Path,
    index_dir: Path,
    config: IndexConfig | None = None,
    assets: AssetStore | None = None,
    show_progress: bool = False,
    encoder: TextEncoder | None = None,
) -> IndexSummary:
    """Build the search index of the curated catalog and save it.

    Args:
        curated_dir: folder holding ``catalog.parquet``.
        index_dir: folder that receives the index.
        config: index settings; defaults when ``None``.
        assets: when given, the index is also stored as asset ``search-index``
            (zone ``models``) with the catalog row count as lineage quality.
        show_progress: show a bar while encoding titles.
        encoder: the text encoder; the bundled MiniLM is loaded when ``None``.

    Returns:
        The summary.

    Raises:
        FileNotFoundError: ``catalog.parquet`` is missing.
        ValueError: the catalog cannot be indexed (see ``prepare_catalog``).
    """
    path = curated_dir / CATALOG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the curated folder needs it")
    catalog = pd.read_parquet(path)
    logger.info("search_index start catalog=%d", len(catalog))
    started = time.perf_counter()

    encoder = encoder or TextEncoder()
    index = build_search_index(catalog, encoder, config, show_progress)
    save_search_index(index, index_dir)
    summary = IndexSummary(
        index_dir=str(index_dir),
        n_items=index.n_items,
        vocab_size=len(index.corrector.frequencies),
        has_ann=index.ann is not None,
        seconds=time.perf_counter() - started,
    )
    if assets is not None:
        version = assets.put_dir(
            ASSET_NAME,
            "models",
            index_dir,
            owner="search",
            producer="search_index",
            inputs=[],
            quality={"n_items": summary.n_items, "encoder": ENCODER_NAME},
        )
        summary = IndexSummary(**{**summary.__dict__, "asset_ref": version.ref})
    logger.info(
        "search_index done items=%d ann=%s seconds=%.1f asset=%s",
        summary.n_items,
        summary.has_ann,
        summary.seconds,
        summary.asset_ref or "-",
    )
    return summary


@stage_component
def search_index(
    curated: dsl.Input[dsl.Dataset],
    index: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    ann_threshold: int = 50_000,
    store_asset: bool = True,
) -> None:
    """Build the product search index and store it as a model asset.

    Args:
        curated: folder with ``catalog.parquet``.
        index: receives the index folder (BM25, vectors, HNSW graph, manifest).
        metrics: item count, vocabulary size, whether ANN is used, build seconds.
        ann_threshold: catalogs larger than this get an HNSW graph.
        store_asset: also store the folder as asset ``search-index`` (zone models).
    """
    import os
    from pathlib import Path

    from components.search_index import build_index
    from shopml.assets import asset_store_from_settings
    from shopml.config import load_settings
    from shopml.logs import configure_logging
    from shopml.search.index import IndexConfig

    configure_logging()
    os.makedirs(index.path, exist_ok=True)
    settings = load_settings()
    assets = asset_store_from_settings(settings) if store_asset else None
    summary = build_index(
        Path(curated.path),
        Path(index.path),
        IndexConfig(ann_threshold=ann_threshold),
        assets,
        show_progress=settings.progress,
    )
    metrics.log_metric("n_items", float(summary.n_items))
    metrics.log_metric("vocab_size", float(summary.vocab_size))
    metrics.log_metric("has_ann", float(summary.has_ann))
    metrics.log_metric("seconds", summary.seconds)
