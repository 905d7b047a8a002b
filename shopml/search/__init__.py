"""Product search: hybrid BM25 + MiniLM retrieval, personalized by the recommender.

* :mod:`shopml.search.text`: normalization, tokens, PII masking, truncation;
* :mod:`shopml.search.spelling`: correction of query tokens to the catalog vocabulary;
* :mod:`shopml.search.encoder`: the all-MiniLM-L6-v2 encoder (offline, bundled);
* :mod:`shopml.search.index`: building, saving and loading the index folder;
* :mod:`shopml.search.personal`: SASRec scores for personalization;
* :mod:`shopml.search.engine`: the query path (retrieve, fuse, filter, personalize);
* :mod:`shopml.search.evaluation`: labelled query sets and nDCG/recall.
"""

from shopml.search.encoder import TextEncoder
from shopml.search.engine import (
    SearchEngine,
    SearchFilters,
    SearchHit,
    SearchOptions,
    SearchResponse,
)
from shopml.search.index import (
    IndexConfig,
    SearchIndex,
    SearchIndexError,
    build_search_index,
    load_search_index,
    save_search_index,
)
from shopml.search.personal import SASRecPersonalizer

__all__ = [
    "IndexConfig",
    "SASRecPersonalizer",
    "SearchEngine",
    "SearchFilters",
    "SearchHit",
    "SearchIndex",
    "SearchIndexError",
    "SearchOptions",
    "SearchResponse",
    "TextEncoder",
    "build_search_index",
    "load_search_index",
    "save_search_index",
]
