"""Labelled query sets for product search and the metrics they are scored with.

A query set is a table (written as an asset by the ``search_eval`` stage) with columns
``query_id``, ``query``, ``kind``, ``relevant`` (item ids) and ``history`` (the user's
item ids before the query, for personalization; empty otherwise). It comes from:

* logs, where ``search`` events exist: a query followed, in the same session, by a
  click, cart or purchase of an item makes that item relevant (:func:`queries_from_logs`);
* the catalog otherwise (:func:`queries_from_catalog`): ``title_keywords`` (three
  consecutive words that identify one title; relevant: that item), ``misspelling``
  (the same with one typing error in its longest word) and ``category_phrase`` (a
  category name; relevant: its items);
* purchase baskets, for personalization (:func:`queries_from_baskets`): the category of
  an item in a user's last basket is the query, the basket's items of that category are
  relevant, and everything bought before is the history.

Metrics: nDCG@10 with binary gains, and recall@50 capped as in BEIR
(``hits / min(|relevant|, 50)``) so large categories do not cap it near zero.

Fusion settings are chosen on a validation part (:func:`split_queries`,
:func:`tune_fusion`) and reported on the held-out test part.

Methods (:data:`METHODS`): ``keyword`` and ``dense`` are the bare retrievers;
``hybrid`` is the product's unpersonalized ranking, fusion plus its category prior (a
query naming a category gets that category's best sellers first, by the
recommender's training popularity; see :mod:`shopml.search.engine`);
``personalized_hybrid`` adds the user's history. ``fusion_only`` is hybrid without the
category prior (the two retrievers fused, nothing else), so the table shows how much of
hybrid's lead comes from the prior: on the Instacart test queries fusion alone ties
keyword on title queries and trails it slightly on aisle-name queries.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence

import pandas as pd

from shopml.search.engine import SearchEngine, SearchOptions
from shopml.search.text import normalize, tokenize

logger = logging.getLogger(__name__)

QUERY_COLUMNS = ("query_id", "query", "kind", "relevant", "history")
#: Methods compared, in table order: options of the engine for each.
METHODS: dict[str, SearchOptions] = {
    "keyword": SearchOptions(mode="keyword", k=50, personalize=False),
    "dense": SearchOptions(mode="dense", k=50, personalize=False),
    "hybrid": SearchOptions(mode="hybrid", k=50, personalize=False),
    "fusion_only": SearchOptions(
        mode="hybrid", k=50, personalize=False, category_prior=False
    ),
    "personalized_hybrid": SearchOptions(mode="hybrid", k=50, personalize=True),
}
ENGAGEMENT_EVENTS = ("click", "cart", "purchase")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int = 10) -> float:
    """Binary-gain nDCG@k of one ranked list."""
    if not relevant:
        return 0.0
    dcg = sum(
        1.0 / math.log2(rank + 2)
        for rank, item in enumerate(ranked[:k])
        if item in relevant
    )
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(relevant), k)))
    return dcg / ideal


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int = 50) -> float:
    """Capped recall@k: relevant items in the top k over ``min(|relevant|, k)``."""
    if not relevant:
        return 0.0
    found = len(set(ranked[:k]) & relevant)
    return found / min(len(relevant), k)


def misspell(word: str, rng: random.Random) -> str:
    """One typing error inside ``word`` (swap, drop, double or replace a letter)."""
    if len(word) < 3:
        return word
    position = rng.randrange(1, len(word) - 1)
    edit = rng.choice(("swap", "drop", "double", "replace"))
    if edit == "swap":
        return (
            word[:position] + word[position + 1] + word[position] + word[position + 2 :]
        )
    if edit == "drop":
        return word[:position] + word[position + 1 :]
    if edit == "double":
        return word[:position] + word[position] + word[position:]
    choices = [c for c in _LETTERS if c != word[position]]
    return word[:position] + rng.choice(choices) + word[position + 1 :]


def _content_words(title: str) -> list[str]:
    words = [w for w in normalize(title).replace(",", " ").split() if w.isalpha()]
    return [w for w in words if len(w) >= 3]


def _distinctive_windows(
    words: list[str], postings: dict[str, set[int]]
) -> list[list[str]]:
    """Three-word windows of a title that no other catalog title holds all of."""
    windows = []
    for start in range(len(words) - 2):
        window = words[start : start + 3]
        tokens = set(tokenize(" ".join(window)))
        if not tokens:
            continue
        holders = set.intersection(*(postings.get(t, set()) for t in tokens))
        if len(holders) == 1:
            windows.append(window)
    return windows


def _title_queries(
    items: pd.DataFrame, n_items: int, rng: random.Random
) -> list[dict[str, object]]:
    """``title_keywords`` and ``misspelling`` queries of ``n_items`` drawn items."""
    titles = [str(title) for title in items["title"]]
    postings: dict[str, set[int]] = {}
    for position, title in enumerate(titles):
        for token in set(tokenize(title)):
            postings.setdefault(token, set()).add(position)

    order = list(range(len(titles)))
    rng.shuffle(order)
    rows: list[dict[str, object]] = []
    for position in order:
        if len(rows) >= 2 * n_items:
            break
        words = _content_words(titles[position])
        windows = _distinctive_windows(words, postings) if len(words) >= 3 else []
        if not windows:
            continue
        chosen = rng.choice(windows)
        longest = max(range(3), key=lambda i: len(chosen[i]))
        typo = [misspell(w, rng) if i == longest else w for i, w in enumerate(chosen)]
        item_id = str(items["item_id"].iat[position])
        for kind, query in (("title_keywords", chosen), ("misspelling", typo)):
            rows.append(_row(kind, " ".join(query), [item_id], []))
    return rows


def queries_from_catalog(
    catalog: pd.DataFrame, n_items: int = 300, n_categories: int = 50, seed: int = 7
) -> pd.DataFrame:
    """Derive a labelled query set from catalog titles and categories.

    Title queries are known-item queries (Azzopardi, de Rijke and Balog, SIGIR 2007):
    three consecutive words of a title that *identify* it, i.e. no other title holds
    all three. A window shared by many titles ("organic whole milk") has many equally
    right answers but one label, so the method whose tie-break happens to match the
    draw (BM25's preference for short titles) would win; items without an
    identifying window are not drawn.

    Args:
        catalog: ``item_id``, ``title`` and optional ``category``.
        n_items: items drawn for ``title_keywords`` and ``misspelling`` queries each.
        n_categories: categories drawn for ``category_phrase`` queries.
        seed: seed of every draw.

    Returns:
        The query set (see the module docstring).
    """
    rng = random.Random(seed)
    items = catalog.drop_duplicates("item_id")
    rows = _title_queries(items, n_items, rng)
    if "category" in items.columns:
        by_category = items.dropna(subset=["category"]).groupby("category")["item_id"]
        groups = sorted((str(c), list(map(str, ids))) for c, ids in by_category)
        for category, ids in rng.sample(groups, min(n_categories, len(groups))):
            rows.append(_row("category_phrase", category, ids, []))
    return _numbered(rows)


def queries_from_baskets(
    events: pd.DataFrame,
    catalog: pd.DataFrame,
    max_users: int = 300,
    max_history: int = 50,
    seed: int = 7,
    per_user: int = 1,
) -> pd.DataFrame:
    """User queries from each user's last basket (``session_id``), for personalization.

    Args:
        events: canonical events with ``session_id`` (one basket per session).
        catalog: ``item_id`` and ``category``.
        max_users: users drawn.
        max_history: most recent items kept as the history.
        seed: seed of the draws.
        per_user: categories of the last basket drawn per user (one query each).

    Returns:
        ``user_category`` queries: the category of one last-basket item; relevant are
        the last-basket items of that category; history is everything before.
    """
    rng = random.Random(seed)
    category = catalog.drop_duplicates("item_id").set_index("item_id")["category"]
    frame = events.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    rows: list[dict[str, object]] = []
    users = sorted(frame["user_id"].unique())
    by_user = dict(tuple(frame.groupby("user_id", sort=False)))
    for user_id in rng.sample(users, min(max_users, len(users))):
        user = by_user[user_id]
        last_session = user["session_id"].iloc[-1]
        basket = user[user["session_id"] == last_session]
        before = user[user["session_id"] != last_session]["item_id"].tolist()
        categories = basket["item_id"].map(category).dropna()
        if categories.empty or not before:
            continue
        options = sorted(set(categories))
        for chosen in rng.sample(options, min(per_user, len(options))):
            relevant = sorted(
                set(basket["item_id"][categories.index[categories == chosen]])
            )
            rows.append(_row("user_category", chosen, relevant, before[-max_history:]))
    return _numbered(rows)


def queries_from_logs(events: pd.DataFrame) -> pd.DataFrame:
    """Queries from ``search`` events: later engagement in the session is relevant.

    Args:
        events: canonical events with ``query`` and ``session_id``.

    Returns:
        ``logged`` queries; empty when the events hold no searches.
    """
    if "query" not in events.columns or "session_id" not in events.columns:
        return _numbered([])
    frame = events.sort_values(["timestamp", "item_id"], kind="stable")
    rows: list[dict[str, object]] = []
    for _, session in frame.dropna(subset=["session_id"]).groupby("session_id"):
        types = session["event_type"].tolist()
        for position, event_type in enumerate(types):
            query = session["query"].iloc[position]
            if event_type != "search" or not isinstance(query, str) or not query:
                continue
            later = session.iloc[position + 1 :]
            later = later[later["event_type"].isin(ENGAGEMENT_EVENTS)]
            relevant = sorted(set(later["item_id"].astype(str)))
            if relevant:
                rows.append(_row("logged", query, relevant, []))
    return _numbered(rows)


def _row(
    kind: str, query: str, relevant: list[str], history: list[str]
) -> dict[str, object]:
    return {"query": query, "kind": kind, "relevant": relevant, "history": history}


def _numbered(rows: list[dict[str, object]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(QUERY_COLUMNS[1:]))
    frame.insert(0, "query_id", [f"q{i:05d}" for i in range(len(frame))])
    return frame


def split_queries(
    queries: pd.DataFrame, validation_share: float = 0.5, salt: str = "shopml"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a query set into a validation part (for tuning) and a held-out test part.

    The split is by a stable hash, not by position: a title query and its misspelling
    (same relevant item) fall on the same side, and so do all queries of one user
    (same history), so the test part shares no item or user with what was tuned on.

    Args:
        queries: a query set.
        validation_share: the share of groups that go to validation, in (0, 1).
        salt: changes which groups go where.

    Returns:
        ``(validation, test)``, each keeping the original ``query_id``.

    Raises:
        ValueError: ``validation_share`` is not strictly between 0 and 1.
    """
    if not 0.0 < validation_share < 1.0:
        raise ValueError(f"validation_share={validation_share} must be in (0, 1)")
    keys = [
        "h:" + "|".join(map(str, history))
        if len(history)
        else "r:" + "|".join(sorted(map(str, relevant)))
        for relevant, history in zip(
            queries["relevant"], queries["history"], strict=True
        )
    ]
    draws = [
        int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")
        / 2**64
        for key in keys
    ]
    is_validation = pd.Series(draws, index=queries.index) < validation_share
    return (
        queries[is_validation].reset_index(drop=True),
        queries[~is_validation].reset_index(drop=True),
    )


def evaluate_queries(
    engine: SearchEngine,
    queries: pd.DataFrame,
    methods: dict[str, SearchOptions] | None = None,
) -> pd.DataFrame:
    """Score every method on every query; means per query kind and overall.

    Args:
        engine: the search engine (with a personalizer for the personalized method).
        queries: a query set (see the module docstring).
        methods: method name -> options; :data:`METHODS` when ``None``.

    Returns:
        Columns ``method``, ``kind`` (``all`` for the overall mean), ``queries``,
        ``ndcg_10``, ``recall_50``.
    """
    methods = methods or METHODS
    records = []
    for method, options in methods.items():
        for query, kind, relevant, history in zip(
            queries["query"],
            queries["kind"],
            queries["relevant"],
            queries["history"],
            strict=True,
        ):
            response = engine.search(query, options=options, history=list(history))
            ranked = [hit.item_id for hit in response.hits]
            gold = set(map(str, relevant))
            records.append(
                (method, kind, ndcg_at_k(ranked, gold), recall_at_k(ranked, gold))
            )
    frame = pd.DataFrame(records, columns=["method", "kind", "ndcg_10", "recall_50"])
    return _summarize(frame, list(methods))


def fusion_grid() -> list[SearchOptions]:
    """Hybrid settings :func:`tune_fusion` tries: convex weights, RRF constants, depths."""
    grid = [
        SearchOptions(k=50, personalize=False, fusion="convex", dense_weight=weight,
                      candidates=depth)
        for weight in (0.25, 0.5, 1.0, 2.0)
        for depth in (50, 100)
    ]  # fmt: skip
    grid += [
        SearchOptions(k=50, personalize=False, fusion="rrf", rrf_k=rrf_k,
                      dense_weight=weight, candidates=100)
        for rrf_k in (10, 60)
        for weight in (0.5, 1.0)
    ]  # fmt: skip
    return grid


def tune_fusion(
    engine: SearchEngine,
    validation: pd.DataFrame,
    grid: Sequence[SearchOptions] | None = None,
) -> tuple[SearchOptions, pd.DataFrame]:
    """Choose the hybrid fusion settings on validation queries (never on test ones).

    Args:
        engine: the search engine.
        validation: the validation part of a query set (:func:`split_queries`).
        grid: hybrid settings to try; :func:`fusion_grid` when ``None``.

    Returns:
        The settings with the best nDCG@10 + recall@50 over all validation queries,
        and a table of every setting (``fusion``, ``rrf_k``, ``dense_weight``,
        ``candidates``, ``ndcg_10``, ``recall_50``).

    Raises:
        ValueError: the grid is empty.
    """
    grid = list(grid) if grid is not None else fusion_grid()
    if not grid:
        raise ValueError("grid is empty; pass at least one SearchOptions")
    records = []
    for options in grid:
        table = evaluate_queries(engine, validation, {"hybrid": options})
        overall = table[table["kind"] == "all"].iloc[0]
        records.append(
            (options.fusion, options.rrf_k, options.dense_weight, options.candidates,
             float(overall["ndcg_10"]), float(overall["recall_50"]))
        )  # fmt: skip
    columns = ["fusion", "rrf_k", "dense_weight", "candidates", "ndcg_10", "recall_50"]
    results = pd.DataFrame(records, columns=columns)
    best = int((results["ndcg_10"] + results["recall_50"]).to_numpy().argmax())
    logger.info("fusion tuned on %d queries: %s", len(validation), grid[best])
    return grid[best], results


def _summarize(frame: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    overall = frame.assign(kind="all")
    both = pd.concat([frame, overall], ignore_index=True)
    table = (
        both.groupby(["method", "kind"], sort=False)
        .agg(
            queries=("ndcg_10", "size"),
            ndcg_10=("ndcg_10", "mean"),
            recall_50=("recall_50", "mean"),
        )
        .reset_index()
    )
    table["method"] = pd.Categorical(table["method"], categories=methods, ordered=True)
    return table.sort_values(["kind", "method"], ignore_index=True).assign(
        method=lambda t: t["method"].astype(str)
    )


def format_table(table: pd.DataFrame) -> str:
    """A Markdown table: one row per kind and method, nDCG@10 and recall@50."""
    lines = [
        "| kind | method | queries | nDCG@10 | recall@50 |",
        "|---|---|---|---|---|",
    ]
    for row in table.itertuples(index=False):
        lines.append(
            f"| {row.kind} | {row.method} | {row.queries} | "
            f"{row.ndcg_10:.4f} | {row.recall_50:.4f} |"
        )
    return "\n".join(lines)
