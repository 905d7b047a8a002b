"""The product search index: BM25 over catalog text plus MiniLM vectors, in one folder.

Built from the curated catalog by the ``search_index`` stage and stored as a versioned
asset in the ``models`` zone. Layout of the folder:

| file | content |
|---|---|
| ``index.json`` | :class:`IndexConfig`, item count, encoder name and dimension |
| ``items.parquet`` | ``row`` (0..N-1), ``item_id``, ``title``, ``category``, ``price`` |
| ``bm25/`` | the bm25s sparse index (``vocab.index.json``, CSC arrays, params) |
| ``doc_freq.json`` | token -> number of items holding it (spelling correction) |
| ``embeddings.npy`` | float16 [N, 384] unit-length item vectors |
| ``ann.faiss`` | faiss HNSW graph over the vectors, only when N > ``ann_threshold`` |
| ``manifest.json`` | sha256 and size of every file above, written last |

Small catalogs are searched exactly (one matrix-vector product); beyond
``ann_threshold`` items an HNSW graph (faiss, inner product) answers instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shopml.search.encoder import ENCODER_NAME, TextEncoder
from shopml.search.spelling import SpellingCorrector
from shopml.search.text import item_text, normalize, tokenize

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
CONFIG_FILE = "index.json"
ITEMS_FILE = "items.parquet"
BM25_DIR = "bm25"
DOC_FREQ_FILE = "doc_freq.json"
EMBEDDINGS_FILE = "embeddings.npy"
ANN_FILE = "ann.faiss"
MANIFEST_FILE = "manifest.json"
#: Catalog columns that are never searched as text.
NON_TEXT_COLUMNS = ("item_id", "title", "category", "price")


class SearchIndexError(Exception):
    """A search index folder is incomplete, corrupt, or was built differently."""


@dataclass(frozen=True)
class KeywordMatch:
    """BM25 scores of one query over the whole catalog, and which items hold it all.

    Attributes:
        scores: float32 [N] BM25 score of every item (0 where no query token occurs).
        is_full: bool [N] whether the item holds every distinct query token known to
            the index.
        rows: int64 [M] items holding at least one query token and allowed by the
            filters, ascending.
    """

    scores: np.ndarray
    is_full: np.ndarray
    rows: np.ndarray


@dataclass(frozen=True)
class IndexConfig:
    """How a search index is built.

    Attributes:
        ann_threshold: catalogs with more items than this get an HNSW graph; smaller
            ones are searched exactly.
        hnsw_m: neighbours per node of the HNSW graph.
        hnsw_ef_construction: candidate list size while building the graph.
        hnsw_ef_search: candidate list size while searching the graph.
        title_weight: how many times title tokens count in BM25 (fields other than the
            title count once).
        bm25_k1: BM25 term-frequency saturation.
        bm25_b: BM25 length normalization.
        text_columns: extra catalog columns searched as text (brand, description);
            ``None`` takes every extra string column.
    """

    ann_threshold: int = 50_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 96
    title_weight: int = 2
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    text_columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("ann_threshold", "hnsw_m", "hnsw_ef_construction"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.hnsw_ef_search < 1 or self.title_weight < 1:
            raise ValueError(
                f"hnsw_ef_search={self.hnsw_ef_search} and "
                f"title_weight={self.title_weight} must be at least 1"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexConfig:
        """Read :func:`dataclasses.asdict` output back.

        Raises:
            ValueError: an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown IndexConfig keys {unknown}; known: {known}")
        values = dict(data)
        if values.get("text_columns") is not None:
            values["text_columns"] = tuple(values["text_columns"])
        return cls(**values)


