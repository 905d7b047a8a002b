"""Product search: text handling, spelling, index files, the query path, metrics.

The index is built once per module over a small hand-written catalog with the real
MiniLM encoder (bundled, offline); personalization uses a real, tiny SASRec whose item
embeddings are set so that its preferences are known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shopml.artifact import ModelArtifact
from shopml.models.sasrec import SASRec, SASRecConfig, left_pad
from shopml.search import (
    IndexConfig,
    SASRecPersonalizer,
    SearchEngine,
    SearchFilters,
    SearchIndexError,
    SearchOptions,
    TextEncoder,
    build_search_index,
    load_search_index,
    save_search_index,
)
from shopml.search.evaluation import (
    misspell,
    ndcg_at_k,
    queries_from_baskets,
    queries_from_catalog,
    queries_from_logs,
    recall_at_k,
    split_queries,
    tune_fusion,
)
from shopml.search.fusion import category_first, convex, full_match_first
from shopml.search.spelling import SpellingCorrector, edit_distance
from shopml.search.text import mask_pii, normalize, prepare_query, tokenize

CATALOG = [
    ("i01", "Organic Bananas", "fresh fruits", 0.9),
    ("i02", "Banana Bread Mix", "baking", 3.5),
    ("i03", "Greek Yogurt Plain 500ml", "yogurt", 3.2),
    ("i04", "Strawberry Greek Yogurt", "yogurt", 1.1),
    ("i05", "Vanilla Greek Yogurt Family Pack", "yogurt", 5.9),
    ("i06", "Honey Greek Yogurt", "yogurt", 1.3),
    ("i07", "Low Fat Blueberry Yogurt", "yogurt", 1.0),
    ("i08", "Almond Milk Unsweetened Vanilla", "milk", 2.6),
    ("i09", "Whole Milk Gallon", "milk", 4.1),
    ("i10", "Oat Milk Barista Edition", "milk", 3.9),
    ("i11", "USB-C Charging Cable 2m", "electronics", 9.9),
    ("i12", "Lightning Cable for iPhone", "electronics", 12.0),
    ("i13", "Wireless Phone Charger", "electronics", 19.0),
    ("i14", "Sparkling Mineral Water 1.5 l", "water", 0.8),
    ("i15", "Spring Water 24 Pack", "water", 4.5),
    ("i16", "Extra Virgin Olive Oil 500 ml", "oils", 7.5),
    ("i17", "Whole Wheat Spaghetti", "pasta", 1.9),
    ("i18", "Penne Rigate Pasta", "pasta", 1.7),
    ("i19", "Dark Chocolate 70% Cocoa", "candy", 2.4),
    ("i20", "Milk Chocolate Bar with Almonds", "candy", 1.6),
    ("i21", "Frozen Strawberries", "frozen fruits", 3.3),
    ("i22", "Fresh Strawberries 1 lb", "fresh fruits", 4.0),
    ("i23", "Chocolate Greek Yogurt", "yogurt", None),
    ("i24", "Coconut Water Original", "water", 2.2),
]


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    frame = pd.DataFrame(CATALOG, columns=["item_id", "title", "category", "price"])
    frame["brand"] = ["Acme" if i % 3 == 0 else None for i in range(len(frame))]
    return frame


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.set_num_threads(1)
    return TextEncoder()


@pytest.fixture(scope="module")
def engine(catalog: pd.DataFrame, encoder: TextEncoder) -> SearchEngine:
    return SearchEngine(build_search_index(catalog, encoder), encoder)


def _titles(engine: SearchEngine, query: str, **kwargs: object) -> list[str]:
    return [hit.title for hit in engine.search(query, **kwargs).hits]  # type: ignore[arg-type]


# --- text -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500 ml", ["500ml"]),
        ("500ML", ["500ml"]),
        ("16 Ounces", ["16oz"]),
        ("2.5kg", ["2.5kg"]),
        ("USB-C", ["usb", "c", "usbc"]),
        ("Ｍｉｌｋ", ["milk"]),
        ("Strawberries, Bananas & Peaches", ["strawberry", "banana", "peach"]),
        ("cable for the phone", ["cable", "phone"]),
    ],
    ids=["unit-apart", "unit-upper", "unit-word", "decimal", "hyphen", "fullwidth",
         "plurals", "stopwords"],
)  # fmt: skip
def test_tokenize_handles_units_punctuation_and_case(
    text: str, expected: list[str]
) -> None:
    assert tokenize(text) == expected


def test_normalize_folds_case_and_width() -> None:
    assert normalize("  Straße  ＭＩＬＫ ") == "strasse milk"


@pytest.mark.parametrize(
    ("query", "masked"),
    [
        ("send to jane.doe@example.com now", "send to <email> now"),
        ("card 4111 1111 1111 1111 charger", "card <number> charger"),
        ("call +44 20 7946 0958", "call <number>"),
        ("usb-c 500ml", "usb-c 500ml"),
    ],
    ids=["email", "card", "phone", "no-pii"],
)
def test_mask_pii_hides_contact_data_only(query: str, masked: str) -> None:
    assert mask_pii(query) == masked


def test_prepare_query_truncates_at_a_word_and_says_so() -> None:
    prepared = prepare_query("greek yogurt " * 30, max_chars=40)
    assert prepared.truncated
    assert prepared.original_chars == len(normalize("greek yogurt " * 30))
    assert len(prepared.text) <= 40
    assert prepared.text.endswith(("greek", "yogurt"))


# --- spelling -------------------------------------------------------------


def test_edit_distance_counts_a_transposition_once() -> None:
    assert edit_distance("yogurt", "yuogrt") == 2
    assert edit_distance("yogurt", "yogrut") == 1
    assert edit_distance("milk", "milk") == 0


def test_spelling_prefers_close_then_frequent_tokens() -> None:
    corrector = SpellingCorrector({"yogurt": 5, "strawberry": 2, "bananas": 1})
    assert corrector.correct("yoghurt") == "yogurt"
    assert corrector.correct("strawbery") == "strawberry"
    assert corrector.correct("xylophone") == "xylophone"
    assert corrector.correct("500ml") == "500ml"


# --- query path -----------------------------------------------------------


@pytest.mark.parametrize(
    "title", [row[1] for row in CATALOG], ids=[row[0] for row in CATALOG]
)
def test_exact_title_ranks_that_item_first(engine: SearchEngine, title: str) -> None:
    assert _titles(engine, title)[0] == title


@pytest.mark.parametrize(
    ("query", "title"),
    [
        ("grek yoghurt plain", "Greek Yogurt Plain 500ml"),
        ("stawberries frozen", "Frozen Strawberries"),
        ("almnd milk", "Almond Milk Unsweetened Vanilla"),
        ("spagetti", "Whole Wheat Spaghetti"),
        ("wireles chargr", "Wireless Phone Charger"),
    ],
)
def test_misspelled_query_finds_the_item_in_top_10(
    engine: SearchEngine, query: str, title: str
) -> None:
    assert title in _titles(engine, query)[:10]


def test_spelling_correction_is_reported(engine: SearchEngine) -> None:
    response = engine.search("grek yoghurt")
    assert response.corrected_query == "greek yogurt"


@pytest.mark.parametrize("mode", ["hybrid", "keyword", "dense"])
@pytest.mark.parametrize(
    ("query", "category"),
    [
        ("greek yogurt", "yogurt"),
        ("greek yogurt", "candy"),
        ("strawberries", "frozen fruits"),
        ("milk", "electronics"),
        ("water", "Water"),
    ],
)
def test_category_filter_never_leaks(
    engine: SearchEngine, query: str, category: str, mode: str
) -> None:
    response = engine.search(
        query, SearchFilters(categories=(category,)), SearchOptions(mode=mode, k=50)
    )
    assert {hit.category for hit in response.hits} <= {category.lower()}
    if mode != "keyword":  # BM25 may rightly find no word of the query there
        assert response.hits, "the category holds items, so dense finds some"


def test_price_filter_keeps_items_in_range_and_drops_unpriced(
    engine: SearchEngine,
) -> None:
    response = engine.search(
        "yogurt", SearchFilters(min_price=1.05, max_price=3.5), SearchOptions(k=50)
    )
    prices = [hit.price for hit in response.hits]
    assert prices and all(p is not None and 1.05 <= p <= 3.5 for p in prices)
    assert "i23" not in {hit.item_id for hit in response.hits}  # no price


def test_filters_reject_an_inverted_price_range() -> None:
    with pytest.raises(ValueError, match=r"min_price=5\.0 is above max_price=1\.0"):
        SearchFilters(min_price=5.0, max_price=1.0)


def test_overlong_query_is_truncated_with_a_note(engine: SearchEngine) -> None:
    response = engine.search(
        "greek yogurt " * 40, options=SearchOptions(max_query_chars=60)
    )
    assert response.truncated
    assert response.notes and "cut from" in response.notes[0]
    assert response.hits[0].title.lower().count("greek yogurt") == 1


def test_unit_spelling_variants_find_the_same_item(engine: SearchEngine) -> None:
    for query in ("olive oil 500ml", "olive oil 500 ML", "olive oil 500 milliliters"):
        assert _titles(engine, query, options=SearchOptions(mode="keyword"))[0] == (
            "Extra Virgin Olive Oil 500 ml"
        )


# --- personalization ------------------------------------------------------


def _artifact(catalog: pd.DataFrame, favourites: dict[str, float]) -> ModelArtifact:
    """A tiny SASRec whose next-item scores after ``["i09"]`` follow ``favourites``."""
    torch.manual_seed(0)
    item_ids = ["", *catalog["item_id"]]
    config = SASRecConfig(n_items=len(item_ids) - 1, max_seq_len=8, hidden_size=16,
                          n_heads=2, n_layers=1, dropout=0.0)  # fmt: skip
    model = SASRec(config).eval()
    with torch.no_grad():
        hidden = model(left_pad([[item_ids.index("i09")]], 8))[0, -1]  # [H]
        unit = hidden / hidden.norm()
        for item_id, strength in favourites.items():
            model.item_embedding.weight[item_ids.index(item_id)] = unit * strength
    return ModelArtifact(
        model, config, item_ids, ["", *catalog["title"]],
        np.arange(len(item_ids), dtype=np.float32),
    )  # fmt: skip


@pytest.fixture(scope="module")
def personal_engine(
    engine: SearchEngine, catalog: pd.DataFrame, encoder: TextEncoder
) -> SearchEngine:
    # The user loves an off-topic item (i12, a cable) most, then vanilla greek yogurt.
    artifact = _artifact(catalog, {"i12": 50.0, "i05": 20.0})
    return SearchEngine(engine.index, encoder, SASRecPersonalizer(artifact))


def test_personalization_lifts_a_relevant_favourite(
    engine: SearchEngine, personal_engine: SearchEngine
) -> None:
    plain = _titles(engine, "greek yogurt")
    response = personal_engine.search("greek yogurt", history=["i09"])
    personal = [hit.title for hit in response.hits]
    assert response.personalized
    favourite = "Vanilla Greek Yogurt Family Pack"
    assert plain.index(favourite) > 0
    assert personal.index(favourite) < plain.index(favourite)


def test_personalization_reorders_only_among_relevant_candidates(
    engine: SearchEngine, personal_engine: SearchEngine
) -> None:
    options = SearchOptions(k=20)
    plain = engine.search("greek yogurt", options=options).hits
    personal = personal_engine.search("greek yogurt", options=options, history=["i09"])
    plain_ids = [hit.item_id for hit in plain]
    personal_ids = [hit.item_id for hit in personal.hits]
    relevant = {"i03", "i04", "i05", "i06", "i23"}  # every greek yogurt

    # The same items come back; only greek yogurts changed places, among themselves.
    assert sorted(plain_ids) == sorted(personal_ids)
    for position, (before, after) in enumerate(
        zip(plain_ids, personal_ids, strict=True)
    ):
        if before != after:
            assert before in relevant and after in relevant, position
    assert "i12" not in personal_ids[: len(relevant)]
    scores = [hit.score for hit in personal.hits]
    assert scores == sorted(scores, reverse=True)


def test_buy_again_lifts_a_relevant_item_the_user_bought(
    personal_engine: SearchEngine,
) -> None:
    history = ["i04", "i09"]  # bought strawberry greek yogurt, then whole milk
    ids = {
        buy_again: [
            hit.item_id
            for hit in personal_engine.search(
                "greek yogurt",
                options=SearchOptions(buy_again=buy_again),
                history=history,
            ).hits
        ]
        for buy_again in (True, False)
    }
    assert ids[True].index("i04") < ids[False].index("i04")
    assert sorted(ids[True]) == sorted(ids[False])
    assert "i09" not in ids[True][:5]  # bought, but not a greek yogurt


def test_empty_query_falls_back_to_recommendations(
    personal_engine: SearchEngine,
) -> None:
    response = personal_engine.search("  ", history=["i09"], options=SearchOptions(k=3))
    assert response.fallback == "recommendations"
    assert [hit.item_id for hit in response.hits][:2] == ["i12", "i05"]


def test_empty_query_respects_filters(personal_engine: SearchEngine) -> None:
    response = personal_engine.search(
        "", SearchFilters(categories=("yogurt",)), history=["i09"]
    )
    assert response.hits[0].item_id == "i05"
    assert {hit.category for hit in response.hits} == {"yogurt"}


def test_empty_query_without_history_ranks_by_popularity(
    personal_engine: SearchEngine,
) -> None:
    response = personal_engine.search("", options=SearchOptions(k=2))
    # Popularity in the artifact grows with the index: the last items first.
    assert [hit.item_id for hit in response.hits] == ["i24", "i23"]


# --- index files and ANN --------------------------------------------------


def test_index_round_trips_through_its_folder(
    engine: SearchEngine, encoder: TextEncoder, tmp_path: Path
) -> None:
    save_search_index(engine.index, tmp_path / "index")
    loaded = SearchEngine(load_search_index(tmp_path / "index"), encoder)
    for query in ("greek yogurt", "usb c cable", "strawberies"):
        assert _titles(loaded, query)[:3] == _titles(engine, query)[:3]


def test_corrupt_index_file_is_refused(engine: SearchEngine, tmp_path: Path) -> None:
    save_search_index(engine.index, tmp_path / "index")
    (tmp_path / "index" / "doc_freq.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(SearchIndexError, match=r"doc_freq\.json .*corrupt"):
        load_search_index(tmp_path / "index")


def test_large_catalog_uses_hnsw_with_the_same_answers(
    catalog: pd.DataFrame, encoder: TextEncoder, engine: SearchEngine, tmp_path: Path
) -> None:
    index = build_search_index(catalog, encoder, IndexConfig(ann_threshold=10))
    assert index.ann is not None
    save_search_index(index, tmp_path / "ann")
    ann_engine = SearchEngine(load_search_index(tmp_path / "ann"), encoder)
    assert ann_engine.index.ann is not None
    dense = SearchOptions(mode="dense", k=5)
    for query in ("greek yogurt", "phone charger", "sparkling water"):
        assert (
            _titles(ann_engine, query, options=dense)[:3]
            == (_titles(engine, query, options=dense)[:3])
        )
    filtered = ann_engine.search(
        "yogurt", SearchFilters(categories=("milk",)), SearchOptions(mode="dense")
    )
    assert {hit.category for hit in filtered.hits} == {"milk"}


def test_match_scores_equal_bm25s_and_flag_full_matches(engine: SearchEngine) -> None:
    index = engine.index
    for query in ("greek yogurt", "honey greek yogurt", "milk milk chocolate", "zzz"):
        tokens = tokenize(query)
        match = index.match(tokens, None)
        expected = (
            index.bm25.get_scores(tokens)
            if any(t in index.bm25.vocab_dict for t in tokens)
            else np.zeros(index.n_items)
        )
        np.testing.assert_allclose(match.scores, expected, rtol=1e-5, atol=1e-6)
        assert match.rows.tolist() == np.flatnonzero(match.scores > 0).tolist()
    full = index.match(tokenize("honey greek yogurt"), None).is_full
    assert [index.item_ids[r] for r in np.flatnonzero(full)] == ["i06"]
    mask = np.zeros(index.n_items, dtype=bool)
    mask[:3] = True
    assert set(index.match(tokenize("greek yogurt"), mask).rows) <= {0, 1, 2}


def test_full_match_first_lifts_only_full_matches() -> None:
    fused = np.array([0.9, 0.2, 0.5, -0.3])
    lifted = full_match_first(fused, np.array([False, True, False, True]))
    assert np.argsort(-lifted).tolist() == [1, 3, 0, 2]
    assert full_match_first(fused, np.zeros(4, dtype=bool)) is fused


def test_convex_fusion_normalizes_each_side() -> None:
    bm25 = np.array([4.0, 2.0, np.nan])
    cosine = np.array([0.5, 0.9, 0.7])
    fused = convex(bm25, cosine, np.array([0.9, 0.7, 0.5]), (1.0, 1.0))
    np.testing.assert_allclose(fused, [1.0 + 0.0, 0.5 + 1.0, 0.0 + 0.5])


def test_hybrid_ranks_items_holding_every_word_first(engine: SearchEngine) -> None:
    hits = engine.search("strawberry greek yogurt").hits
    full = [
        set(tokenize("strawberry greek yogurt")) <= set(tokenize(h.title)) for h in hits
    ]
    assert full[0] and hits[0].title == "Strawberry Greek Yogurt"
    assert full == sorted(full, reverse=True)


def test_category_first_orders_members_by_popularity() -> None:
    fused = np.array([0.9, 0.2, 0.5, 0.1])
    members = np.array([False, True, True, True])
    lifted = category_first(fused, members, np.array([5.0, 1.0, 3.0, 3.0]))
    assert np.argsort(-lifted).tolist() == [2, 3, 1, 0]  # ties: fused score
    assert np.argsort(-category_first(fused, members, None)).tolist() == [2, 1, 3, 0]
    assert category_first(fused, np.zeros(4, dtype=bool), None) is fused


@pytest.mark.parametrize(
    ("query", "best_sellers"),
    [("milk", ["i10", "i09", "i08"]), ("Fresh Fruit", ["i22", "i01"])],
)
def test_query_naming_a_category_ranks_its_best_sellers_first(
    engine: SearchEngine,
    personal_engine: SearchEngine,
    query: str,
    best_sellers: list[str],
) -> None:
    # The personal engine's recommender ranks popularity by item number (i24 first).
    def ids(searcher: SearchEngine, options: SearchOptions | None = None) -> list[str]:
        return [hit.item_id for hit in searcher.search(query, options=options).hits]

    n = len(best_sellers)
    assert ids(personal_engine)[:n] == best_sellers
    # Without a recommender, or with the prior off, the category's items keep
    # their fused order; keyword-only search never applies the prior.
    assert sorted(ids(engine)[:n]) == sorted(best_sellers)
    assert ids(personal_engine, SearchOptions(category_prior=False)) == ids(engine)
    keyword = SearchOptions(mode="keyword")
    assert ids(personal_engine, keyword) == ids(engine, keyword)
    if query == "milk":
        assert ids(engine)[:n] != best_sellers  # so the prior did reorder


# --- evaluation -----------------------------------------------------------


def test_ndcg_and_recall_values() -> None:
    ranked = ["a", "x", "b", "y"]
    assert ndcg_at_k(ranked, {"a"}) == pytest.approx(1.0)
    assert ndcg_at_k(ranked, {"b"}) == pytest.approx(0.5)
    assert ndcg_at_k(ranked, {"a", "b"}) == pytest.approx(
        (1 + 0.5) / (1 + 1 / np.log2(3))
    )
    assert recall_at_k(ranked, {"a", "b", "z"}, k=2) == pytest.approx(0.5)
    assert recall_at_k(ranked, {"z"}) == 0.0


def test_misspell_makes_exactly_one_error() -> None:
    import random

    rng = random.Random(3)
    for _ in range(50):
        assert 1 <= edit_distance("strawberry", misspell("strawberry", rng)) <= 1


def test_catalog_queries_cover_three_kinds(catalog: pd.DataFrame) -> None:
    queries = queries_from_catalog(catalog, n_items=5, n_categories=3, seed=1)
    assert queries["kind"].value_counts().to_dict() == {
        "title_keywords": 5, "misspelling": 5, "category_phrase": 3,
    }  # fmt: skip
    yogurt = queries[queries["query"] == "yogurt"]
    if not yogurt.empty:
        assert set(yogurt["relevant"].iloc[0]) == {
            "i03",
            "i04",
            "i05",
            "i06",
            "i07",
            "i23",
        }
    title_rows = queries[queries["kind"] == "title_keywords"]
    titles = dict(zip(catalog["item_id"], catalog["title"].str.lower(), strict=True))
    for query, relevant in zip(
        title_rows["query"], title_rows["relevant"], strict=True
    ):
        assert query in titles[relevant[0]].replace(",", "")


def test_basket_queries_take_the_last_basket(catalog: pd.DataFrame) -> None:
    ts = pd.Timestamp("2020-01-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": ["u1"] * 5,
            "item_id": ["i09", "i01", "i03", "i06", "i11"],
            "event_type": "purchase",
            "timestamp": [ts + pd.Timedelta(hours=h) for h in range(5)],
            "session_id": ["o1", "o1", "o2", "o2", "o2"],
        }
    )
    queries = queries_from_baskets(events, catalog, seed=0)
    assert len(queries) == 1
    row = queries.iloc[0]
    assert list(row["history"]) == ["i09", "i01"]
    expected = {"yogurt": ["i03", "i06"], "electronics": ["i11"]}
    assert list(row["relevant"]) == expected[row["query"]]


def test_log_queries_use_engagement_after_a_search() -> None:
    ts = pd.Timestamp("2020-01-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": ["u1"] * 4,
            "item_id": ["", "i03", "i04", "i05"],
            "event_type": ["search", "view", "click", "purchase"],
            "timestamp": [ts + pd.Timedelta(minutes=m) for m in range(4)],
            "session_id": ["s1"] * 4,
            "query": ["greek yogurt", None, None, None],
        }
    )
    queries = queries_from_logs(events)
    assert queries["query"].tolist() == ["greek yogurt"]
    assert list(queries["relevant"].iloc[0]) == ["i04", "i05"]


def test_title_queries_identify_their_item(catalog: pd.DataFrame) -> None:
    queries = queries_from_catalog(catalog, n_items=8, n_categories=0, seed=2)
    titles = {
        item_id: set(tokenize(title))
        for item_id, title in zip(catalog["item_id"], catalog["title"], strict=True)
    }
    title_rows = queries[queries["kind"] == "title_keywords"]
    assert len(title_rows) == 8
    for query, relevant in zip(
        title_rows["query"], title_rows["relevant"], strict=True
    ):
        holders = {i for i, tokens in titles.items() if set(tokenize(query)) <= tokens}
        assert holders == {relevant[0]}, query


def test_basket_queries_draw_several_categories_per_user(
    catalog: pd.DataFrame,
) -> None:
    ts = pd.Timestamp("2020-01-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": ["u1"] * 5,
            "item_id": ["i09", "i01", "i03", "i06", "i11"],
            "event_type": "purchase",
            "timestamp": [ts + pd.Timedelta(hours=h) for h in range(5)],
            "session_id": ["o1", "o1", "o2", "o2", "o2"],
        }
    )
    queries = queries_from_baskets(events, catalog, seed=0, per_user=5)
    relevant = dict(zip(queries["query"], queries["relevant"], strict=True))
    assert {k: list(v) for k, v in relevant.items()} == {
        "yogurt": ["i03", "i06"], "electronics": ["i11"],
    }  # fmt: skip


def _groups(part: pd.DataFrame) -> set[str]:
    """Each query's group: its user (history) or else its relevant item."""
    return {
        "|".join(history) if len(history) else relevant[0]
        for relevant, history in zip(part["relevant"], part["history"], strict=True)
    }


