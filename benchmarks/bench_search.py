"""Latency of one search query over a 100k-item synthetic catalog, through the server.

Run (``make bench-search``)::

    .venv/bin/python benchmarks/bench_search.py [--items 100000] [--queries 300]
    .venv/bin/python benchmarks/bench_search.py --index-dir DIR --model-dir DIR

Quick rerun: the index is cached under ``$SHOPML_HOME/bench/``, so a second run with
the same ``SHOPML_HOME`` skips the minutes of encoding (``--stages-only`` skips the
server too).

What it does:

1. builds a synthetic catalog (brand, adjective, product noun, size with a unit; 60
   categories; prices), its search index (BM25, MiniLM vectors, HNSW graph above 50k
   items) and a small SASRec artifact over the same items. The index is cached in
   ``$SHOPML_HOME/bench/`` (encoding 100k titles takes minutes on two cores);
2. starts ``python -m serving.search`` on 127.0.0.1 pinned to CPU 0 with one thread
   (``OMP_NUM_THREADS=1``), the client pinned to CPU 1;
3. sends one query per request over a kept-alive HTTP connection and prints p50/p99
   for: distinct queries (every query encoded: the cold path), the same queries again
   (query-embedding cache hits), personalized queries with a 10-item history, and
   each category name once (the category prior's path: the category's best sellers
   join the candidates);
4. prints floors measured side by side on the client core, so that figures compare
   across noisy machines: the bare bm25s ``get_scores`` call, the bare MiniLM forward
   pass of one query, and an HTTP round trip to the server's ready endpoint;
5. times each stage of the query path in-process on the client core (normalize and
   spell, BM25 over the postings, MiniLM query encoding, HNSW search, fusion,
   personalization, the v1 JSON body), wall time and the thread's CPU time; CPU time
   does not count the time a loaded machine keeps the process waiting, so it shows
   where the work goes even when wall times are inflated.

Nothing is asserted: the figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shopml.artifact import load_model_artifact, save_model_artifact  # noqa: E402
from shopml.config import load_settings  # noqa: E402
from shopml.models.sasrec import SASRec, SASRecConfig  # noqa: E402
from shopml.search import (  # noqa: E402
    SASRecPersonalizer,
    SearchEngine,
    SearchOptions,
    TextEncoder,
    build_search_index,
    load_search_index,
    save_search_index,
)
from shopml.search.encoder import QUERY_MAX_TOKENS  # noqa: E402
from shopml.search.text import prepare_query, tokenize  # noqa: E402

BRANDS = [
    "acme",
    "zenith",
    "nordic",
    "sunny",
    "bluebird",
    "evergreen",
    "alpine",
    "harvest",
    "metro",
    "coastal",
    "golden",
    "urban",
    "prairie",
    "summit",
]
ADJECTIVES = [
    "organic",
    "wireless",
    "stainless",
    "unsweetened",
    "gluten free",
    "extra strong",
    "low fat",
    "waterproof",
    "portable",
    "classic",
    "vegan",
    "sparkling",
    "ergonomic",
    "frozen",
    "fresh",
    "premium",
    "compact",
]
NOUNS = [
    "greek yogurt",
    "almond milk",
    "usb-c cable",
    "phone charger",
    "olive oil",
    "dark chocolate",
    "coffee beans",
    "green tea",
    "running shoes",
    "backpack",
    "water bottle",
    "desk lamp",
    "spaghetti",
    "peanut butter",
    "shampoo",
    "toothpaste",
    "dog food",
    "cat litter",
    "notebook",
    "headphones",
    "sunscreen",
    "granola",
    "rice cakes",
    "mineral water",
    "hand soap",
    "dish sponge",
    "paper towels",
    "ice cream",
    "strawberries",
    "bananas",
]
SIZES = ["500ml", "1 l", "250 g", "1kg", "16 oz", "2 lb", "12 pack", "2m", "64gb",
         "6 count", "750 ml", "100 g"]  # fmt: skip


def synthetic_catalog(n_items: int, seed: int = 0) -> pd.DataFrame:
    """``n_items`` products: title, one of 60 categories, a price."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_items):
        noun = rng.choice(NOUNS)
        title = " ".join(
            [
                rng.choice(BRANDS).title(),
                rng.choice(ADJECTIVES),
                noun,
                rng.choice(SIZES),
            ]
        )
        rows.append(
            (f"p{i:06d}", title, f"{noun} {i % 2}", round(rng.uniform(0.5, 80.0), 2))
        )
    return pd.DataFrame(rows, columns=["item_id", "title", "category", "price"])


