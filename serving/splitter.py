"""A small traffic splitter on 127.0.0.1: stable and canary model servers behind one URL.

Local stand-in for KServe's ``canaryTrafficPercent`` (``shopml serve --canary PERCENT``).
Inference requests (v1 ``:predict``/``:explain``, v2 ``/infer``) go to the canary with
probability ``canary_percent`` / 100: rows for a user are assigned by a hash of the
user's pseudonym, so a user stays on one variant; other requests are assigned at random.
Everything else (health, metadata) goes to the stable server. Each answer carries
``x-shopml-variant``.

Every inference answer is logged as impressions (JSON lines, one per row, the format
:func:`shopml.canary.read_impressions` reads): time, request id, variant, status,
latency, the user's pseudonym (never the raw id) and the served item ids.
``GET /splitter/traffic`` shows the split; ``PUT /splitter/traffic`` with
``{"canary_percent": P}`` (and optionally ``"canary_url"``) changes it.

Run::

    python -m serving.splitter --stable http://127.0.0.1:8081 \\
        --canary http://127.0.0.1:8082 --canary-percent 10 --port 8080 \\
        --impressions .shopml/runs/impressions.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.admission import is_inference_path
from shopml.security import Pseudonymizer

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding"}


@dataclass
class Split:
    """Where traffic goes.

    Attributes:
        stable_url: root URL of the stable model server.
        canary_url: root URL of the canary model server.
        canary_percent: share of inference traffic sent to the canary, 0..100.
    """

    stable_url: str
    canary_url: str
    canary_percent: int

    def __post_init__(self) -> None:
        check_percent(self.canary_percent)


def check_percent(value: Any) -> int:
    """A canary share: an integer 0..100.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"canary_percent={value!r} must be an integer from 0 to 100")
    return value


class ImpressionLog:
    """Appends impressions as JSON lines; safe to call from several threads.

    Args:
        path: the file (its folder is created).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append rows, one JSON object per line."""
        text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(text)


def _request_users(body: Any) -> list[str]:
    """Raw user ids per row of a v1 or v2 body ("" for rows without one)."""
    if not isinstance(body, dict):
        return []
    if isinstance(body.get("instances"), list):
        return [
            str(row.get("user_id", "")) if isinstance(row, dict) else ""
            for row in body["instances"]
        ]
    for tensor in body.get("inputs") or []:
        if isinstance(tensor, dict) and tensor.get("name") == "user_id":
            return [str(user) for user in tensor.get("data") or []]
    return []


def _served_items(answer: Any) -> list[list[str]]:
    """Item ids per row of a v1 or v2 answer."""
    if not isinstance(answer, dict):
        return []
    if isinstance(answer.get("predictions"), list):
        return [list(row.get("item_ids", [])) for row in answer["predictions"]]
    for tensor in answer.get("outputs") or []:
        if tensor.get("name") == "item_ids":
            rows, width = tensor["shape"]
            data = tensor["data"]
            return [
                [item for item in data[r * width : (r + 1) * width] if item]
                for r in range(rows)
            ]
    return []