@dataclass
class SearchIndex:
    """A loaded search index.

    Attributes:
        config: how it was built.
        items: ``item_id``, ``title``, ``category``, ``price`` by row (0..N-1).
        bm25: the bm25s index over the item texts.
        embeddings: float32 [N, D] unit-length item vectors.
        ann: the faiss HNSW index, or ``None`` for exact search.
        corrector: spelling correction over the index vocabulary.

    Derived on load: ``item_ids``, ``titles``, ``categories`` (normalized),
    ``raw_categories``, ``prices``, ``exact_titles`` (normalized title -> rows),
    ``row_of`` (item id -> row) and ``category_rows`` (category tokens -> rows).
    """

    config: IndexConfig
    items: pd.DataFrame
    bm25: Any
    embeddings: np.ndarray
    ann: Any | None
    corrector: SpellingCorrector

    def __post_init__(self) -> None:
        self.item_ids: list[str] = self.items["item_id"].astype(str).tolist()
        self.titles: list[str] = self.items["title"].astype(str).tolist()
        self.categories = np.array(
            [
                normalize(c) if isinstance(c, str) else ""
                for c in self.items["category"]
            ],
            dtype=object,
        )
        self.prices = self.items["price"].astype("float64").to_numpy()
        self.raw_categories: list[str | None] = [
            c if isinstance(c, str) else None for c in self.items["category"]
        ]
        self.exact_titles: dict[str, list[int]] = {}
        for row, title in enumerate(self.titles):
            self.exact_titles.setdefault(normalize(title), []).append(row)
        self.row_of: dict[str, int] = {
            item_id: row for row, item_id in enumerate(self.item_ids)
        }
        self.category_rows = _category_rows(self.raw_categories)
        # The bm25s index is a CSC matrix (token -> items holding it, with each
        # item's precomputed BM25 term score); queries read its columns directly.
        csc = self.bm25.scores
        self._term_scores = np.asarray(csc["data"], dtype=np.float32)
        self._term_rows = np.asarray(csc["indices"], dtype=np.int64)
        self._term_starts = np.asarray(csc["indptr"], dtype=np.int64)
        self._vocab: dict[str, int] = dict(self.bm25.vocab_dict)

    @property
    def n_items(self) -> int:
        """Number of items in the index."""
        return len(self.item_ids)

    def match(self, tokens: Sequence[str], mask: np.ndarray | None) -> KeywordMatch:
        """BM25-score every item for the query tokens, reading only their postings.

        The sum over query tokens of each item's precomputed term score, exactly what
        ``bm25s.BM25.get_scores`` returns (a repeated query token counts again), but
        touching only the items that hold a query token: no pass over the catalog per
        token and no ``np.add.at``.

        Args:
            tokens: the (corrected) query tokens.
            mask: bool [N] rows the filters allow; ``None`` allows all.

        Returns:
            The scores, the full-match flags and the matching rows.
        """
        counts = Counter(self._vocab[t] for t in tokens if t in self._vocab)
        scores = np.zeros(self.n_items, dtype=np.float32)  # [N]
        held = np.zeros(self.n_items, dtype=np.uint16)  # [N] distinct tokens held
        for token_id, count in counts.items():
            start, end = self._term_starts[token_id], self._term_starts[token_id + 1]
            rows = self._term_rows[start:end]  # unique within one column
            scores[rows] += count * self._term_scores[start:end]
            held[rows] += 1
        rows = np.flatnonzero(held)
        if mask is not None:
            rows = rows[mask[rows]]
        is_full = held == len(counts) if counts else np.zeros(self.n_items, dtype=bool)
        return KeywordMatch(scores, is_full, rows)


def _category_rows(
    categories: Sequence[str | None],
) -> dict[tuple[str, ...], np.ndarray]:
    """Query tokens that name a category -> int64 rows of its items, ascending.

    The key is the category's :func:`~shopml.search.text.tokenize` output, the form
    a query takes after normalization and spelling correction, so "Fresh Fruit",
    "fresh fruits" and "fresh frutis" all name the category ``fresh fruits``.
    """
    grouped: dict[tuple[str, ...], list[int]] = {}
    for row, category in enumerate(categories):
        key = tuple(tokenize(category)) if category else ()
        if key:
            grouped.setdefault(key, []).append(row)
    return {key: np.asarray(rows, dtype=np.int64) for key, rows in grouped.items()}


