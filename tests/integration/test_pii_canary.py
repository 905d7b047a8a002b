"""PII canary: plant fake personal data in the raw input, run everything, scan everything.

Unique fake values (an email in two notations, phones in national and international
notations, a Luhn-valid card in three spacings, a street address, a name) are written
into the raw events (as user ids, search queries and a free-text column) and the users
table; two of their rows are bound for quarantine. The module fixture runs the whole
lifecycle pipeline once through ``kfp.local`` (object store on the S3 server, online
store on Redis), then holds a serving session: v1, v2, explain and malformed requests
carrying the values against the deployed recommender, and the same plus search
queries against ``python -m serving.search`` logging at DEBUG. It keeps every log
line and HTTP response. Each test scans one family of places with
:func:`shopml.security.scan_for_values`: only the restricted raw zone (``raw/`` in the
bucket) may hold the values, and the scanner must find them there and in the input,
so a zero elsewhere means something. The KFP task outputs of ingest and clean carry
only refs to raw-zone assets, so the pipeline root is scanned like any other place.

Run (about 3 minutes on 2 busy cores)::

    .venv/bin/pytest tests/integration/test_pii_canary.py -q
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from components.deploy import stop_local
from shopml.config import load_settings
from shopml.runner import PipelineRun, run_local_pipeline
from shopml.security import ScanHit, scan_for_values
from shopml.storage import MinioStore
from tests.services import LOOPBACK, S3Server, free_port, start_redis

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# --- the canary values ------------------------------------------------------------

EMAIL = "Zelda.Quorvix+shop@Example.COM"
#: The same person as EMAIL, in another notation (case and a trailing blank).
EMAIL_OTHER = "zelda.quorvix+shop@example.com "
EMAIL_IN_TEXT = "Quorvix.Billing+receipts@Example.ORG"
PHONE_US = "(415) 555-0134"
PHONE_US_INTL = "+1-415-555-0134"
PHONE_US_DOTS = "415.555.0134"
PHONE_DE_INTL = "+49 30 72946153"
PHONE_DE_NATIONAL = "030 72946153"
PHONE_UK = "+44 20 7946 0321"
CARD_SPACED = "4929 7315 8204 6611"
CARD_DASHED = "4929-7315-8204-6611"
CARD_PLAIN = "4929731582046611"
ADDRESS = "1742 Quillfeather Lane Apt 9"
NAME = "Zelda Quorvix"

#: Raw user ids of the canary people; notations of one person are adjacent.
CANARY_USER_IDS = (
    EMAIL,
    EMAIL_OTHER,
    PHONE_US,
    PHONE_US_INTL,
    PHONE_DE_INTL,
    PHONE_DE_NATIONAL,
    PHONE_UK,
)

#: Free text typed by people (search queries, reviews) carrying the values.
CANARY_TEXTS = (
    f"gift ideas for {EMAIL}",
    f"send the receipt to {EMAIL_IN_TEXT} please",
    f"call me at {PHONE_US} about the mug",
    f"text {PHONE_US_DOTS} when shipped",
    f"whatsapp {PHONE_UK}",
    f"{PHONE_DE_INTL} teapot delivery",
    f"ring {PHONE_DE_NATIONAL} after six",
    f"tel {PHONE_UK} {PHONE_DE_NATIONAL}",
    f"pay with {CARD_SPACED}",
    f"card {CARD_DASHED} expired",
    f"{CARD_PLAIN} refund",
    f"deliver to {ADDRESS} by friday",
)

#: What the scan looks for: every notation planted, plus fragments that betray a
#: partly masked value (a name, an email's local part, a street name).
SCAN_VALUES = (
    *CANARY_USER_IDS,
    EMAIL_IN_TEXT,
    PHONE_US_DOTS,
    CARD_SPACED,
    CARD_DASHED,
    CARD_PLAIN,
    ADDRESS,
    NAME,
    "Quorvix",
    "Quillfeather",
)

N_ITEMS = 40
N_SHOPPERS = 16
EVENTS_PER_USER = 14
START = datetime(2024, 3, 1, tzinfo=UTC)

# --- raw input ----------------------------------------------------------------------


def _catalog_rows() -> list[dict[str, Any]]:
    kinds = ("Ceramic Mug", "Glass Teapot", "Linen Towel", "Oak Tray", "Wool Blanket")
    colours = ("Blue", "Green", "Amber", "Grey", "Rose", "White", "Black", "Teal")
    return [
        {
            "item_id": f"i{i:03d}",
            "title": f"{colours[i % len(colours)]} {kinds[i % len(kinds)]} {i}",
            "category": kinds[i % len(kinds)].split()[-1].lower(),
            "price": f"{5 + i % 17}.99",
        }
        for i in range(N_ITEMS)
    ]


def _event_rows() -> list[dict[str, Any]]:
    """A few hundred events; canary users search with PII, some rows are rejected."""
    users = [f"shopper-{n:02d}" for n in range(N_SHOPPERS)] + list(CANARY_USER_IDS)
    rows, n_text = [], 0
    for u, user in enumerate(users):
        for e in range(EVENTS_PER_USER):
            when = START + timedelta(hours=u, minutes=7 * e)
            row: dict[str, Any] = {
                "user_id": user,
                "item_id": f"i{(u * 5 + e * 3) % N_ITEMS:03d}",
                "event_type": ("view", "click", "cart", "purchase")[e % 4],
                "timestamp": when.isoformat(),
                "query": None,
                "review": None,
            }
            if user in CANARY_USER_IDS and e % 3 == 0:
                row["event_type"] = "search"
                row["query"] = CANARY_TEXTS[n_text % len(CANARY_TEXTS)]
                row["review"] = CANARY_TEXTS[(n_text + 5) % len(CANARY_TEXTS)]
                n_text += 1
            rows.append(row)

    # Rejected rows keep their raw fields: they must stay in the restricted raw zone.
    rejected = [
        {"item_id": "no-such-item", "timestamp": START.isoformat()},
        {"item_id": "i001", "timestamp": "not a time"},
    ]
    for user, fields in zip((EMAIL, PHONE_US), rejected, strict=True):
        rows.append(
            {"user_id": user, "event_type": "search", "query": CANARY_TEXTS[0]}
            | {"review": f"{NAME}, {ADDRESS}"}
            | fields
        )
    return rows


def _user_rows() -> list[dict[str, str]]:
    rows = [
        {
            "user_id": user,
            "name": NAME,
            "email": EMAIL,
            "phone": PHONE_US,
            "address": ADDRESS,
            "age": "35",
        }
        for user in CANARY_USER_IDS
    ]
    rows += [
        {"user_id": f"shopper-{n:02d}", "name": f"Shopper {n}", "email": "",
         "phone": "", "address": "", "age": str(20 + n)}
        for n in range(N_SHOPPERS)
    ]  # fmt: skip
    return rows


def write_raw_input(folder: Path) -> dict[str, Path]:
    """Events as JSON lines, catalog and users as CSV; returns the three paths."""
    import csv

    folder.mkdir(parents=True)
    paths = {
        "events": folder / "events.jsonl",
        "catalog": folder / "catalog.csv",
        "users": folder / "users.csv",
    }
    paths["events"].write_text(
        "".join(json.dumps(row) + "\n" for row in _event_rows()), encoding="utf-8"
    )
    for kind, rows in (("catalog", _catalog_rows()), ("users", _user_rows())):
        with paths[kind].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return paths


# --- the serving session --------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One HTTP request of the session; the response is kept, the request is not.

    A request without ``body`` or ``content`` is a GET.
    """

    label: str
    path: str
    body: Any = None
    content: bytes | None = None
    expect_error: bool = False


