"""Start the recommender model server (KServe ``ModelServer``, REST only).

Run::

    python -m serving --model-dir .shopml/models/sasrec
    python -m serving --model-dir DIR --model-name recommender --http-port 8080 \\
        --host 127.0.0.1 --torch-threads 1 --no-feature-store
    python -m serving --model-dir DIR --catalog curated/catalog.parquet \\
        --lookup-timeout-ms 250 --max-batch-size 32 --max-wait-ms 2 \\
        --max-in-flight 32 --max-body-bytes 262144 --body-timeout-s 10

The server binds 127.0.0.1 unless ``--host`` says otherwise (a pod passes ``0.0.0.0``)
and never opens gRPC. User histories come from the online feature store described by the
``SHOPML_*`` settings; ``--no-feature-store`` serves only requests that send
``item_ids``. ``--catalog`` (a canonical catalog file with ``item_id`` and
``category``) enables the ``exclude_categories`` filter. Inference requests beyond
``--max-in-flight`` get 503 at once (load shedding; health checks are never shed) and
bodies over ``--max-body-bytes`` get 413; a body not complete within
``--body-timeout-s`` gets 408 and holds no in-flight slot meanwhile
(:mod:`serving.admission`). Error bodies never quote what the client sent: an unknown
model name gets 404 without the name, and request-validation errors (422) keep only
where and what, never the client's input. Prometheus metrics are on ``/metrics``.
The process exits with status 1 when the artifact cannot be loaded, so it never
reports Ready.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import ModelServer
from kserve.errors import (
    InvalidInput,
    ModelNotFound,
    NoModelReady,
    UnsupportedProtocol,
)

from serving.admission import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_IN_FLIGHT,
    AdmissionMiddleware,
)
from serving.batching import DEFAULT_MAX_WAIT_MS
from serving.protocol import shown_names
from serving.recommender import DEFAULT_LOOKUP_TIMEOUT_S, RecommenderModel
from shopml.config import load_settings
from shopml.logs import configure_logging
from shopml.online_features import OnlineFeatureClient
from shopml.security import load_pseudonymizer

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class BoundModelServer(ModelServer):
    """A REST-only ``ModelServer`` that listens on a chosen address.

    KServe 0.21 hard-codes ``host="0.0.0.0"`` in its REST server's uvicorn config and
    offers no argument for it. ``ModelServer.start`` builds that REST server and then
    calls ``setup_event_loop`` before serving, so the address is set there.

    The same hook puts :class:`~serving.admission.AdmissionMiddleware` (load shedding
    and the body size limit) outermost, so a shed request costs no other middleware.
    KServe's per-request timing (a middleware that matches every route a second time
    and calls ``getrusage`` twice, and a formatted log line per request) runs only
    when the ``kserve.trace`` logger is at INFO or below, i.e. at DEBUG level.

    Args:
        host: the address to listen on.
        http_port: the HTTP port.
        max_in_flight: inference requests served at once; more get 503.
        max_body_bytes: largest request body accepted; larger ones get 413.
        body_timeout_s: seconds a client has to send its whole body; later gets 408.
    """

    def __init__(
        self,
        host: str,
        http_port: int,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    ) -> None:
        self.trace_requests = logging.getLogger("kserve.trace").isEnabledFor(
            logging.INFO
        )
        super().__init__(
            http_port=http_port,
            enable_grpc=False,
            workers=1,
            enable_latency_logging=self.trace_requests,
        )
        self.host = host
        self.max_in_flight = max_in_flight
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    def setup_event_loop(self) -> None:
        """Point the REST server at ``self.host``, choose its middlewares, then set
        up the loop as KServe does.

        Raises:
            RuntimeError: KServe changed and no REST server exists at this point.
        """
        rest_server = self._rest_server
        if rest_server is None or not hasattr(rest_server, "_add_middlewares"):
            raise RuntimeError(
                "kserve ModelServer has no REST server with _add_middlewares before "
                "serving; the hook in serving.__main__ needs updating for this kserve"
            )
        rest_server.config.host = self.host
        add_kserve_middlewares = rest_server._add_middlewares

        def add_middlewares(app: Any) -> None:
            if self.trace_requests:
                add_kserve_middlewares(app)
            # Added last, so it runs first.
            app.add_middleware(
                AdmissionMiddleware,
                max_in_flight=self.max_in_flight,
                max_body_bytes=self.max_body_bytes,
                body_timeout_s=self.body_timeout_s,
            )

        add_kserve_handlers = rest_server._add_exception_handlers

        def add_exception_handlers(app: Any) -> None:
            add_kserve_handlers(app)
            for error, status in CLIENT_ERRORS.items():
                app.add_exception_handler(error, _client_error_handler(status))
            app.add_exception_handler(ModelNotFound, _model_not_found_handler)
            app.add_exception_handler(RequestValidationError, _validation_handler)

        # RESTServer.start (awaited after this hook) builds the app and calls these.
        rest_server._add_middlewares = add_middlewares
        rest_server._add_exception_handlers = add_exception_handlers
        # uvicorn's access line holds the URL path, where a client may put anything
        # (an email as a model name): only at DEBUG, like KServe's timing lines.
        logging.getLogger("uvicorn.access").setLevel(
            logging.INFO if self.trace_requests else logging.WARNING
        )
        super().setup_event_loop()


#: Client mistakes answered without a traceback in the log: KServe's own handlers log
#: each one at ERROR with its stack (about 20 lines a request) and its message.
#: ``ModelNotFound`` has a handler of its own: its message quotes the URL's model name.
CLIENT_ERRORS: dict[type[Exception], HTTPStatus] = {
    InvalidInput: HTTPStatus.BAD_REQUEST,
    UnsupportedProtocol: HTTPStatus.BAD_REQUEST,
}

NO_SUCH_MODEL = "no such model; GET /v1/models or /v2/models lists the served models"


async def _model_not_found_handler(_request: Any, _error: Exception) -> JSONResponse:
    """404 without the requested name: a client may put anything in the URL."""
    logger.warning("rejected request: ModelNotFound (404)")
    return JSONResponse(
        status_code=HTTPStatus.NOT_FOUND, content={"error": NO_SUCH_MODEL}
    )


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """FastAPI's validation errors without anything the client sent.

    Each error keeps ``type``, ``msg`` and ``loc`` (where a name in ``loc`` that is not
    shaped like a field name is replaced, as it may be a client's dict key); ``input``
    (the whole offending value, often the body) and ``ctx`` are dropped.

    Args:
        errors: ``RequestValidationError.errors()``.

    Returns:
        One dict per error with ``loc``, ``type`` and ``msg``.
    """
    details = []
    for error in errors:
        loc = [
            part if isinstance(part, int) else shown_names([part])[0]
            for part in error.get("loc", ())
        ]
        details.append(
            {"loc": loc, "type": str(error.get("type")), "msg": str(error.get("msg"))}
        )
    return details


async def _validation_handler(_request: Any, error: Exception) -> JSONResponse:
    """422 naming where the body is wrong, never echoing the body (FastAPI does)."""
    errors = error.errors() if isinstance(error, RequestValidationError) else []
    logger.warning("rejected request: RequestValidationError (422)")
    return JSONResponse(
        status_code=HTTPStatus.UNPROCESSABLE_ENTITY,
        content={"detail": validation_details(errors)},
    )


def _client_error_handler(
    status: HTTPStatus,
) -> Callable[[Any, Exception], Awaitable[JSONResponse]]:
    """A handler that answers ``status`` with the error's message and logs one line."""

    async def handle(_request: Any, error: Exception) -> JSONResponse:
        logger.warning("rejected request: %s (%d)", type(error).__name__, status)
        return JSONResponse(status_code=status, content={"error": str(error)})

    return handle


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model-dir", type=Path, required=True, help="model artifact folder"
    )
    parser.add_argument("--model-name", default="recommender", help="name in the URL")
    parser.add_argument("--http-port", type=int, default=8080, help="HTTP port")
    parser.add_argument("--host", default=LOOPBACK, help="address to listen on")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads for torch; 1 keeps small batches fast on shared CPUs",
    )
    parser.add_argument(
        "--no-feature-store",
        action="store_true",
        help="serve without the online store: only requests with item_ids",
    )
    parser.add_argument(
        "--catalog",
        type=Path,
        default=None,
        help="catalog file (parquet/csv with item_id, category) for category filters",
    )
    parser.add_argument(
        "--lookup-timeout-ms",
        type=float,
        default=DEFAULT_LOOKUP_TIMEOUT_S * 1000,
        help="deadline of an online-store lookup before popularity fallback",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="rows/batch")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        help="wait for a batch to fill; 0 batches only what queued while the model "
        "was busy (no added latency)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        help="concurrent inference requests; more are shed with 503",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body; larger ones get 413",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds a client has to send an inference body; later gets 408",
    )
    return parser.parse_args(argv)