def _text_columns(catalog: pd.DataFrame, config: IndexConfig) -> list[str]:
    if config.text_columns is not None:
        missing = sorted(set(config.text_columns) - set(catalog.columns))
        if missing:
            raise ValueError(
                f"text_columns {missing} are not catalog columns; "
                f"the catalog has {list(catalog.columns)}"
            )
        return list(config.text_columns)
    return [
        column
        for column in catalog.columns
        if column not in NON_TEXT_COLUMNS
        and (
            catalog[column].dtype == object
            or pd.api.types.is_string_dtype(catalog[column])
        )
    ]


def prepare_catalog(catalog: pd.DataFrame) -> pd.DataFrame:
    """Check a canonical catalog and reduce it to the indexed columns.

    Args:
        catalog: canonical catalog (``item_id``, ``title``, optional ``category``,
            ``price`` and extra string columns).

    Returns:
        The catalog with one row per ``item_id`` (the first kept), ``category`` and
        ``price`` added as nulls when absent.

    Raises:
        ValueError: ``item_id`` or ``title`` is missing, or the catalog is empty.
    """
    missing = sorted({"item_id", "title"} - set(catalog.columns))
    if missing:
        raise ValueError(f"catalog is missing columns {missing}; needs item_id, title")
    if catalog.empty:
        raise ValueError("catalog has no rows; a search index needs at least one item")
    frame = catalog.drop_duplicates("item_id").reset_index(drop=True).copy()
    frame["item_id"] = frame["item_id"].astype(str)
    frame["title"] = frame["title"].fillna("").astype(str)
    if "category" not in frame.columns:
        frame["category"] = None
    if "price" not in frame.columns:
        frame["price"] = np.nan
    frame["price"] = pd.to_numeric(frame["price"], errors="coerce").astype("float64")
    return frame


def _documents(
    frame: pd.DataFrame, columns: list[str], title_weight: int
) -> tuple[list[str], list[list[str]]]:
    """Per item: the text the encoder reads, and the BM25 tokens (title repeated)."""
    texts: list[str] = []
    documents: list[list[str]] = []
    # One list of extra attribute values per item (empty when there are none).
    extras: list[list[str]] = [[] for _ in range(len(frame))]
    for column in columns:
        for row, value in enumerate(frame[column].tolist()):
            if isinstance(value, str) and value:
                extras[row].append(value)
    for title, category, attributes in zip(
        frame["title"], frame["category"], extras, strict=True
    ):
        category_text = category if isinstance(category, str) else None
        texts.append(item_text(title, category_text, attributes))
        rest = item_text("", category_text, attributes)
        documents.append(tokenize(title) * title_weight + tokenize(rest))
    return texts, documents


def build_search_index(
    catalog: pd.DataFrame,
    encoder: TextEncoder,
    config: IndexConfig | None = None,
    show_progress: bool = False,
) -> SearchIndex:
    """Build the BM25 index, item vectors and, for large catalogs, the HNSW graph.

    Args:
        catalog: canonical catalog (see :func:`prepare_catalog`).
        encoder: the text encoder that will also encode queries.
        config: build settings; defaults when ``None``.
        show_progress: show tqdm bars while encoding.

    Returns:
        The index, ready to search.

    Raises:
        ValueError: the catalog lacks columns or rows, or ``text_columns`` are unknown.
    """
    import bm25s  # type: ignore[import-untyped]

    config = config or IndexConfig()
    frame = prepare_catalog(catalog)
    started = time.perf_counter()
    texts, documents = _documents(
        frame, _text_columns(frame, config), config.title_weight
    )

    bm25 = bm25s.BM25(k1=config.bm25_k1, b=config.bm25_b)
    bm25.index(documents, show_progress=False)
    embeddings = encoder.encode(texts, show_progress=show_progress)
    ann = _build_ann(embeddings, config)

    index = SearchIndex(
        config=config,
        items=frame[["item_id", "title", "category", "price"]],
        bm25=bm25,
        embeddings=embeddings,
        ann=ann,
        corrector=SpellingCorrector.from_documents(documents),
    )
    logger.info(
        "search index built items=%d vocab=%d ann=%s seconds=%.1f",
        index.n_items,
        len(index.corrector.frequencies),
        ann is not None,
        time.perf_counter() - started,
    )
    return index