def test_split_queries_keeps_users_and_items_on_one_side() -> None:
    kinds: list[tuple[str, list[str]]] = [
        ("title_keywords", []),
        ("misspelling", []),
    ] * 20
    kinds += [("user_category", ["h1"]), ("user_category", ["h2"])] * 5
    queries = pd.DataFrame(
        {
            "query_id": [f"q{i}" for i in range(len(kinds))],
            "query": [f"query {i}" for i in range(len(kinds))],
            "kind": [kind for kind, _ in kinds],
            "relevant": [[f"i{i // 2}"] for i in range(len(kinds))],
            "history": [history for _, history in kinds],
        }
    )
    validation, test = split_queries(queries)

    assert len(validation) + len(test) == len(queries)
    assert 0 < len(validation) < len(queries)
    # A title query and its misspelling (one item), or one user's queries, never
    # straddle the split.
    assert not _groups(validation) & _groups(test)
    again, _ = split_queries(queries)
    assert again["query_id"].tolist() == validation["query_id"].tolist()
    with pytest.raises(ValueError, match="validation_share"):
        split_queries(queries, validation_share=1.0)


def test_tune_fusion_returns_the_best_setting(
    engine: SearchEngine, catalog: pd.DataFrame
) -> None:
    queries = queries_from_catalog(catalog, n_items=6, n_categories=3, seed=4)
    grid = [
        SearchOptions(k=50, personalize=False, dense_weight=1.0),
        SearchOptions(k=50, personalize=False, fusion="rrf", rrf_k=60),
    ]
    best, table = tune_fusion(engine, queries, grid)
    assert len(table) == 2 and list(table["fusion"]) == ["convex", "rrf"]
    total = (table["ndcg_10"] + table["recall_50"]).tolist()
    assert best == grid[int(np.argmax(total))]
    with pytest.raises(ValueError, match="grid is empty"):
        tune_fusion(engine, queries, [])