def read_item_categories(path: Path) -> dict[str, str]:
    """Item id -> category from a canonical catalog file (Parquet or CSV).

    Raises:
        ValueError: the file lacks ``item_id`` or ``category``.
    """
    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    missing = {"item_id", "category"} - set(frame.columns)
    if missing:
        raise ValueError(
            f"catalog {path} lacks column(s) {sorted(missing)}; category filters need "
            "item_id and category"
        )
    frame = frame.dropna(subset=["category"])
    return dict(
        zip(frame["item_id"].astype(str), frame["category"].astype(str), strict=True)
    )


def build_model(args: argparse.Namespace) -> RecommenderModel:
    """Build the recommender with its feature client and pseudonymizer, and load it."""
    feature_client = None
    pseudonymizer = None
    if not args.no_feature_store:
        settings = load_settings()
        feature_client = OnlineFeatureClient.from_settings(settings)
        pseudonymizer = load_pseudonymizer(settings)

    categories = read_item_categories(args.catalog) if args.catalog else None
    model = RecommenderModel(
        args.model_name,
        args.model_dir,
        feature_client,
        pseudonymizer,
        item_categories=categories,
        lookup_timeout_s=args.lookup_timeout_ms / 1000,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
    )
    model.load()
    return model


def limit_blas_threads(threads: int) -> None:
    """Give numpy's BLAS (batched item scores) as many threads as torch has.

    OpenBLAS otherwise starts one thread per core, which contend on a pinned server.
    """
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:
        logger.warning(
            "threadpoolctl is missing: numpy's BLAS keeps its default threads; set "
            "OPENBLAS_NUM_THREADS=%d to match --torch-threads",
            threads,
        )
        return
    threadpool_limits(threads, user_api="blas")