def _build_ann(embeddings: np.ndarray, config: IndexConfig) -> Any | None:
    """An HNSW graph (inner product) when the catalog passes ``ann_threshold``."""
    if len(embeddings) <= config.ann_threshold:
        return None
    import faiss

    ann = faiss.IndexHNSWFlat(
        embeddings.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT
    )
    ann.hnsw.efConstruction = config.hnsw_ef_construction
    ann.hnsw.efSearch = config.hnsw_ef_search
    ann.add(embeddings)
    return ann


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _index_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def save_search_index(index: SearchIndex, path: Path) -> None:
    """Write the index folder; the manifest goes last.

    Args:
        index: the index.
        path: the folder (created); an existing index there is replaced.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST_FILE).unlink(missing_ok=True)

    meta = {
        "format": INDEX_FORMAT,
        "n_items": index.n_items,
        "encoder": ENCODER_NAME,
        "dim": int(index.embeddings.shape[1]),
        "has_ann": index.ann is not None,
        "config": asdict(index.config),
    }
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    items = index.items.reset_index(drop=True)
    items.insert(0, "row", np.arange(len(items), dtype=np.int64))
    items.to_parquet(path / ITEMS_FILE, index=False)
    index.bm25.save(str(path / BM25_DIR), show_progress=False)
    (path / DOC_FREQ_FILE).write_text(
        json.dumps(index.corrector.frequencies, sort_keys=True)
    )
    np.save(path / EMBEDDINGS_FILE, index.embeddings.astype(np.float16))
    if index.ann is not None:
        import faiss

        faiss.write_index(index.ann, str(path / ANN_FILE))

    files = {
        p.relative_to(path).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
        for p in _index_files(path)
    }
    (path / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=2))
    logger.info("search index written path=%s files=%d", path, len(files))


def _verify_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise SearchIndexError(f"{manifest_path} is missing: the index is incomplete")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SearchIndexError(
            f"{manifest_path} is not a valid manifest: {err}"
        ) from err
    for name, entry in files.items():
        file_path = path / name
        if not file_path.is_file() or _sha256(file_path) != entry.get("sha256"):
            raise SearchIndexError(
                f"{file_path} is missing or does not match {MANIFEST_FILE}: "
                "the index is corrupt; rebuild it with the search_index stage"
            )
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise SearchIndexError(
            f"{path} has index format {meta.get('format')!r}; this code reads "
            f"format {INDEX_FORMAT}; rebuild the index"
        )
    return dict(meta)


def load_search_index(path: Path) -> SearchIndex:
    """Load and verify an index folder written by :func:`save_search_index`.

    Args:
        path: the folder.

    Returns:
        The index.

    Raises:
        SearchIndexError: a file is missing or corrupt, or the format is unknown.
    """
    import bm25s

    path = Path(path)
    meta = _verify_manifest(path)
    try:
        config = IndexConfig.from_dict(meta["config"])
        items = pd.read_parquet(path / ITEMS_FILE).sort_values("row")
        bm25 = bm25s.BM25.load(str(path / BM25_DIR), show_progress=False, verbosity=0)
        frequencies = json.loads((path / DOC_FREQ_FILE).read_text())
        embeddings = np.load(path / EMBEDDINGS_FILE).astype(np.float32)
        ann: Any | None = None
        if meta.get("has_ann"):
            import faiss

            graph: Any = faiss.read_index(str(path / ANN_FILE))
            graph.hnsw.efSearch = config.hnsw_ef_search
            ann = graph
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise SearchIndexError(
            f"search index at {path} cannot be loaded: {err}"
        ) from err

    index = SearchIndex(
        config=config,
        items=items.drop(columns="row").reset_index(drop=True),
        bm25=bm25,
        embeddings=embeddings,
        ann=ann,
        corrector=SpellingCorrector(frequencies),
    )
    logger.info(
        "search index loaded path=%s items=%d ann=%s",
        path,
        index.n_items,
        ann is not None,
    )
    return index