def _v2_bytes(name: str, values: list[str]) -> dict[str, Any]:
    return {"name": name, "shape": [len(values)], "datatype": "BYTES", "data": values}


def recommender_exchanges(model: str = "recommender") -> list[Exchange]:
    """v1 and v2 requests by canary users, and malformed ones that carry PII."""
    v1, v2 = f"/v1/models/{model}:predict", f"/v2/models/{model}/infer"
    users = list(CANARY_USER_IDS)
    good = [
        Exchange(f"v1-user-{n}", v1, {"instances": [{"user_id": user, "k": 5}]})
        for n, user in enumerate(users)
    ]
    good += [
        Exchange("v1-batch", v1, {"instances": [{"user_id": u} for u in users]}),
        Exchange(
            "v2-batch", v2, {"id": "c-1", "inputs": [_v2_bytes("user_id", users)]}
        ),
        Exchange(
            "v1-explain",
            f"/v1/models/{model}:explain",
            {"instances": [{"user_id": EMAIL, "k": 3}]},
        ),
    ]
    bad = [
        ("k-holds-phone", v1, {"instances": [{"user_id": EMAIL, "k": PHONE_US}]}),
        ("explain-holds-card", v1,
         {"instances": [{"user_id": EMAIL, "explain": CARD_SPACED}]}),
        ("field-named-email", v1, {"instances": [{"user_id": EMAIL, EMAIL: 1}]}),
        ("body-keyed-by-email", v1, {EMAIL: [{"user_id": PHONE_UK}]}),
        ("item-id-object", v1, {"instances": [{"item_ids": [{"email": EMAIL}]}]}),
        ("user-id-object", v1, {"instances": [{"user_id": {"phone": PHONE_US}}]}),
        ("exclude-object", v1,
         {"instances": [{"user_id": EMAIL, "exclude_item_ids": [{"a": ADDRESS}]}]}),
        ("v2-int-user", v2, {"inputs": [{"name": "user_id", "shape": [1],
                                         "datatype": "INT32", "data": [PHONE_US]}]}),
        ("v2-input-named-email", v2, {"inputs": [_v2_bytes(EMAIL, [PHONE_US])]}),
        ("v2-bad-shape", v2, {"inputs": [{"name": "user_id", "shape": [3],
                                          "datatype": "BYTES", "data": [EMAIL]}]}),
    ]  # fmt: skip
    broken_json = f'{{"instances": [{{"user_id": "{EMAIL}", "k": {CARD_SPACED}'
    return (
        good
        + [Exchange(label, path, body, expect_error=True) for label, path, body in bad]
        + [
            Exchange(
                "v1-broken-json", v1, content=broken_json.encode(), expect_error=True
            ),
            # Last: the Prometheus metrics after every request above.
            Exchange("metrics", "/metrics"),
        ]
    )