def prepare(n_items: int, home: Path) -> tuple[Path, Path, pd.DataFrame]:
    """The cached index folder, a model artifact folder, and the catalog."""
    catalog = synthetic_catalog(n_items)
    folder = home / "bench" / f"search-{n_items}"
    index_dir, model_dir = folder / "index", folder / "model"
    if not (index_dir / "manifest.json").is_file():
        print(f"building the index of {n_items} items (cached in {folder}) ...")
        started = time.perf_counter()
        index = build_search_index(catalog, TextEncoder(), show_progress=True)
        save_search_index(index, index_dir)
        print(f"index built in {time.perf_counter() - started:.0f} s")
    if not (model_dir / "manifest.json").is_file():
        torch.manual_seed(0)
        config = SASRecConfig(n_items=n_items, max_seq_len=20, hidden_size=32,
                              n_heads=2, n_layers=2)  # fmt: skip
        items = pd.DataFrame(
            {"index": np.arange(1, n_items + 1), "item_id": catalog["item_id"],
             "title": catalog["title"]}
        )  # fmt: skip
        popularity = np.arange(n_items + 1, dtype=np.float32)
        save_model_artifact(model_dir, SASRec(config), items, popularity)
    return index_dir, model_dir, catalog


def queries(n: int, seed: int = 1) -> list[str]:
    """``n`` distinct realistic queries (some misspelled, some with units)."""
    rng = random.Random(seed)
    found: set[str] = set()
    while len(found) < n:
        parts = [rng.choice(ADJECTIVES), rng.choice(NOUNS)]
        if rng.random() < 0.4:
            parts.append(rng.choice(SIZES))
        if rng.random() < 0.3:
            parts.insert(0, rng.choice(BRANDS))
        query = " ".join(parts)
        if rng.random() < 0.2:
            position = rng.randrange(1, len(query) - 1)
            query = query[:position] + query[position + 1 :]
        found.add(query)
    return sorted(found)


def percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000
    return f"p50 {np.percentile(ms, 50):7.2f} ms   p99 {np.percentile(ms, 99):7.2f} ms"