def freeze_startup_objects() -> None:
    """Move every object alive after loading out of the garbage collector's sight.

    The imports and the artifact leave ~300k long-lived objects; a full collection
    walks all of them (134 ms measured with the 100k-item catalog), stalling every
    request in flight. Frozen, they are never scanned again; request garbage is still
    collected.
    """
    gc.collect()
    gc.freeze()
    logger.debug("froze %d startup objects out of gc", gc.get_freeze_count())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT.

    Returns:
        The process exit status: 0 after a clean stop, 1 if the model never got ready.
    """
    configure_logging()
    # KServe logs request timings at INFO; here per-request detail is DEBUG-only.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    args = parse_args(argv)
    # Request batches are small: OpenMP threads cost more in contention than they save
    # (measured 2 ms with 1 thread vs 137 ms with 2 on a busy 2-core machine).
    torch.set_num_threads(args.torch_threads)
    limit_blas_threads(args.torch_threads)
    model = build_model(args)
    freeze_startup_objects()

    server = BoundModelServer(
        host=args.host,
        http_port=args.http_port,
        max_in_flight=args.max_in_flight,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout_s,
    )
    logger.info(
        "serving model=%s on http://%s:%d (grpc disabled)",
        args.model_name,
        args.host,
        args.http_port,
    )
    try:
        server.start([model])
    except NoModelReady:
        logger.error(
            "model=%s is not ready; the server does not start", args.model_name
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