def search_exchanges() -> list[Exchange]:
    """Search queries that carry PII, with and without canary users, and bad rows."""
    v1, v2 = "/v1/models/search:predict", "/v2/models/search/infer"
    rows = [{"query": text, "k": 5} for text in CANARY_TEXTS]
    rows += [{"query": "blue mug", "user_id": user} for user in CANARY_USER_IDS]
    good = [
        Exchange("search-v1-queries", v1, {"instances": rows[: len(CANARY_TEXTS)]}),
        Exchange("search-v1-users", v1, {"instances": rows[len(CANARY_TEXTS) :]}),
        Exchange(
            "search-v2",
            v2,
            {"inputs": [_v2_bytes("query", list(CANARY_TEXTS[:4])),
                        _v2_bytes("user_id", list(CANARY_USER_IDS[:4]))]},
        ),
    ]  # fmt: skip
    bad = [
        ("mode-holds-email", {"query": "mug", "mode": EMAIL}),
        ("price-holds-phone", {"query": "mug", "min_price": PHONE_US}),
        ("field-named-address", {"query": "mug", ADDRESS: True}),
        ("query-object", {"query": {"email": EMAIL}}),
        ("categories-hold-card", {"query": "mug", "categories": CARD_SPACED}),
        ("personalize-holds-name", {"query": "mug", "personalize": NAME}),
    ]
    return good + [
        Exchange(f"search-{label}", v1, {"instances": [row]}, expect_error=True)
        for label, row in bad
    ]


def run_session(base_url: str, exchanges: list[Exchange], out_dir: Path) -> list[int]:
    """Send every request; keep status, headers and body of each response.

    Responses go to ``out_dir/malformed`` (requests that must fail), ``out_dir/search``
    or ``out_dir/recommender``.

    Returns:
        The status codes, in order.
    """
    statuses = []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for n, exchange in enumerate(exchanges):
            if exchange.body is None and exchange.content is None:
                response = client.get(exchange.path)
            elif exchange.content is not None:
                response = client.post(
                    exchange.path,
                    content=exchange.content,
                    headers={"content-type": "application/json"},
                )
            else:
                response = client.post(exchange.path, json=exchange.body)
            headers = "".join(f"{k}: {v}\n" for k, v in response.headers.items())
            folder = out_dir / (
                "malformed"
                if exchange.expect_error
                else "search"
                if "/search" in exchange.path
                else "recommender"
            )
            folder.mkdir(parents=True, exist_ok=True)
            (
                folder / f"{base_url.rsplit(':', 1)[-1]}-{n:02d}-{exchange.label}"
            ).write_bytes(
                f"{response.status_code}\n{headers}\n".encode() + response.content
            )
            statuses.append(response.status_code)
    return statuses


# --- the run --------------------------------------------------------------------------

START_TIMEOUT_S = 180
#: Task outputs of kfp.local that are copies of raw-zone data (raw ids by design).
RAW_TASK_OUTPUTS = (("ingest", "raw"), ("clean", "quarantine"))