class Splitter:
    """The splitter's state and request handling.

    Args:
        split: the initial split.
        pseudonymizer: turns raw user ids into the pseudonyms logged and hashed.
        impressions: where impressions go.
        seed: seed of the random assignment of requests without a user.
    """

    def __init__(
        self,
        split: Split,
        pseudonymizer: Pseudonymizer,
        impressions: ImpressionLog,
        seed: int = 0,
    ) -> None:
        self.split = split
        self.pseudonymizer = pseudonymizer
        self.impressions = impressions
        self._random = random.Random(seed)
        self._client = httpx.AsyncClient(timeout=30)

    def variant_for(self, pseudonyms: Sequence[str]) -> str:
        """``canary`` or ``stable`` for a request; sticky per user."""
        percent = self.split.canary_percent
        if pseudonyms and pseudonyms[0]:
            digest = hashlib.sha256(pseudonyms[0].encode("utf-8")).digest()
            bucket = int.from_bytes(digest[:4], "big") % 100
        else:
            bucket = self._random.randrange(100)
        return "canary" if bucket < percent else "stable"

    async def proxy(self, request: Request) -> Response:
        """Forward one request to its variant and log inference answers."""
        body = await request.body()
        is_inference = is_inference_path(request.url.path)
        pseudonyms: list[str] = []
        if is_inference:
            try:
                users = _request_users(json.loads(body or b"null"))
            except ValueError:
                users = []
            pseudonyms = [
                self.pseudonymizer.pseudonymize(u) if u else "" for u in users
            ]
        variant = self.variant_for(pseudonyms) if is_inference else "stable"
        upstream = (
            self.split.canary_url if variant == "canary" else self.split.stable_url
        )

        started = time.perf_counter()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS
        }
        try:
            answer = await self._client.request(
                request.method,
                upstream + request.url.path,
                content=body,
                headers=headers,
                params=request.query_params,
            )
        except httpx.TransportError as err:
            logger.warning("variant=%s unreachable: %s", variant, err)
            return JSONResponse(
                {"error": f"the {variant} model server is unreachable"}, status_code=502
            )
        latency_ms = (time.perf_counter() - started) * 1000
        if is_inference:
            self._log(request, answer, variant, pseudonyms, latency_ms)
        response_headers = {
            k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS
        }
        response_headers["x-shopml-variant"] = variant
        return Response(answer.content, answer.status_code, response_headers)

    def _log(
        self,
        request: Request,
        answer: httpx.Response,
        variant: str,
        pseudonyms: list[str],
        latency_ms: float,
    ) -> None:
        try:
            served = _served_items(answer.json()) if answer.status_code < 400 else []
        except ValueError:
            served = []
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        n_rows = max(len(pseudonyms), len(served), 1)
        now = datetime.now(UTC).isoformat()
        self.impressions.write(
            [
                {
                    "time": now,
                    "request_id": f"{request_id}-{row}",
                    "variant": variant,
                    "status": answer.status_code,
                    "latency_ms": round(latency_ms, 3),
                    "user_id": pseudonyms[row] if row < len(pseudonyms) else "",
                    "item_ids": served[row] if row < len(served) else [],
                }
                for row in range(n_rows)
            ]
        )

    async def traffic(self, request: Request) -> Response:
        """``GET``: the split; ``PUT``: change ``canary_percent`` / ``canary_url``."""
        if request.method == "PUT":
            try:
                change = await request.json()
                percent = check_percent(change.get("canary_percent"))
            except (ValueError, AttributeError) as err:
                return JSONResponse({"error": str(err)}, status_code=400)
            self.split.canary_percent = percent
            if isinstance(change.get("canary_url"), str):
                self.split.canary_url = change["canary_url"].rstrip("/")
            logger.info("traffic split canary_percent=%d", percent)
        return JSONResponse(
            {
                "canary_percent": self.split.canary_percent,
                "stable_url": self.split.stable_url,
                "canary_url": self.split.canary_url,
            }
        )

    def app(self) -> Starlette:
        """The ASGI app: the admin route, then everything else proxied."""
        return Starlette(
            routes=[
                Route("/splitter/traffic", self.traffic, methods=["GET", "PUT"]),
                Route("/{path:path}", self.proxy, methods=["GET", "POST", "PUT"]),
            ]
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m serving.splitter")
    parser.add_argument("--stable", required=True, help="stable server root URL")
    parser.add_argument("--canary", required=True, help="canary server root URL")
    parser.add_argument("--canary-percent", type=int, default=10)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--impressions", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the splitter on 127.0.0.1 until SIGTERM/SIGINT."""
    import uvicorn

    from shopml.config import load_settings
    from shopml.logs import configure_logging
    from shopml.security import load_pseudonymizer

    configure_logging()
    args = parse_args(argv)
    try:
        split = Split(
            args.stable.rstrip("/"), args.canary.rstrip("/"), args.canary_percent
        )
    except ValueError as err:
        logger.error("splitter not started: %s", err)
        return 2
    splitter = Splitter(
        split,
        load_pseudonymizer(load_settings()),
        ImpressionLog(args.impressions),
        seed=args.seed,
    )
    logger.info(
        "splitter on http://%s:%d canary_percent=%d impressions=%s",
        LOOPBACK,
        args.port,
        split.canary_percent,
        args.impressions,
    )
    uvicorn.run(
        splitter.app(), host=LOOPBACK, port=args.port, log_config=None, access_log=False
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