# --- stages ---------------------------------------------------------------


def _curated(folder: Path, catalog: pd.DataFrame) -> Path:
    """A curated folder: the test catalog and two users' baskets (sessions)."""
    folder.mkdir(parents=True)
    catalog.to_parquet(folder / "catalog.parquet", index=False)
    ts = pd.Timestamp("2020-01-01", tz="UTC")
    items = ["i09", "i03", "i06", "i01", "i04", "i05", "i22", "i21"]
    events = pd.DataFrame(
        {
            "user_id": ["u1"] * 4 + ["u2"] * 4,
            "item_id": items,
            "event_type": "purchase",
            "timestamp": [ts + pd.Timedelta(hours=h) for h in range(8)],
            "session_id": ["a", "a", "b", "b", "c", "c", "d", "d"],
        }
    )
    events.to_parquet(folder / "events.parquet", index=False)
    return folder


def test_stages_build_store_and_evaluate(
    catalog: pd.DataFrame, encoder: TextEncoder, tmp_path: Path
) -> None:
    from components.search_eval import evaluate_search
    from components.search_index import build_index
    from shopml.assets import AssetStore
    from shopml.storage import LocalStore

    curated = _curated(tmp_path / "curated", catalog)
    assets = AssetStore(LocalStore(tmp_path / "store"))
    summary = build_index(curated, tmp_path / "index", assets=assets, encoder=encoder)
    assert summary.n_items == len(catalog) and not summary.has_ann
    assert summary.asset_ref == assets.get("search-index").ref

    result = evaluate_search(
        tmp_path / "index",
        curated,
        None,
        tmp_path / "eval",
        assets=assets,
        encoder=encoder,
    )
    assert result.source == "catalog"
    assert set(result.table["method"]) == {
        "keyword", "dense", "hybrid", "fusion_only", "personalized_hybrid",
    }  # fmt: skip
    assert 0.0 < result.metrics["hybrid_ndcg_10"] <= 1.0
    assert (tmp_path / "eval" / "table.md").read_text().startswith("| kind |")
    stored = assets.read_table("search-queries")
    assert stored.num_rows == result.n_queries
    assert "user_category" in set(stored.column("kind").to_pylist())


@pytest.mark.parametrize("name", ["search_index", "search_eval"])
def test_components_compile_with_typed_artifacts(name: str, tmp_path: Path) -> None:
    import importlib

    from kfp import compiler

    component = getattr(importlib.import_module(f"components.{name}"), name)
    spec_path = tmp_path / f"{name}.yaml"
    compiler.Compiler().compile(component, str(spec_path))
    spec = spec_path.read_text()
    assert "system.Model" in spec and "system.Metrics" in spec
    assert ("ann_threshold" in spec) == (name == "search_index")