@dataclass(frozen=True)
class CanaryRun:
    """Everything the canary run left behind, for the scans.

    Attributes:
        inputs: the raw input files written by the test.
        home: ``SHOPML_HOME`` of the run (kfp.local outputs, logs, Feast, secrets).
        run: the pipeline run.
        bucket_dir: a download of the whole S3 bucket.
        redis_url: the online store.
        logs_dir: what the test process logged and printed, and the search server log.
        responses_dir: status, headers and body of every HTTP response.
        failed_as_expected: per request (``server/label``), whether its status was a
            4xx exactly when the request was malformed.
    """

    inputs: dict[str, Path]
    home: Path
    run: PipelineRun
    bucket_dir: Path
    redis_url: str
    logs_dir: Path
    responses_dir: Path
    failed_as_expected: dict[str, bool]


def _pipeline_arguments(inputs: dict[str, Path]) -> dict[str, Any]:
    return {
        "source": "files",
        "events_uri": str(inputs["events"]),
        "catalog_uri": str(inputs["catalog"]),
        "users_uri": str(inputs["users"]),
        "epochs": 2,
        "max_seq_len": 10,
        "hidden_size": 16,
        "n_layers": 1,
        "n_heads": 1,
        "device": "cpu",
        "gpus": 0,
        # Two epochs on 23 users cannot beat popularity; the gate only has to run.
        "min_lift": -1.0,
        # Every user, so the monitor stage sends each canary id to the endpoint.
        "monitor_users": N_SHOPPERS + len(CANARY_USER_IDS),
        "search_eval_queries": 10,
    }