def timed_cpu(call: Callable[[], object]) -> tuple[float, float]:
    """Wall and thread-CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    call()
    return time.perf_counter() - wall, time.thread_time() - cpu


def timed(call: Callable[[], object], repeats: int) -> list[float]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def start_server(
    model_dir: Path, index_dir: Path, port: int
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "SHOPML_LOG_LEVEL": "WARNING"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.search", "--model-dir", str(model_dir),
         "--index-dir", str(index_dir), "--http-port", str(port), "--no-feature-store"],
        cwd=ROOT, env=env,
    )  # fmt: skip
    # Threads the server starts later (torch, uvicorn) inherit the single core.
    os.sched_setaffinity(process.pid, {0})
    return process


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v2/models/search/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the search model is not ready after {timeout_s} s")


def measure(url: str, texts: list[str], catalog: pd.DataFrame) -> None:
    """Print server latencies for the three query paths."""
    history = catalog["item_id"].iloc[:10].tolist()
    with httpx.Client(timeout=30) as client:

        def ask(query: str, with_history: bool = False) -> None:
            row: dict[str, object] = {"query": query, "k": 10}
            if with_history:
                row["item_ids"] = history
            response = client.post(f"{url}/v1/models/search:predict",
                                   json={"instances": [row]})  # fmt: skip
            response.raise_for_status()

        for query in texts[:5]:  # connection and first-call warm-up
            ask(query + " warmup")
        cold = [timed(partial(ask, q), 1)[0] for q in texts]
        warm = [timed(partial(ask, q), 1)[0] for q in texts]
        personal = [timed(partial(ask, q, True), 1)[0] for q in texts]
        # Category names: the category prior adds the category's best sellers.
        names = sorted(catalog["category"].dropna().unique())
        browse = [timed(partial(ask, q), 1)[0] for q in names]
        ready = timed(lambda: client.get(f"{url}/v2/models/search/ready"), len(texts))
    print(f"server, distinct queries (encoded) : {percentiles(cold)}")
    print(f"server, repeated queries (cached)  : {percentiles(warm)}")
    print(f"server, personalized (10 items)    : {percentiles(personal)}")
    print(f"server, {len(names):3d} category names     : {percentiles(browse)}")
    print(f"floor: HTTP round trip (ready)     : {percentiles(ready)}")


def floors(index_dir: Path, texts: list[str]) -> None:
    """Bare library calls on the client core: bm25s and the MiniLM forward pass."""
    index = load_search_index(index_dir)
    encoder = TextEncoder(cache_size=0)
    tokens = [tokenize(text) for text in texts]
    bm25 = [timed(partial(index.bm25.get_scores, t), 1)[0] for t in tokens]
    encode = [timed(partial(encoder.encode_query, q), 1)[0] for q in texts]
    print(f"floor: bare bm25s get_scores       : {percentiles(bm25)}")
    print(f"floor: bare MiniLM query forward   : {percentiles(encode)}")


def _cold_search(engine: SearchEngine, text: str) -> None:
    """One unpersonalized query with the query-vector cache emptied first."""
    engine.encoder.clear_cache()
    engine.search(text, options=SearchOptions(personalize=False))


def _stage_calls(
    engine: SearchEngine, text: str, history: list[str]
) -> dict[str, Callable[[], object]]:
    """One query's stages as calls, each fed by the previous stage's output."""
    from serving.search import _v1_prediction

    index = engine.index
    prepared = prepare_query(text)
    tokens = index.corrector.correct_all(prepared.tokens)
    vector = engine.encoder.encode_query(" ".join(tokens))
    match = index.match(tokens, None)
    response = engine.search(text, options=SearchOptions(personalize=False))
    return {
        "normalize + spelling": lambda: index.corrector.correct_all(
            prepare_query(text).tokens
        ),
        "BM25 over postings (+top 100)": lambda: engine._keyword_top(
            index.match(tokens, None), 100, True
        ),
        "MiniLM query encoding": lambda: engine.encoder._forward(
            [" ".join(tokens)], QUERY_MAX_TOKENS
        ),
        "dense top 100 (HNSW or exact)": lambda: engine._dense_top(vector, None, 100),
        "whole query, no cache": partial(_cold_search, engine, text),
        "personalized, cached vector": lambda: engine.search(text, history=history),
        "v1 JSON body": lambda: json.dumps({"predictions": [_v1_prediction(response)]}),
        "(BM25 as before: get_scores)": lambda: (
            index.bm25.get_scores(tokens) if match.rows.size else None
        ),
    }


def stages(
    index_dir: Path, model_dir: Path, texts: list[str], history: list[str]
) -> None:
    """Print p50/p99 wall and CPU time of each stage of the query path."""
    engine = SearchEngine(
        load_search_index(index_dir),
        TextEncoder(),
        SASRecPersonalizer(load_model_artifact(model_dir)),
    )
    samples: dict[str, list[tuple[float, float]]] = {}
    for text in texts:
        for name, call in _stage_calls(engine, text, history).items():
            samples.setdefault(name, []).append(timed_cpu(call))
    for name, pairs in samples.items():
        wall, cpu = (np.array(column) * 1000 for column in zip(*pairs, strict=True))
        print(
            f"stage {name:31s}: wall p50 {np.percentile(wall, 50):6.2f} "
            f"p99 {np.percentile(wall, 99):6.2f} ms   cpu p50 "
            f"{np.percentile(cpu, 50):6.2f} p99 {np.percentile(cpu, 99):6.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument(
        "--index-dir", type=Path, help="an existing index instead of the synthetic one"
    )
    parser.add_argument("--model-dir", type=Path, help="model artifact for --index-dir")
    parser.add_argument(
        "--stages-only", action="store_true", help="only the in-process stage times"
    )
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.index_dir is not None and args.model_dir is not None:
        index_dir, model_dir = args.index_dir, args.model_dir
        catalog = pd.read_parquet(index_dir / "items.parquet")
        args.items = len(catalog)
    else:
        index_dir, model_dir, catalog = prepare(args.items, load_settings().home)
    texts = queries(args.queries)

    os.sched_setaffinity(0, {1 % os.cpu_count()})  # type: ignore[operator]
    torch.set_num_threads(1)
    history = catalog["item_id"].iloc[:10].astype(str).tolist()
    if args.stages_only:
        stages(index_dir, model_dir, texts, history)
        return
    url = f"http://127.0.0.1:{args.port}"
    process = start_server(model_dir, index_dir, args.port)
    try:
        wait_ready(url, process, timeout_s=300)
        print(f"{args.items} items, {len(texts)} queries, server on CPU 0, client on 1")
        measure(url, texts, catalog)
    finally:
        process.terminate()
        process.wait(timeout=30)
    floors(index_dir, texts)
    stages(index_dir, model_dir, texts, history)


if __name__ == "__main__":
    main()