@contextlib.contextmanager
def captured_logs(path: Path) -> Iterator[None]:
    """Send this process's log records (DEBUG up), stdout and stderr to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    with path.open("a", encoding="utf-8") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                yield
        finally:
            root.removeHandler(handler)
            root.setLevel(level)


@contextlib.contextmanager
def search_server(run: PipelineRun, log_path: Path) -> Iterator[str]:
    """``python -m serving.search`` over the run's model and index, on the Redis store."""
    port = free_port()
    command = [
        sys.executable, "-m", "serving.search",
        "--model-dir", str(run.output("train", "model")),
        "--index-dir", str(run.output("search-index", "index")),
        "--http-port", str(port), "--host", LOOPBACK,
    ]  # fmt: skip
    url = f"http://{LOOPBACK}:{port}"
    with log_path.open("ab") as log:
        # DEBUG: the per-request lines too, where queries are logged (masked).
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"SHOPML_LOG_LEVEL": "DEBUG"},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _is_ready(url, "search"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"search server not ready (exit {process.poll()}): {log_path}"
                )
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _is_ready(url: str, model: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/models/{model}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _serve_session(run: PipelineRun, root: Path) -> dict[str, bool]:
    """Requests to the deployed recommender, then to a search server; stops both.

    Returns:
        Per request, whether it got a 4xx exactly when it was malformed.
    """
    sessions = {"deployed": recommender_exchanges()}
    statuses = run_session(
        run.endpoint.split("/v1/")[0], sessions["deployed"], root / "responses"
    )
    record = json.loads((load_settings().home / "runs" / "server.json").read_text())
    stop_local(int(record["pid"]))

    sessions["search-server"] = search_exchanges() + recommender_exchanges()
    with search_server(run, root / "logs" / "search-server.log") as url:
        statuses += run_session(url, sessions["search-server"], root / "responses")
    exchanges = [(s, e) for s, batch in sessions.items() for e in batch]
    return {
        f"{server}/{exchange.label}": (400 <= status < 500) == exchange.expect_error
        for (server, exchange), status in zip(exchanges, statuses, strict=True)
    }


def _download_bucket(dest: Path) -> None:
    settings = load_settings()
    assert settings.s3 is not None
    store = MinioStore(settings.s3, create_bucket=False)
    for key in store.list(""):
        store.get_file(key, dest / key)


CANARY_BUCKET = "pii-canary"


def _make_bucket(s3: S3Server) -> None:
    from minio import Minio

    client = Minio(
        s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False
    )
    if not client.bucket_exists(s3.bucket):
        client.make_bucket(s3.bucket)


@pytest.fixture(scope="module")
def canary(
    tmp_path_factory: pytest.TempPathFactory, _moto_server: str
) -> Iterator[CanaryRun]:
    """Run the pipeline and the serving session once for every scan of this module."""
    root = tmp_path_factory.mktemp("canary")
    inputs = write_raw_input(root / "input")
    s3 = S3Server(endpoint=_moto_server, bucket=CANARY_BUCKET)
    _make_bucket(s3)
    redis = start_redis()
    env = s3.env() | {
        "SHOPML_HOME": str(root / "home"),
        "SHOPML_PROGRESS": "0",
        "SHOPML_REDIS_URL": redis.url,
        "HF_HUB_OFFLINE": "1",
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in [n for n in os.environ if n.startswith("SHOPML_")]:
                patch.delenv(name)
            for name, value in env.items():
                patch.setenv(name, value)
            with captured_logs(root / "logs" / "test-process.log"):
                run = run_local_pipeline(load_settings(), _pipeline_arguments(inputs))
                failed_as_expected = _serve_session(run, root)
            _download_bucket(root / "bucket")
        yield CanaryRun(
            inputs=inputs,
            home=root / "home",
            run=run,
            bucket_dir=root / "bucket",
            redis_url=redis.url,
            logs_dir=root / "logs",
            responses_dir=root / "responses",
            failed_as_expected=failed_as_expected,
        )
    finally:
        server_record = root / "home" / "runs" / "server.json"
        if server_record.is_file():
            with contextlib.suppress(OSError, ValueError):
                stop_local(int(json.loads(server_record.read_text())["pid"]))
        redis.stop()


# --- the scans ------------------------------------------------------------------------


def _report(hits: list[ScanHit]) -> str:
    return "\n".join(
        f"{SCAN_VALUES[hit.value_index]!r} ({hit.variant}) in {hit.location}"
        for hit in hits
    )


def test_scanner_finds_every_value_in_the_input(canary: CanaryRun) -> None:
    hits = scan_for_values(canary.inputs.values(), [], SCAN_VALUES)
    assert {hit.value_index for hit in hits} == set(range(len(SCAN_VALUES)))


def test_raw_zone_keeps_raw_ids_and_quarantined_rows(canary: CanaryRun) -> None:
    raw_zone = canary.bucket_dir / "raw"
    hits = scan_for_values([raw_zone], [], SCAN_VALUES)
    assets = {
        Path(hit.location.split("!")[0]).relative_to(raw_zone).parts[0] for hit in hits
    }
    assert {"raw_events", "raw_users", "quarantine_events"} <= assets
    in_raw_events = {hit.value_index for hit in hits if "raw_events" in hit.location}
    assert set(range(len(CANARY_USER_IDS))) <= in_raw_events


def test_every_request_of_the_session_got_the_expected_status(
    canary: CanaryRun,
) -> None:
    wrong = [label for label, ok in canary.failed_as_expected.items() if not ok]
    assert wrong == [], "good requests succeed, malformed ones get a 4xx"


def _redis_keys(url: str) -> int:
    import redis

    client: Any = redis.Redis.from_url(url)  # sync client; the stubs mix in async
    try:
        return int(client.dbsize())
    finally:
        client.close()


def _places(canary: CanaryRun, family: str) -> tuple[list[Path], list[str], list[Path]]:
    """Paths, Redis URLs and excluded paths of one family of places to scan."""
    run, home = canary.run, canary.home
    raw_task_outputs = [run.output(task, name) for task, name in RAW_TASK_OUTPUTS]
    server_logs = [
        *(home / "logs").glob("server-*.log"),
        canary.logs_dir / "search-server.log",
    ]
    places: dict[str, tuple[list[Path], list[str], list[Path]]] = {
        "object-store": ([canary.bucket_dir], [], [canary.bucket_dir / "raw"]),
        "online-store": ([], [canary.redis_url], []),
        "local-state": ([home], [], [*raw_task_outputs, *server_logs]),
        "process-logs": ([run.log_path, canary.logs_dir / "test-process.log"], [], []),
        "server-logs": (server_logs, [], []),
        "recommender-responses": ([canary.responses_dir / "recommender"], [], []),
        "search-responses": ([canary.responses_dir / "search"], [], []),
        "error-responses": ([canary.responses_dir / "malformed"], [], []),
        "kfp-raw-task-outputs": (raw_task_outputs, [], []),
    }
    return places[family]


@pytest.mark.parametrize(
    "family",
    [
        "object-store",
        "online-store",
        "local-state",
        "process-logs",
        "server-logs",
        "recommender-responses",
        "search-responses",
        "error-responses",
        "kfp-raw-task-outputs",
    ],
)
def test_no_planted_value_outside_the_raw_zone(canary: CanaryRun, family: str) -> None:
    paths, redis_urls, exclude = _places(canary, family)
    assert paths or redis_urls
    for path in paths:
        assert path.exists() and (path.is_file() or any(path.iterdir())), path
    for url in redis_urls:
        assert _redis_keys(url) > 0, f"nothing was written to {url}"
    hits = scan_for_values(paths, redis_urls, SCAN_VALUES, exclude=exclude)
    assert hits == [], _report(hits)
